//! `Pool`: kvbm's shared host pool, mapped into this process.
//!
//! Python wraps the mapping as a tensor (`address`, `size`) and moves block
//! bytes with its own batched copies; this object only keeps the mapping and
//! the session alive. Closing it (or dropping it) ends the session: the
//! daemon then releases its leases and reservations.

use std::sync::RwLock;

use pyo3::prelude::*;

use crate::client::{keys_of, CallError};
use crate::KvbmUnavailable;

#[pyclass(frozen, module = "kvtier._kvtier")]
pub struct Pool {
    inner: RwLock<Option<kvtier_client::Pool>>,
    session: u64,
    address: usize,
    size: usize,
}

#[pymethods]
impl Pool {
    /// Attaches the pool of the daemon whose gRPC Unix socket is `socket`
    /// (the pool socket is `socket + ".pool"`). `timeout_ms` bounds each of
    /// the session's calls (`reserve`, `commit`, `abort`); one that times
    /// out breaks the session (`alive` turns false).
    #[new]
    #[pyo3(signature = (socket, timeout_ms = 2000))]
    fn attach(py: Python<'_>, socket: String, timeout_ms: u64) -> PyResult<Pool> {
        let path = kvtier_client::unix_socket_path(&socket).ok_or_else(|| {
            KvbmUnavailable::new_err(format!("the pool needs kvbm's Unix socket, not {socket}"))
        })?;
        let timeout = Some(std::time::Duration::from_millis(timeout_ms.max(1)));
        let pool = py
            .detach(|| kvtier_client::Pool::attach_with_timeout(&path, timeout))
            .map_err(|e| KvbmUnavailable::new_err(e.to_string()))?;
        Ok(Pool {
            session: pool.session(),
            address: pool.as_ptr() as usize,
            size: pool.len(),
            inner: RwLock::new(Some(pool)),
        })
    }

    /// The session id for Reserve/Commit/Abort/Acquire/Release.
    #[getter]
    fn session(&self) -> u64 {
        self.session
    }

    /// Base address of the mapping (valid until `close`).
    #[getter]
    fn address(&self) -> usize {
        self.address
    }

    /// Length of the mapping in bytes.
    #[getter]
    fn size(&self) -> usize {
        self.size
    }

    /// Whether the daemon still holds the session (false after it stopped
    /// or restarted, or after `close`).
    #[getter]
    fn alive(&self) -> bool {
        self.inner
            .read()
            .map(|p| p.as_ref().is_some_and(|p| p.is_alive()))
            .unwrap_or(false)
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.read().map(|p| p.is_none()).unwrap_or(true)
    }

    /// Reserves pool slots in this session for blocks `keys` whose parents
    /// are `parents` (empty bytes for a root) and whose tokens are `tokens`,
    /// `tokens_per_block` per key in order (or none). Returns
    /// `[(offset, length)]`, length 0 for a block that needs no write. Over
    /// the pool socket's binary frames, not gRPC.
    #[pyo3(signature = (namespace, keys, parents, tokens, tokens_per_block))]
    fn reserve(
        &self,
        py: Python<'_>,
        namespace: String,
        keys: &Bound<'_, PyAny>,
        parents: &Bound<'_, PyAny>,
        tokens: Vec<u32>,
        tokens_per_block: usize,
    ) -> PyResult<Vec<(u64, u64)>> {
        let keys = keys_of(keys)?;
        let parents = keys_of(parents)?;
        self.call(py, |p| {
            p.reserve(
                &namespace,
                keys.iter().map(|k| &k[..]),
                parents.iter().map(|k| &k[..]),
                &tokens,
                tokens_per_block,
            )
        })
    }

    /// Commits this session's reserved blocks `keys`; returns how many.
    fn commit(&self, py: Python<'_>, namespace: String, keys: &Bound<'_, PyAny>) -> PyResult<u32> {
        let keys = keys_of(keys)?;
        self.call(py, |p| p.commit(&namespace, keys.iter().map(|k| &k[..])))
    }

    /// Aborts this session's reserved blocks `keys`; returns how many.
    fn abort(&self, py: Python<'_>, namespace: String, keys: &Bound<'_, PyAny>) -> PyResult<u32> {
        let keys = keys_of(keys)?;
        self.call(py, |p| p.abort(&namespace, keys.iter().map(|k| &k[..])))
    }

    /// Unmaps the pool and ends the session. Any tensor over the mapping
    /// must be gone before this is called.
    fn close(&self) {
        if let Ok(mut p) = self.inner.write() {
            p.take();
        }
    }
}

impl Pool {
    /// Runs one session call with the GIL released; a daemon error status
    /// raises `KvbmError`, a broken session or timeout `KvbmUnavailable`.
    fn call<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&kvtier_client::Pool) -> kvtier_client::Result<T> + Send,
    ) -> PyResult<T> {
        let guard = self
            .inner
            .read()
            .map_err(|_| KvbmUnavailable::new_err("pool state poisoned"))?;
        let pool = guard
            .as_ref()
            .ok_or_else(|| KvbmUnavailable::new_err("pool closed"))?;
        py.detach(|| f(pool))
            .map_err(|e| CallError::from(e).into_py())
    }
}
