//! `Client`: synchronous kvbm calls for Python.
//!
//! Every call releases the GIL, runs on the process-wide runtime and carries
//! a deadline (`timeout_ms`). A transport failure or a timeout drops the
//! connection and raises `KvbmUnavailable`; the next call reconnects, but
//! after a failed connect no new attempt is made for `retry_ms`, so a dead
//! daemon costs callers one fast error, not a connect per call.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvtier_client::v1;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use tonic::Code;

use crate::{runtime, KvbmError, KvbmUnavailable};

/// What a failed call is, before it becomes a Python exception.
pub(crate) enum CallError {
    /// No connection, a broken one, or the deadline passed.
    Unavailable(String),
    /// The daemon answered with an error status.
    Daemon(String),
}

impl CallError {
    pub(crate) fn from_status(s: tonic::Status) -> CallError {
        let msg = format!("kvbm {:?}: {}", s.code(), s.message());
        match s.code() {
            // `Unknown` is how tonic reports transport failures on a call.
            Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Unknown => {
                CallError::Unavailable(msg)
            }
            _ => CallError::Daemon(msg),
        }
    }

    pub(crate) fn into_py(self) -> PyErr {
        match self {
            CallError::Unavailable(m) => KvbmUnavailable::new_err(m),
            CallError::Daemon(m) => KvbmError::new_err(m),
        }
    }
}

/// A failed pool-socket call: a daemon status keeps its meaning; anything
/// else (a broken session, a timeout) means kvbm is unavailable.
impl From<kvtier_client::Error> for CallError {
    fn from(e: kvtier_client::Error) -> CallError {
        match e {
            kvtier_client::Error::Status(s) => CallError::from_status(s),
            other => CallError::Unavailable(other.to_string()),
        }
    }
}

/// The pool-socket session that answers `lookup` when the daemon is on a
/// Unix socket: binary frames, no gRPC (see `kvtier_proto::session`).
#[derive(Default)]
struct Fast {
    session: Option<kvtier_client::Session>,
    /// After a failed connect: no new attempt before this instant.
    retry_at: Option<Instant>,
}

#[derive(Default)]
struct Conn {
    client: Option<kvtier_client::Rpc>,
    /// After a failed connect: no new attempt before this instant.
    retry_at: Option<Instant>,
}

/// A connection to one kvbm daemon (`/path/to/kvbm.sock`, `unix:/path` or
/// `http://host:port`), opened lazily and reopened after failures.
#[pyclass(frozen, module = "kvtier._kvtier")]
pub struct Client {
    addr: String,
    timeout: Duration,
    retry: Duration,
    conn: Mutex<Conn>,
    /// The daemon's Unix socket, when `addr` names one.
    unix: Option<PathBuf>,
    fast: Mutex<Fast>,
    connects: AtomicU64,
    failures: AtomicU64,
}

