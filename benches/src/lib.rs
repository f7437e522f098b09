//! kvtier benchmark harnesses; see `benches/` and `docs/benchmarks.md`.
//!
//! - `router`: index ingest rate and route latency (`cargo bench -p
//!   kvtier-benches --bench router`).
//! - `replay`: the trace replay policy comparison (`cargo bench -p
//!   kvtier-benches --bench replay -- --trace FILE`).
//! - `gen_trace`: seeded synthetic traces of other shapes ([`traces`]).

pub mod traces;

/// Percentile (0..=1) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
