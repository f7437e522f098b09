//! Prometheus metrics (`GET /metrics`, text exposition).
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `kvrouter_index_blocks` | gauge | holdings (block x source x tier) in the index |
//! | `kvrouter_index_blocks_limit` | gauge | the configured `index.max_blocks` |
//! | `kvrouter_index_tier_blocks{tier}` | gauge | holdings per tier |
//! | `kvrouter_index_keys` | gauge | distinct chain keys |
//! | `kvrouter_index_block_events_total` | counter | blocks stored or removed (rate = events/s) |
//! | `kvrouter_index_pruned_total` | counter | holdings pruned to respect the limit |
//! | `kvrouter_index_orphans_total` | counter | `Stored` events with an unknown parent |
//! | `kvrouter_index_malformed_total` | counter | `Stored` events whose hashes and tokens disagree |
//! | `kvrouter_index_unknown_removes_total` | counter | removed hashes the index did not know |
//! | `kvrouter_workers` | gauge | registered workers |
//! | `kvrouter_routes_total{outcome}` | counter | route calls: `routed`, `no_worker`, `invalid` |
//! | `kvrouter_route_latency_seconds` | histogram | route decision time (tokenizing included) |
//! | `kvrouter_route_matched_blocks_total{tier}` | counter | blocks the chosen worker held, per tier |
//!
//! Ingestion adds its own (gaps, replays, decode errors) through
//! `IngestMetrics::register`.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::index::Index;
use crate::workers::Workers;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    pub tier: &'static str,
}

/// Tier names as they appear in labels and JSON.
pub const TIER_NAMES: [&str; 4] = ["gpu", "host", "disk", "remote"];

/// The router's own metrics.
#[derive(Clone)]
pub struct RouterMetrics {
    pub routes: Family<OutcomeLabel, Counter>,
    pub route_latency: Histogram,
    pub matched_blocks: Family<TierLabel, Counter>,
}

impl Default for RouterMetrics {
    fn default() -> Self {
        Self {
            routes: Family::default(),
            // 5 us .. ~80 ms
            route_latency: Histogram::new(exponential_buckets(5e-6, 2.0, 15)),
            matched_blocks: Family::default(),
        }
    }
}

impl RouterMetrics {
    pub fn outcome(&self, outcome: &'static str) {
        self.routes.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    pub fn matched(&self, blocks: [u32; 4]) {
        for (t, n) in blocks.iter().enumerate() {
            if *n > 0 {
                self.matched_blocks
                    .get_or_create(&TierLabel {
                        tier: TIER_NAMES[t],
                    })
                    .inc_by(u64::from(*n));
            }
        }
    }

    /// Registers these and the index's figures.
    pub fn register(&self, reg: &mut Registry, index: Arc<Index>, workers: Arc<Workers>) {
        reg.register(
            "kvrouter_routes",
            "Route calls by outcome",
            self.routes.clone(),
        );
        reg.register(
            "kvrouter_route_latency_seconds",
            "Route decision time",
            self.route_latency.clone(),
        );
        reg.register(
            "kvrouter_route_matched_blocks",
            "Blocks the chosen worker held, per tier",
            self.matched_blocks.clone(),
        );
        reg.register_collector(Box::new(IndexCollector { index, workers }));
    }
}

/// Reads the index's counters at scrape time.
struct IndexCollector {
    index: Arc<Index>,
    workers: Arc<Workers>,
}

impl fmt::Debug for IndexCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IndexCollector")
    }
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    let g = ConstGauge::new(v);
    let me = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(me)
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    let me = enc.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(me)
}

impl Collector for IndexCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let ix = &self.index;
        let s = &ix.stats;
        gauge(
            &mut enc,
            "kvrouter_index_blocks",
            "Holdings (block x source x tier) in the index",
            ix.holdings() as i64,
        )?;
        gauge(
            &mut enc,
            "kvrouter_index_blocks_limit",
            "Configured holding limit",
            ix.max_blocks() as i64,
        )?;
        gauge(
            &mut enc,
            "kvrouter_index_keys",
            "Distinct chain keys",
            ix.keys() as i64,
        )?;
        {
            let per = ix.holdings_per_tier();
            let g0 = ConstGauge::new(0i64);
            let mut me = enc.encode_descriptor(
                "kvrouter_index_tier_blocks",
                "Holdings per tier",
                None,
                g0.metric_type(),
            )?;
            for (t, n) in per.iter().enumerate() {
                let label = TierLabel {
                    tier: TIER_NAMES[t],
                };
                let fam = me.encode_family(&label)?;
                ConstGauge::new(*n as i64).encode(fam)?;
            }
        }
        gauge(
            &mut enc,
            "kvrouter_workers",
            "Registered workers",
            self.workers.list().len() as i64,
        )?;
        counter(
            &mut enc,
            "kvrouter_index_block_events",
            "Blocks stored or removed",
            s.block_events.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "kvrouter_index_pruned",
            "Holdings pruned to respect the limit",
            s.pruned.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "kvrouter_index_orphans",
            "Stored events whose parent block is unknown",
            s.orphans.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "kvrouter_index_malformed",
            "Stored events whose hashes and tokens disagree",
            s.malformed.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "kvrouter_index_unknown_removes",
            "Removed hashes the index did not know",
            s.unknown_removes.load(Ordering::Relaxed),
        )?;
        Ok(())
    }
}

/// Encodes a registry in the text exposition format.
pub fn render(reg: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, reg).is_err() {
        out.clear();
    }
    out
}