impl Client {
    /// The gRPC client, connecting first when there is none.
    fn rpc(&self) -> Result<kvtier_client::Rpc, CallError> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| CallError::Unavailable("client state poisoned".into()))?;
        if let Some(c) = &conn.client {
            return Ok(c.clone());
        }
        self.check_backoff(conn.retry_at)?;
        let rt = runtime::get().map_err(CallError::Unavailable)?;
        let addr = self.addr.clone();
        let res = rt.block_on(async {
            tokio::time::timeout(self.timeout, kvtier_client::Client::connect(&addr)).await
        });
        match res {
            Ok(Ok(c)) => {
                self.connects.fetch_add(1, Ordering::Relaxed);
                let rpc = c.rpc();
                conn.client = Some(rpc.clone());
                conn.retry_at = None;
                Ok(rpc)
            }
            Ok(Err(e)) => {
                conn.retry_at = Some(Instant::now() + self.retry);
                Err(CallError::Unavailable(e.to_string()))
            }
            Err(_) => {
                conn.retry_at = Some(Instant::now() + self.retry);
                Err(CallError::Unavailable(format!(
                    "connecting to kvbm at {} timed out",
                    self.addr
                )))
            }
        }
    }

    /// Refuses to dial again before `retry_at` (set by a failed connect).
    fn check_backoff(&self, retry_at: Option<Instant>) -> Result<(), CallError> {
        match retry_at {
            Some(at) if Instant::now() < at => Err(CallError::Unavailable(format!(
                "kvbm at {} unreachable; next attempt in {:?}",
                self.addr,
                at.saturating_duration_since(Instant::now())
            ))),
            _ => Ok(()),
        }
    }

    /// Lookup over the pool socket's session, (re)connecting it as needed.
    fn fast_lookup(
        &self,
        socket: &Path,
        namespace: &str,
        keys: &[u8],
        key_len: usize,
    ) -> Result<kvtier_client::LookupCounts, CallError> {
        let mut fast = self
            .fast
            .lock()
            .map_err(|_| CallError::Unavailable("client state poisoned".into()))?;
        let session = match &mut fast.session {
            Some(s) => s,
            None => {
                self.check_backoff(fast.retry_at)?;
                match kvtier_client::Session::connect(socket, Some(self.timeout)) {
                    Ok(s) => {
                        fast.retry_at = None;
                        fast.session.insert(s)
                    }
                    Err(e) => {
                        fast.retry_at = Some(Instant::now() + self.retry);
                        return Err(CallError::Unavailable(e.to_string()));
                    }
                }
            }
        };
        // `chunks` of an empty buffer yields nothing; otherwise the buffer
        // is a whole number of `key_len` keys.
        match session.lookup(namespace, keys.chunks(key_len.max(1))) {
            Ok(c) => Ok(c),
            Err(e) => {
                let e = CallError::from(e);
                if let CallError::Unavailable(_) = e {
                    fast.session = None;
                }
                Err(e)
            }
        }
    }

    /// Forgets the connection after a transport failure.
    fn reset(&self) {
        if let Ok(mut conn) = self.conn.lock() {
            conn.client = None;
        }
    }

    /// Runs one call with the GIL released and the deadline applied.
    fn call<T, F, Fut>(&self, py: Python<'_>, f: F) -> PyResult<T>
    where
        T: Send,
        F: FnOnce(kvtier_client::Rpc) -> Fut + Send,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let res = py.detach(|| {
            let rpc = self.rpc()?;
            let rt = runtime::get().map_err(CallError::Unavailable)?;
            match rt.block_on(async { tokio::time::timeout(self.timeout, f(rpc)).await }) {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(status)) => Err(CallError::from_status(status)),
                Err(_) => Err(CallError::Unavailable(format!(
                    "kvbm call timed out after {:?}",
                    self.timeout
                ))),
            }
        });
        res.map_err(|e| {
            if let CallError::Unavailable(_) = e {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.reset();
            }
            e.into_py()
        })
    }
}

/// Copies a Python sequence of equally long `bytes` into one buffer:
/// `(keys back to back, key length)`.
fn flat_keys(keys: &Bound<'_, PyAny>) -> PyResult<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut key_len = None;
    let mut push = |k: Bound<'_, PyAny>| -> PyResult<()> {
        let b = k.cast::<PyBytes>()?.as_bytes();
        if *key_len.get_or_insert(b.len()) != b.len() {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "lookup: keys of one chain must have one length",
            ));
        }
        out.extend_from_slice(b);
        Ok(())
    };
    if let Ok(list) = keys.cast::<PyList>() {
        for k in list.iter() {
            push(k)?;
        }
    } else {
        for k in keys.try_iter()? {
            push(k?)?;
        }
    }
    Ok((out, key_len.unwrap_or(0)))
}

