//! `CostModel`: [`kvtier_client::cost::CostModel`] for Python, so the engine
//! connectors decide with the same model as the rest of kvtier.

use kvtier_client::cost;
use pyo3::prelude::*;

/// Whether loading a cached prefix beats recomputing it, from measured
/// load rates and prefill speed (see `kvtier_client::cost`).
#[pyclass(module = "kvtier._kvtier")]
#[derive(Default)]
pub struct CostModel {
    inner: cost::CostModel,
}

#[pymethods]
impl CostModel {
    #[new]
    fn new() -> CostModel {
        CostModel::default()
    }

    /// A load of `host_bytes` from host memory and `disk_bytes` from disk
    /// took `secs`, end to end.
    fn observe_load(&mut self, host_bytes: u64, disk_bytes: u64, secs: f64) {
        self.inner.observe_load(host_bytes, disk_bytes, secs)
    }

    /// Reading `bytes` from disk into host memory took `secs`.
    fn observe_disk_read(&mut self, bytes: u64, secs: f64) {
        self.inner.observe_disk_read(bytes, secs)
    }

    /// Reading `bytes` from the object store (G4) into host memory took
    /// `secs`.
    fn observe_remote_read(&mut self, bytes: u64, secs: f64) {
        self.inner.observe_remote_read(bytes, secs)
    }

    /// One promotion read `disk_bytes` from disk and `remote_bytes` from G4
    /// into host memory in `secs` (G4 gets what the disk's known rate does
    /// not explain).
    fn observe_promotion(&mut self, disk_bytes: u64, remote_bytes: u64, secs: f64) {
        self.inner.observe_promotion(disk_bytes, remote_bytes, secs)
    }

    /// Whether loads from disk have a current measurement.
    fn knows_disk(&self) -> bool {
        self.inner.knows(cost::Source::Disk)
    }

    /// Whether loads from G4 have a current measurement.
    fn knows_remote(&self) -> bool {
        self.inner.knows(cost::Source::Remote)
    }

    /// A prefill step of `tokens` tokens took `secs`.
    fn observe_prefill(&mut self, tokens: u64, secs: f64) {
        self.inner.observe_prefill(tokens, secs)
    }

    /// Seconds to prefill `tokens` from scratch; `None` before a measure.
    fn recompute_secs(&self, tokens: u64) -> Option<f64> {
        self.inner.recompute_secs(tokens)
    }

    /// The end of the prefix worth loading (`first` when none is): blocks
    /// `[first, host)` are in host memory, `[host, local)` on disk,
    /// `[local, matched)` only in G4.
    fn plan(
        &self,
        first: usize,
        host: usize,
        local: usize,
        matched: usize,
        block_bytes: u64,
        tokens_per_block: u64,
    ) -> usize {
        self.inner
            .plan(first, host, local, matched, block_bytes, tokens_per_block)
    }
}
