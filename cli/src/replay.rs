//! `kvtier replay`: replays a Mooncake trace against simulated engines with
//! the router's real index and scoring, and compares routing policies. The
//! model is documented in `kvrouter::replay` and `docs/router.md`.

use std::path::PathBuf;

use kvrouter::replay::{compare, parse_policies, read_trace, SimConfig};

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Mooncake JSONL trace (timestamp ms, input_length, output_length,
    /// hash_ids of 512-token blocks).
    #[arg(long)]
    pub trace: PathBuf,
    /// Simulated workers.
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// G1 (GPU) capacity per worker, tokens.
    #[arg(long, default_value_t = 3_000_000)]
    pub gpu_tokens: u64,
    /// G2 (host) capacity per worker, tokens (0 = no tier).
    #[arg(long, default_value_t = 0)]
    pub host_tokens: u64,
    /// G3 (disk) capacity per worker, tokens (0 = no tier).
    #[arg(long, default_value_t = 0)]
    pub disk_tokens: u64,
    /// G4 (shared remote) capacity, tokens (0 = no tier).
    #[arg(long, default_value_t = 0)]
    pub remote_tokens: u64,
    /// Policies to compare: kv, round_robin, least_loaded, prefix_only.
    #[arg(long, default_value = "kv,round_robin,least_loaded,prefix_only")]
    pub policies: String,
    /// Prefill throughput per worker, tokens/s.
    #[arg(long, default_value_t = 10_000.0)]
    pub prefill_tokens_per_s: f64,
    /// Decode time per output token, ms.
    #[arg(long, default_value_t = 20.0)]
    pub decode_ms_per_token: f64,
    /// KV bytes per token.
    #[arg(long, default_value_t = 131_072.0)]
    pub kv_bytes_per_token: f64,
    /// Onboard bandwidth G2 -> GPU, GB/s.
    #[arg(long, default_value_t = 25.0)]
    pub host_gbps: f64,
    /// Onboard bandwidth G3 -> GPU, GB/s.
    #[arg(long, default_value_t = 5.0)]
    pub disk_gbps: f64,
    /// Onboard bandwidth G4 -> GPU, GB/s.
    #[arg(long, default_value_t = 1.0)]
    pub remote_gbps: f64,
    /// Print one JSON line instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ReplayArgs {
    pub fn sim_config(&self) -> anyhow::Result<SimConfig> {
        anyhow::ensure!(self.workers > 0, "--workers must be at least 1");
        anyhow::ensure!(
            self.prefill_tokens_per_s > 0.0,
            "--prefill-tokens-per-s must be > 0"
        );
        Ok(SimConfig {
            workers: self.workers,
            gpu_tokens: self.gpu_tokens,
            host_tokens: self.host_tokens,
            disk_tokens: self.disk_tokens,
            remote_tokens: self.remote_tokens,
            prefill_tokens_per_s: self.prefill_tokens_per_s,
            decode_s_per_token: self.decode_ms_per_token / 1e3,
            kv_bytes_per_token: self.kv_bytes_per_token,
            bandwidth: [
                self.host_gbps * 1e9,
                self.disk_gbps * 1e9,
                self.remote_gbps * 1e9,
            ],
            ..SimConfig::default()
        })
    }
}

pub fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let policies = parse_policies(&args.policies).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(!policies.is_empty(), "--policies is empty");
    let cfg = args.sim_config()?;
    let trace = read_trace(&args.trace)?;
    let report = compare(&trace, &cfg, &policies);
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
