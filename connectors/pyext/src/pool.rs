//! `Pool`: kvbm's shared host pool, mapped into this process.
//!
//! Python wraps the mapping as a tensor (`address`, `size`) and moves block
//! bytes with its own batched copies; this object only keeps the mapping and
//! the session alive. Closing it (or dropping it) ends the session: the
//! daemon then releases its leases and reservations.

use std::path::Path;
use std::sync::RwLock;

use pyo3::prelude::*;

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
    /// (the pool socket is `socket + ".pool"`).
    #[new]
    fn attach(py: Python<'_>, socket: String) -> PyResult<Pool> {
        let path = socket.strip_prefix("unix:").unwrap_or(&socket).to_string();
        let pool = py
            .detach(|| kvtier_client::Pool::attach(Path::new(&path)))
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

    /// Unmaps the pool and ends the session. Any tensor over the mapping
    /// must be gone before this is called.
    fn close(&self) {
        if let Ok(mut p) = self.inner.write() {
            p.take();
        }
    }
}
