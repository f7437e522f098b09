//! Counters of event ingestion, shared by every subscription.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::decode::DecodeErrorKind;

type KindFamily = Family<[(&'static str, &'static str); 1], Counter>;

/// Ingestion counters. One instance is shared by every subscription (the
/// counters are atomics; nothing here takes a lock on the hot path).
///
/// Registered as (with [`IngestMetrics::register`]):
/// `kvrouter_ingest_events_total{kind=stored|removed|cleared}`,
/// `kvrouter_ingest_blocks_total{kind=stored|removed}`,
/// `kvrouter_ingest_batches_total`, `kvrouter_ingest_gaps_total`,
/// `kvrouter_ingest_gaps_unrecovered_total`, `kvrouter_ingest_replays_total`,
/// `kvrouter_ingest_replayed_batches_total`,
/// `kvrouter_ingest_decode_errors_total{kind=...}` (kinds:
/// [`DecodeErrorKind::as_str`]), `kvrouter_ingest_restarts_total`,
/// `kvrouter_ingest_reconnects_total`, `kvrouter_ingest_connected_streams`.
#[derive(Debug, Default)]
pub struct IngestMetrics {
    events: KindFamily,
    blocks: KindFamily,
    /// Batches applied (live and replayed).
    pub batches: Counter,
    /// Sequence gaps seen (each asks for a replay when a replay endpoint is
    /// known).
    pub gaps: Counter,
    /// Gaps a replay could not fill (the engine's or daemon's replay buffer
    /// no longer held them); the stream goes on from what arrives.
    pub gaps_unrecovered: Counter,
    /// Replay requests sent.
    pub replays: Counter,
    /// Batches received through replay.
    pub replayed_batches: Counter,
    decode_errors: KindFamily,
    /// Engine restarts (sequence went backwards) and new kvbm incarnations.
    pub restarts: Counter,
    /// Connections re-established after a failure or a silent peer.
    pub reconnects: Counter,
    /// Event streams connected now.
    pub connected: Gauge,
}

impl IngestMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every counter in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kvrouter_ingest_events",
            "Block events delivered to the index, by kind",
            self.events.clone(),
        );
        registry.register(
            "kvrouter_ingest_blocks",
            "Blocks in delivered Stored/Removed events",
            self.blocks.clone(),
        );
        registry.register(
            "kvrouter_ingest_batches",
            "Event batches applied (live and replayed)",
            self.batches.clone(),
        );
        registry.register(
            "kvrouter_ingest_gaps",
            "Sequence gaps detected",
            self.gaps.clone(),
        );
        registry.register(
            "kvrouter_ingest_gaps_unrecovered",
            "Sequence gaps that replay could not fill",
            self.gaps_unrecovered.clone(),
        );
        registry.register(
            "kvrouter_ingest_replays",
            "Replay requests sent",
            self.replays.clone(),
        );
        registry.register(
            "kvrouter_ingest_replayed_batches",
            "Batches received through replay",
            self.replayed_batches.clone(),
        );
        registry.register(
            "kvrouter_ingest_decode_errors",
            "Rejected frames, batches and events, by kind",
            self.decode_errors.clone(),
        );
        registry.register(
            "kvrouter_ingest_restarts",
            "Engine restarts and new kvbm incarnations (the source was purged)",
            self.restarts.clone(),
        );
        registry.register(
            "kvrouter_ingest_reconnects",
            "Event stream reconnections",
            self.reconnects.clone(),
        );
        registry.register(
            "kvrouter_ingest_connected_streams",
            "Event streams connected now",
            self.connected.clone(),
        );
    }

    pub(crate) fn event(&self, kind: &'static str) {
        self.events.get_or_create(&[("kind", kind)]).inc();
    }

    pub(crate) fn blocks(&self, kind: &'static str, n: usize) {
        self.blocks
            .get_or_create(&[("kind", kind)])
            .inc_by(n as u64);
    }

    pub(crate) fn decode_error(&self, kind: DecodeErrorKind) {
        self.decode_errors
            .get_or_create(&[("kind", kind.as_str())])
            .inc();
    }

    /// Events delivered of one kind (`stored`, `removed`, `cleared`).
    pub fn events_of(&self, kind: &'static str) -> u64 {
        self.events.get_or_create(&[("kind", kind)]).get()
    }

    /// Decode errors of one kind.
    pub fn decode_errors_of(&self, kind: DecodeErrorKind) -> u64 {
        self.decode_errors
            .get_or_create(&[("kind", kind.as_str())])
            .get()
    }

    /// Decode errors of every kind.
    pub fn decode_errors_total(&self) -> u64 {
        DecodeErrorKind::ALL
            .iter()
            .map(|k| self.decode_errors_of(*k))
            .sum()
    }
}
