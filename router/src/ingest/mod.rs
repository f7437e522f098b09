//! Event ingestion: engine ZMQ streams and kvbm `SubscribeEvents` streams,
//! decoded tolerantly, sequenced, replayed and handed to an [`EventSink`] as
//! [`IndexEvent`](crate::event::IndexEvent)s.
//!
//! - [`spawn_engine`]: one engine (vLLM, SGLang) over ZMQ, every DP rank.
//! - [`spawn_kvbm`]: one kvbm daemon over gRPC.
//! - [`IngestMetrics`]: the counters both share.
//! - [`decode`]: msgpack batches → engine events (usable on its own, e.g.
//!   for recorded fixtures).
//!
//! Both spawners return a [`SubscriptionHandle`]; dropping it (or
//! [`SubscriptionHandle::stop`]) ends the subscription's tasks.
//!
//! [`EventSink`]: crate::event::EventSink

pub mod decode;
mod kvbm;
mod metrics;
pub mod msgpack;
mod zmq;
pub mod zmtp;

use std::time::Duration;

use kvtier_net::backoff::Backoff;
use tokio::task::JoinHandle;

#[cfg(fuzzing)]
pub use self::kvbm::apply_encoded as apply_kvbm_batches;
pub use self::kvbm::{spawn_kvbm, KvbmSubscription};
pub use self::metrics::IngestMetrics;
pub(crate) use self::zmq::zmq_endpoint_mode;
pub use self::zmq::{spawn_engine, EngineSubscription};

/// Connection behaviour shared by engine and kvbm subscriptions. Every
/// default is given on its field.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// First reconnect delay (default 100 ms); doubles up to `backoff_max`,
    /// with up to 25% jitter, and starts over once a connection has lived
    /// 10 s.
    pub backoff_initial: Duration,
    /// Longest reconnect delay (default 5 s).
    pub backoff_max: Duration,
    /// Time allowed to connect and handshake (default 5 s).
    pub connect_timeout: Duration,
    /// ZMTP heartbeat interval towards engines (default 5 s; `None`: off).
    /// A peer silent for three intervals is dropped and reconnected.
    pub heartbeat: Option<Duration>,
    /// Longest wait for each replayed batch and the end marker (default 5 s).
    pub replay_timeout: Duration,
    /// Largest engine message accepted (default 64 MiB); larger ones are
    /// skipped and counted as `too_large`.
    pub max_message_bytes: usize,
    /// Most events in one batch (default 1,048,576); a larger batch is
    /// rejected whole and counted as `too_large`.
    pub max_batch_events: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            heartbeat: Some(Duration::from_secs(5)),
            replay_timeout: Duration::from_secs(5),
            max_message_bytes: 64 << 20,
            max_batch_events: 1 << 20,
        }
    }
}

impl StreamOptions {
    fn limits(&self) -> zmtp::Limits {
        zmtp::Limits {
            max_message_bytes: self.max_message_bytes,
            max_frames: 16,
            handshake_timeout: self.connect_timeout,
        }
    }
}

/// The running tasks of one subscription. Dropping it stops them.
#[derive(Debug)]
pub struct SubscriptionHandle {
    tasks: Vec<JoinHandle<()>>,
}

impl SubscriptionHandle {
    fn new(tasks: Vec<JoinHandle<()>>) -> Self {
        SubscriptionHandle { tasks }
    }

    /// Stops the subscription (same as dropping the handle).
    pub fn stop(self) {}

    /// Whether every task has ended (a subscription whose endpoint could
    /// not be parsed ends at once; a running one never ends by itself).
    pub fn is_finished(&self) -> bool {
        self.tasks.iter().all(|t| t.is_finished())
    }
}

impl Drop for SubscriptionHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Counts one connected stream in [`IngestMetrics::connected`] while alive
/// (also when its task is aborted).
struct ConnectedGuard(std::sync::Arc<IngestMetrics>);

impl ConnectedGuard {
    fn new(m: &std::sync::Arc<IngestMetrics>) -> Self {
        m.connected.inc();
        ConnectedGuard(m.clone())
    }
}

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.0.connected.dec();
    }
}

/// Aborts a helper task when its owner goes away.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
