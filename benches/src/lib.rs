//! kvtier benchmark harnesses; see `benches/` and `docs/benchmarks.md`.
//!
//! - `router`: index ingest rate and route latency (`cargo bench -p
//!   kvtier-benches --bench router`).
//! - `replay`: the trace replay policy comparison (`cargo bench -p
//!   kvtier-benches --bench replay -- --trace FILE`).
//! - `indexer`: a trace replayed as store/remove/lookup operations through
//!   the router index ([`stream`], [`harness`], [`kvtier`]); the same
//!   harness runs NVIDIA Dynamo's indexers side by side in `benches/dynamo`.
//! - `gen_trace`: seeded synthetic traces of other shapes ([`traces`]).

pub mod harness;
pub mod inputs;
pub mod kvtier;
pub mod stream;
pub mod traces;

/// Percentile (0..=1) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