/// Copies a Python sequence of `bytes` (vLLM's `BlockHash`es) into keys.
pub(crate) fn keys_of(keys: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<u8>>> {
    if let Ok(list) = keys.cast::<PyList>() {
        let mut out = Vec::with_capacity(list.len());
        for k in list.iter() {
            out.push(k.cast::<PyBytes>()?.as_bytes().to_vec());
        }
        return Ok(out);
    }
    let mut out = Vec::new();
    for k in keys.try_iter()? {
        out.push(k?.cast::<PyBytes>()?.as_bytes().to_vec());
    }
    Ok(out)
}

fn slots_of(slots: Vec<v1::Slot>) -> Vec<(u64, u64)> {
    slots.into_iter().map(|s| (s.offset, s.length)).collect()
}

fn layout_of(d: &Bound<'_, PyDict>) -> PyResult<v1::Layout> {
    fn get<'py, T: for<'a> FromPyObject<'a, 'py>>(
        d: &Bound<'py, PyDict>,
        k: &str,
    ) -> PyResult<Option<T>> {
        match d.get_item(k)? {
            Some(v) => Ok(Some(v.extract::<T>().map_err(Into::into)?)),
            None => Ok(None),
        }
    }
    Ok(v1::Layout {
        model: get(d, "model")?.unwrap_or_default(),
        num_layers: get(d, "num_layers")?.unwrap_or_default(),
        num_kv_heads: get(d, "num_kv_heads")?.unwrap_or_default(),
        head_dim: get(d, "head_dim")?.unwrap_or_default(),
        dtype: get(d, "dtype")?.unwrap_or_default(),
        tokens_per_block: get(d, "tokens_per_block")?.unwrap_or_default(),
        tp_rank: get(d, "tp_rank")?.unwrap_or_default(),
        tp_world: get(d, "tp_world")?.unwrap_or_default(),
        extra: get(d, "extra")?.unwrap_or_default(),
    })
}

fn tier_name(t: i32) -> &'static str {
    match v1::Tier::try_from(t) {
        Ok(v1::Tier::Gpu) => "gpu",
        Ok(v1::Tier::Host) => "host",
        Ok(v1::Tier::Disk) => "disk",
        Ok(v1::Tier::Remote) => "remote",
        _ => "unspecified",
    }
}

/// What `Client.acquire` returns: `(lease, [(offset, length)], from_disk)`.
type Acquired = (u64, Vec<(u64, u64)>, u32);

#[pymethods]
impl Client {
    /// `addr`: the daemon's Unix socket path (or `unix:/path`, or
    /// `http://host:port`). Nothing is dialled until the first call.
    #[new]
    #[pyo3(signature = (addr, timeout_ms = 1000, retry_ms = 1000))]
    fn new(addr: String, timeout_ms: u64, retry_ms: u64) -> Client {
        Client {
            timeout: Duration::from_millis(timeout_ms.max(1)),
            retry: Duration::from_millis(retry_ms),
            conn: Mutex::new(Conn::default()),
            unix: kvtier_client::unix_socket_path(&addr),
            fast: Mutex::new(Fast::default()),
            connects: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            addr,
        }
    }

    #[getter]
    fn addr(&self) -> &str {
        &self.addr
    }

    /// Successful connects so far (1 + reconnects).
    #[getter]
    fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Calls that failed for want of a working daemon.
    #[getter]
    fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Whether a connection is open now (it may still be broken).
    #[getter]
    fn connected(&self) -> bool {
        self.conn
            .lock()
            .map(|c| c.client.is_some())
            .unwrap_or(false)
    }

