//! `EventStream`: the daemon's block events, collected in the background.
//!
//! A thread of its own (with its own runtime, so a long-lived stream never
//! holds the shared one) subscribes, resumes from the last sequence number
//! after a broken stream or a daemon restart, and queues batches; Python
//! drains the queue without blocking. The queue is bounded: when full, the
//! oldest batches are dropped and counted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvtier_client::v1;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::KvbmError;

struct Shared {
    queue: Mutex<VecDeque<v1::EventBatch>>,
    capacity: usize,
    stop: AtomicBool,
    dropped: AtomicU64,
    connected: AtomicBool,
    wake: tokio::sync::Notify,
}

/// A background subscription to `SubscribeEvents`.
#[pyclass(frozen, module = "kvtier._kvtier")]
pub struct EventStream {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

async fn run(addr: String, shared: Arc<Shared>, retry: Duration) {
    let mut from_seq = 0u64;
    let mut incarnation = String::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let attempt = async {
            let client = kvtier_client::Client::connect(&addr).await.ok()?;
            let mut stream = client
                .rpc()
                .subscribe_events(v1::SubscribeEventsRequest {
                    from_seq,
                    incarnation: incarnation.clone(),
                })
                .await
                .ok()?
                .into_inner();
            shared.connected.store(true, Ordering::Relaxed);
            while let Ok(Some(batch)) = stream.message().await {
                if batch.incarnation != incarnation {
                    incarnation.clone_from(&batch.incarnation);
                }
                from_seq = batch.seq + 1;
                if let Ok(mut q) = shared.queue.lock() {
                    while q.len() >= shared.capacity {
                        q.pop_front();
                        shared.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    q.push_back(batch);
                }
            }
            Some(())
        };
        tokio::select! {
            _ = attempt => {}
            _ = shared.wake.notified() => {}
        }
        shared.connected.store(false, Ordering::Relaxed);
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = shared.wake.notified() => {}
        }
    }
}

fn tier(t: i32) -> i32 {
    t
}

#[pymethods]
impl EventStream {
    /// Subscribes to the daemon at `addr`; reconnects every `retry_ms`
    /// while it is unreachable; keeps at most `capacity` batches.
    #[new]
    #[pyo3(signature = (addr, retry_ms = 1000, capacity = 4096))]
    fn new(addr: String, retry_ms: u64, capacity: usize) -> PyResult<EventStream> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            stop: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        });
        let s = shared.clone();
        let retry = Duration::from_millis(retry_ms.max(10));
        let thread = std::thread::Builder::new()
            .name("kvtier-events".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    rt.block_on(run(addr, s, retry));
                }
            })
            .map_err(|e| KvbmError::new_err(format!("cannot start the event thread: {e}")))?;
        Ok(EventStream {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Batches dropped because the queue was full.
    #[getter]
    fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Whether the subscription is live now.
    #[getter]
    fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Takes every queued batch, without blocking. Each batch is
    /// `(incarnation, seq, snapshot, events)`; each event a tuple:
    /// `("stored", tier, namespace, keys, parent, token_ids,
    /// tokens_per_block)`, `("removed", tier, namespace, keys)` or
    /// `("cleared", tier)`, tiers as `kvtier.v1.Tier` numbers.
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let batches: Vec<v1::EventBatch> = match self.shared.queue.lock() {
            Ok(mut q) => q.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        let out = PyList::empty(py);
        for b in batches {
            let events = PyList::empty(py);
            for e in b.events {
                let item = match e.kind {
                    Some(v1::event::Kind::Stored(s)) => {
                        let keys = PyList::new(py, s.keys.iter().map(|k| PyBytes::new(py, k)))?;
                        PyTuple::new(
                            py,
                            [
                                "stored".into_pyobject(py)?.into_any(),
                                tier(s.tier).into_pyobject(py)?.into_any(),
                                s.namespace.into_pyobject(py)?.into_any(),
                                keys.into_any(),
                                PyBytes::new(py, &s.parent).into_any(),
                                s.token_ids.into_pyobject(py)?.into_any(),
                                s.tokens_per_block.into_pyobject(py)?.into_any(),
                            ],
                        )?
                    }
                    Some(v1::event::Kind::Removed(r)) => {
                        let keys = PyList::new(py, r.keys.iter().map(|k| PyBytes::new(py, k)))?;
                        PyTuple::new(
                            py,
                            [
                                "removed".into_pyobject(py)?.into_any(),
                                tier(r.tier).into_pyobject(py)?.into_any(),
                                r.namespace.into_pyobject(py)?.into_any(),
                                keys.into_any(),
                            ],
                        )?
                    }
                    Some(v1::event::Kind::Cleared(c)) => PyTuple::new(
                        py,
                        [
                            "cleared".into_pyobject(py)?.into_any(),
                            tier(c.tier).into_pyobject(py)?.into_any(),
                        ],
                    )?,
                    None => continue,
                };
                events.append(item)?;
            }
            out.append((b.incarnation, b.seq, b.snapshot, events))?;
        }
        Ok(out)
    }

    /// Stops the background thread.
    fn close(&self, py: Python<'_>) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_waiters();
        self.shared.wake.notify_one();
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            py.detach(|| {
                let _ = h.join();
            });
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_one();
    }
}
