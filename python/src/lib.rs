//! The native part of the `vedfolnir_sessions` Python package.
//!
//! A thin binding of the library's [`SessionStore`]: every call goes to the
//! same Rust code the axum layer uses (the one fold, the one Lua script, the
//! same keys), so a Flask server and a Rust server share sessions. Python
//! never builds an event, a key or a session JSON itself.
//!
//! # Layout
//!
//! - [`runtime`]: one multi-thread tokio runtime per process, made on first
//!   use (and again in a child after `fork`); calls block on it with the GIL
//!   released.
//! - [`convert`]: JSON values to Python objects and back.
//! - [`errors`]: the exception hierarchy, mapped from [`vedfolnir_sessions::Error`].
//! - [`store`]: the `SessionStore` Python class.

mod convert;
mod errors;
mod runtime;
mod store;

use pyo3::prelude::*;

/// The session id (`hex(SHA-256(token))`) a cookie value stands for, or
/// `None` when the value is not a token this product issues (or a legacy
/// session id that `import-legacy` carried over).
#[pyfunction]
fn session_id_of(token: &str) -> Option<String> {
    vedfolnir_sessions::Token::parse(token)
        .ok()
        .map(|t| t.session_id().to_string())
}

/// The Python module `vedfolnir_sessions._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<store::PySessionStore>()?;
    m.add_function(wrap_pyfunction!(session_id_of, m)?)?;
    Ok(())
}