    /// Connects now (raises `KvbmUnavailable` when it cannot), ignoring the
    /// retry back-off.
    fn connect(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            if let Ok(mut c) = self.conn.lock() {
                c.retry_at = None;
            }
            if let Ok(mut f) = self.fast.lock() {
                f.retry_at = None;
            }
            self.rpc().map(|_| ())
        })
        .map_err(CallError::into_py)
    }

    /// Registers (or finds) namespace `name`; `layout` is a dict with the
    /// `Layout` message's fields. Returns `{name, id, block_bytes}`.
    fn register_namespace<'py>(
        &self,
        py: Python<'py>,
        name: String,
        block_bytes: u64,
        layout: &Bound<'py, PyDict>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let layout = layout_of(layout)?;
        let ns = self.call(py, |mut c| async move {
            let r = c
                .register_namespace(v1::RegisterNamespaceRequest {
                    name,
                    block_bytes,
                    layout: Some(layout),
                })
                .await?;
            r.into_inner()
                .namespace
                .ok_or_else(|| tonic::Status::internal("reply without a namespace"))
        })?;
        let d = PyDict::new(py);
        d.set_item("name", ns.name)?;
        d.set_item("id", ns.id)?;
        d.set_item("block_bytes", ns.block_bytes)?;
        Ok(d)
    }

    /// Length of the longest prefix of the `keys` chain present in any tier.
    /// On a Unix socket this goes over the pool socket's binary fast path
    /// (the scheduler calls it once per new request); over TCP, gRPC.
    fn lookup(&self, py: Python<'_>, namespace: String, keys: &Bound<'_, PyAny>) -> PyResult<u32> {
        Ok(self.lookup_counts(py, namespace, keys)?.0)
    }

    /// `(matched, host, disk, local)`: the longest prefix present in any
    /// tier, the longest held in host memory and on disk, and the longest
    /// held on the daemon's node (host memory or disk): blocks
    /// `[local, matched)` are only in the shared object store (G4). Through
    /// the pool socket's binary Lookup when the daemon is local.
    fn lookup_counts(
        &self,
        py: Python<'_>,
        namespace: String,
        keys: &Bound<'_, PyAny>,
    ) -> PyResult<(u32, u32, u32, u32)> {
        let tuple = |c: kvtier_client::LookupCounts| (c.matched, c.host, c.disk, c.local);
        if let Some(socket) = &self.unix {
            let (flat, key_len) = flat_keys(keys)?;
            return py
                .detach(|| self.fast_lookup(socket, &namespace, &flat, key_len))
                .map(tuple)
                .map_err(|e| {
                    if let CallError::Unavailable(_) = e {
                        self.failures.fetch_add(1, Ordering::Relaxed);
                    }
                    e.into_py()
                });
        }
        let keys = keys_of(keys)?;
        let r = self.call(py, |mut c| async move {
            Ok(c.lookup(v1::LookupRequest { namespace, keys })
                .await?
                .into_inner())
        })?;
        Ok(tuple(kvtier_client::LookupCounts::from(&r)))
    }

    /// `(matched, {tier: prefix blocks}, [fastest tier of each matched
    /// block])`, tiers named `host`, `disk`, `remote`, `gpu`.
    fn lookup_tiers<'py>(
        &self,
        py: Python<'py>,
        namespace: String,
        keys: &Bound<'py, PyAny>,
    ) -> PyResult<(u32, Bound<'py, PyDict>, Vec<&'static str>)> {
        let keys = keys_of(keys)?;
        let r = self.call(py, |mut c| async move {
            Ok(c.lookup(v1::LookupRequest { namespace, keys })
                .await?
                .into_inner())
        })?;
        let tiers = PyDict::new(py);
        for t in &r.tiers {
            tiers.set_item(tier_name(t.tier), t.blocks)?;
        }
        let locations = r.locations.iter().map(|&t| tier_name(t)).collect();
        Ok((r.matched, tiers, locations))
    }

    // Reserve, Commit and Abort are `Pool` methods: they run on the pool's
    // own session, over the pool socket's binary frames.

    /// Leases the longest present prefix of `keys` in the pool:
    /// `(lease, [(offset, length)], from_disk)`: lease 0 when nothing was
    /// leased; `from_disk`, the leased blocks that had to be read from disk.
    fn acquire(
        &self,
        py: Python<'_>,
        session: u64,
        namespace: String,
        keys: &Bound<'_, PyAny>,
    ) -> PyResult<Acquired> {
        let keys = keys_of(keys)?;
        self.call(py, |mut c| async move {
            let r = c
                .acquire(v1::AcquireRequest {
                    session,
                    namespace,
                    keys,
                })
                .await?
                .into_inner();
            Ok((r.lease, slots_of(r.slots), r.from_disk))
        })
    }

    /// Ends a lease.
    fn release(&self, py: Python<'_>, session: u64, lease: u64) -> PyResult<()> {
        self.call(py, |mut c| async move {
            c.release(v1::ReleaseRequest { session, lease }).await?;
            Ok(())
        })
    }

    /// Drops blocks from every tier; returns how many were dropped.
    fn evict(&self, py: Python<'_>, namespace: String, keys: &Bound<'_, PyAny>) -> PyResult<u32> {
        let keys = keys_of(keys)?;
        self.call(py, |mut c| async move {
            Ok(c.evict(v1::EvictRequest { namespace, keys })
                .await?
                .into_inner()
                .evicted)
        })
    }

    /// Drops the unpinned blocks of `namespace` (every namespace when
    /// empty) from `tier` (`host`, `disk`, or all tiers when `None`);
    /// returns how many copies went.
    #[pyo3(signature = (namespace = String::new(), tier = None))]
    fn clear(&self, py: Python<'_>, namespace: String, tier: Option<&str>) -> PyResult<u64> {
        let tier = match tier {
            None => v1::Tier::Unspecified,
            Some("host") => v1::Tier::Host,
            Some("disk") => v1::Tier::Disk,
            Some(t) => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "tier must be 'host', 'disk' or None, not {t:?}"
                )))
            }
        } as i32;
        self.call(py, |mut c| async move {
            Ok(c.clear(v1::ClearRequest { tier, namespace })
                .await?
                .into_inner()
                .removed)
        })
    }

    /// Waits until write-behind is durable; returns the durable block count.
    fn sync(&self, py: Python<'_>) -> PyResult<u64> {
        self.call(py, |mut c| async move {
            Ok(c.sync(v1::SyncRequest::default())
                .await?
                .into_inner()
                .durable_blocks)
        })
    }

    /// The daemon's `Stats` as a dict; `tiers` maps a tier name to its
    /// counters.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.call(py, |mut c| async move {
            Ok(c.stats(v1::StatsRequest {}).await?.into_inner())
        })?;
        let d = PyDict::new(py);
        d.set_item("incarnation", s.incarnation)?;
        d.set_item("event_seq", s.event_seq)?;
        d.set_item("namespaces", s.namespaces)?;
        d.set_item("index_blocks", s.index_blocks)?;
        d.set_item("index_bytes", s.index_bytes)?;
        let tiers = PyDict::new(py);
        for t in s.tiers {
            let td = PyDict::new(py);
            td.set_item("capacity_bytes", t.capacity_bytes)?;
            td.set_item("used_bytes", t.used_bytes)?;
            td.set_item("blocks", t.blocks)?;
            td.set_item("hits", t.hits)?;
            td.set_item("misses", t.misses)?;
            td.set_item("evictions", t.evictions)?;
            td.set_item("dropped_writes", t.dropped_writes)?;
            td.set_item("checksum_failures", t.checksum_failures)?;
            td.set_item("degraded", t.degraded)?;
            td.set_item("degraded_reason", t.degraded_reason)?;
            td.set_item("read_bytes_per_s", t.read_bytes_per_s)?;
            td.set_item("write_bytes_per_s", t.write_bytes_per_s)?;
            tiers.set_item(tier_name(t.tier), td)?;
        }
        d.set_item("tiers", tiers)?;
        Ok(d)
    }

    /// Stores one block by copy (tests and tools; engines use the pool).
    fn put(
        &self,
        py: Python<'_>,
        namespace: String,
        key: &[u8],
        parent: &[u8],
        data: &[u8],
    ) -> PyResult<bool> {
        let (key, parent, data) = (key.to_vec(), parent.to_vec(), data.to_vec());
        self.call(py, |mut c| async move {
            Ok(c.put(v1::PutRequest {
                namespace,
                block: Some(v1::BlockMeta {
                    key,
                    parent,
                    token_ids: Vec::new(),
                }),
                data,
            })
            .await?
            .into_inner()
            .stored)
        })
    }

    /// Reads one block by copy; `None` on a miss.
    fn get<'py>(
        &self,
        py: Python<'py>,
        namespace: String,
        key: &[u8],
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let key = key.to_vec();
        let r = self.call(py, |mut c| async move {
            match c.get(v1::GetRequest { namespace, key }).await {
                Ok(r) => Ok(Some(r.into_inner().data)),
                Err(s) if s.code() == Code::NotFound => Ok(None),
                Err(s) => Err(s),
            }
        })?;
        Ok(r.map(|d| PyBytes::new(py, &d)))
    }
}
