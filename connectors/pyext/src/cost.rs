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

    /// Whether loads from disk have a current measurement.
    fn knows_disk(&self) -> bool {
        self.inner.knows(cost::Source::Disk)
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
    /// `[first, host)` are in host memory, `[host, matched)` on disk.
    fn plan(
        &self,
        first: usize,
        host: usize,
        matched: usize,
        block_bytes: u64,
        tokens_per_block: u64,
    ) -> usize {
        self.inner
            .plan(first, host, matched, block_bytes, tokens_per_block)
    }
}
