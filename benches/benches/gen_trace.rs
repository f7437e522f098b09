//! Writes a seeded synthetic Mooncake trace of one shape
//! (`kvtier_benches::traces`) for `kvtier replay`:
//! `cargo bench -p kvtier-benches --bench gen_trace -- --shape multi_turn
//! --out FILE [--seed N] [--duration-s S] [--rate R] [--tenants N]
//! [--zipf-s S]`. Prints the request count, the prompt tokens per second and
//! the ideal hit ratio on stderr.

use std::io::Write;
use std::path::PathBuf;

use clap::Parser;
use kvrouter::replay::ideal_hit_ratio;
use kvtier_benches::traces::{generate, jsonl_line, GenConfig, Shape};

#[derive(Parser)]
struct Cli {
    /// multi_turn, tool_agent or many_tenants.
    #[arg(long)]
    shape: String,
    /// Output JSONL file.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds during which conversations, agents or requests start.
    #[arg(long, default_value_t = 600.0)]
    duration_s: f64,
    /// Arrivals per second (conversations, agents or requests); default
    /// per shape.
    #[arg(long)]
    rate: Option<f64>,
    /// Tenants (many_tenants) or agent kinds (tool_agent); default 400 / 4.
    #[arg(long)]
    tenants: Option<usize>,
    /// Zipf exponent of tenant popularity.
    #[arg(long, default_value_t = 1.1)]
    zipf_s: f64,
}

fn main() -> anyhow::Result<()> {
    // cargo bench passes `--bench`; drop it
    let argv: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let cli = Cli::parse_from(argv);
    let shape = Shape::parse(&cli.shape).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown shape {:?} (multi_turn, tool_agent, many_tenants)",
            cli.shape
        )
    })?;
    let mut cfg = GenConfig::new(shape);
    cfg.seed = cli.seed;
    cfg.duration_s = cli.duration_s;
    cfg.zipf_s = cli.zipf_s;
    if let Some(r) = cli.rate {
        cfg.rate = r;
    }
    if let Some(t) = cli.tenants {
        cfg.tenants = t;
    }
    let trace = generate(&cfg);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&cli.out)?);
    for r in &trace {
        writeln!(f, "{}", jsonl_line(r))?;
    }
    f.flush()?;
    let tokens: u64 = trace.iter().map(|r| r.input_length).sum();
    let span = trace.last().map_or(0.0, |r| r.timestamp / 1e3).max(1.0);
    let ideal = ideal_hit_ratio(&trace);
    eprintln!(
        "{}: {} requests over {:.0} s, mean prompt {:.0} tokens, {:.0} prompt tokens/s, \
         ideal hit ratio {:.3} ({:.0} tokens/s to prefill at ideal reuse)",
        shape.name(),
        trace.len(),
        span,
        tokens as f64 / trace.len().max(1) as f64,
        tokens as f64 / span,
        ideal,
        tokens as f64 * (1.0 - ideal) / span,
    );
    Ok(())
}
