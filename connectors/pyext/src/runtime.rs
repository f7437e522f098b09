//! The process-wide tokio runtime behind every synchronous call.
//!
//! A current-thread runtime driven by the calling thread in `block_on`: a
//! unary call over the Unix socket then needs no thread hand-off (measured in
//! `connectors/bench/latency.py`; `KVTIER_RUNTIME=multi` selects a one-worker
//! multi-thread runtime instead, for comparison). Several Python threads may
//! call at once: tokio hands the runtime's driver from one `block_on` to the
//! next.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// The runtime, built on first use.
pub fn get() -> Result<&'static Runtime, String> {
    RUNTIME
        .get_or_init(|| {
            let multi = std::env::var("KVTIER_RUNTIME").is_ok_and(|v| v == "multi");
            let mut b = if multi {
                let mut b = Builder::new_multi_thread();
                b.worker_threads(1);
                b
            } else {
                Builder::new_current_thread()
            };
            b.enable_all()
                .thread_name("kvtier-rt")
                .build()
                .map_err(|e| format!("cannot start the kvtier runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}
