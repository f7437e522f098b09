//! The process-wide tokio runtime behind every synchronous gRPC call.
//!
//! One worker thread keeps the client's connections polled between calls,
//! so when the daemon goes away the connection notices at once and the next
//! call dials afresh instead of failing on a dead connection. (A
//! current-thread runtime, driven only inside `block_on`, saves a thread
//! hand-off per call but leaves every first call after a daemon restart to
//! fail.) The latency-critical Lookup does not use this runtime: it goes
//! over the pool socket's binary fast path (`Client::lookup`).

use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// The runtime, built on first use.
pub fn get() -> Result<&'static Runtime, String> {
    RUNTIME
        .get_or_init(|| {
            Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .thread_name("kvtier-rt")
                .build()
                .map_err(|e| format!("cannot start the kvtier runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}
