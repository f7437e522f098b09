//! Trace replay policy comparison, the same as `kvtier replay`:
//! `cargo bench -p kvtier-benches --bench replay -- [--trace FILE]
//! [--workers N] [--gpu-tokens N] [--host-tokens N] [--disk-tokens N]
//! [--remote-tokens N] [--json]`.

use kvrouter::replay::{compare, read_trace, Policy, SimConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let num = |k: &str, d: u64| -> u64 { get(k).and_then(|v| v.parse().ok()).unwrap_or(d) };
    let trace =
        get("--trace").unwrap_or_else(|| "../../shared/traces/synthetic_trace.jsonl".into());
    let cfg = SimConfig {
        workers: num("--workers", 8) as usize,
        gpu_tokens: num("--gpu-tokens", 3_000_000),
        host_tokens: num("--host-tokens", 0),
        disk_tokens: num("--disk-tokens", 0),
        remote_tokens: num("--remote-tokens", 0),
        ..SimConfig::default()
    };
    let t = read_trace(std::path::Path::new(&trace))?;
    let r = compare(
        &t,
        &cfg,
        &[
            Policy::Kv,
            Policy::RoundRobin,
            Policy::LeastLoaded,
            Policy::PrefixOnly,
        ],
    );
    if args.iter().any(|a| a == "--json") {
        println!("{}", r.to_json());
    } else {
        print!("{}", r.table());
    }
    Ok(())
}
