//! Prometheus metrics of the daemon, by tier.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TierLabel {
    host,
    disk,
    remote,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub tier: TierLabel,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum OpLabel {
    read,
    write,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: OpLabel,
}

pub struct Metrics {
    pub registry: Registry,
    pub bytes: Family<TierLabels, Gauge>,
    pub capacity_bytes: Family<TierLabels, Gauge>,
    pub blocks: Family<TierLabels, Gauge>,
    pub hits: Family<TierLabels, Counter>,
    pub misses: Counter,
    pub evictions: Family<TierLabels, Counter>,
    pub dropped_writes: Counter,
    pub remote_dropped_uploads: Counter,
    pub lost_writes: Counter,
    pub checksum_failures: Counter,
    pub degraded: Family<TierLabels, Gauge>,
    pub disk_latency: Family<OpLabels, Histogram>,
    pub disk_throughput: Family<OpLabels, Gauge>,
    pub index_bytes: Gauge,
}

pub fn tier(t: TierLabel) -> TierLabels {
    TierLabels { tier: t }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kvbm");
        let m = Metrics {
            bytes: Family::default(),
            capacity_bytes: Family::default(),
            blocks: Family::default(),
            hits: Family::default(),
            misses: Counter::default(),
            evictions: Family::default(),
            dropped_writes: Counter::default(),
            remote_dropped_uploads: Counter::default(),
            lost_writes: Counter::default(),
            checksum_failures: Counter::default(),
            degraded: Family::default(),
            // 50 µs .. ~1.6 s
            disk_latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(50e-6, 2.0, 16))
            }),
            disk_throughput: Family::default(),
            index_bytes: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("tier_bytes", "Bytes of blocks held", m.bytes.clone());
        registry.register(
            "tier_capacity_bytes",
            "Configured capacity",
            m.capacity_bytes.clone(),
        );
        registry.register("tier_blocks", "Blocks held", m.blocks.clone());
        registry.register(
            "hits",
            "Blocks served, by the tier that served them",
            m.hits.clone(),
        );
        registry.register("misses", "Blocks asked for and not found", m.misses.clone());
        registry.register("evictions", "Blocks evicted", m.evictions.clone());
        registry.register(
            "dropped_writes",
            "Write-behind blocks dropped (queue full, degraded disk) or failed",
            m.dropped_writes.clone(),
        );
        registry.register(
            "remote_dropped_uploads",
            "Blocks offered to the object store that never reached it (queue full, failed upload)",
            m.remote_dropped_uploads.clone(),
        );
        registry.register(
            "lost_writes",
            "Blocks whose write-behind was dropped and that left host memory unwritten",
            m.lost_writes.clone(),
        );
        registry.register(
            "checksum_failures",
            "Blocks that failed verification and were dropped",
            m.checksum_failures.clone(),
        );
        registry.register(
            "tier_degraded",
            "1 while a tier is degraded",
            m.degraded.clone(),
        );
        registry.register(
            "disk_io_seconds",
            "Disk block I/O latency, submit to completion",
            m.disk_latency.clone(),
        );
        registry.register(
            "disk_throughput_bytes_per_second",
            "Disk throughput measured on kvbm's own I/O while busy (0: none in the last 5 minutes)",
            m.disk_throughput.clone(),
        );
        registry.register(
            "index_memory_bytes",
            "Estimated memory of the in-memory block index",
            m.index_bytes.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}
