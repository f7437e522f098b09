//! `kvtier._kvtier`: the kvbm client for Python.
//!
//! - [`client`]: `Client`, synchronous calls of the kvbm API that release the
//!   GIL, run on one process-wide tokio runtime, carry a deadline each and
//!   reconnect after a failure.
//! - [`pool`]: `Pool`, the daemon's shared host pool mapped into this
//!   process (session id, base address, length).
//! - [`events`]: `EventStream`, a background subscription to the daemon's
//!   block events that Python drains without blocking.
//! - [`runtime`]: the process-wide runtime.
//! - [`cost`]: `CostModel`, whether loading a cached prefix beats
//!   recomputing it.
//!
//! Errors surface as `KvbmError` (the daemon answered with an error) and its
//! subclass `KvbmUnavailable` (no connection, timeout, daemon restarting).

mod client;
mod cost;
mod events;
mod pool;
mod runtime;

use pyo3::prelude::*;

pyo3::create_exception!(_kvtier, KvbmError, pyo3::exceptions::PyException);
pyo3::create_exception!(_kvtier, KvbmUnavailable, KvbmError);

#[pymodule]
fn _kvtier(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("KvbmError", py.get_type::<KvbmError>())?;
    m.add("KvbmUnavailable", py.get_type::<KvbmUnavailable>())?;
    m.add_class::<client::Client>()?;
    m.add_class::<pool::Pool>()?;
    m.add_class::<events::EventStream>()?;
    m.add_class::<cost::CostModel>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
