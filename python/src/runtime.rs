//! The tokio runtime the store runs on.
//!
//! One current-thread tokio runtime per process, made on first use: the
//! thread that calls drives the runtime itself (the Redis connection's
//! reads and writes, its timers) while it waits, so a call costs no hand-off
//! to another thread, which on a busy machine costs more than the round trip
//! to Redis. Python threads that call at once share it: one drives, the
//! others are woken when their answer is in. A process that forks after
//! using it (a pre-forking WSGI server that imported the app first) must
//! not use the parent's runtime or connections: the runtime is remembered
//! with the process id that made it, and a child makes its own. Every
//! blocking call releases the GIL while it waits, so other Python threads
//! run meanwhile.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tokio::runtime::Runtime;

static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);

/// This process's runtime, made on first use.
pub(crate) fn get() -> PyResult<Arc<Runtime>> {
    let pid = std::process::id();
    let mut slot = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((owner, rt)) = slot.as_ref()
        && *owner == pid
    {
        return Ok(rt.clone());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the tokio runtime: {e}")))?;
    let rt = Arc::new(rt);
    if let Some((_, inherited)) = slot.replace((pid, rt.clone())) {
        // The parent's runtime: its blocking threads do not exist in this
        // process, and a shutdown would wait for them; it is left as it is.
        let _ = std::mem::ManuallyDrop::new(inherited);
    }
    Ok(rt)
}

/// Runs a future to completion on the runtime with the GIL released.
pub(crate) fn block_on<F>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let rt = get()?;
    Ok(py.detach(move || rt.block_on(fut)))
}
