//! The exceptions, one per kind of failure a caller handles differently.
//!
//! ```text
//! VedfolnirSessionError
//! ├── ConflictError          concurrent writers outlasted SESSION_MAX_RETRIES (Conflict)
//! │   └── StaleReadError     a value the change was computed from changed (StaleRead)
//! ├── SessionEndedError      no live session: destroyed, expired or unknown
//! ├── TooLargeError          over SESSION_MAX_BYTES; nothing was written
//! ├── StoreUnavailableError  Redis unreachable (and no fallback could serve), or
//! │                          the audit database the store writes through failed
//! ├── InvalidInputError      a reserved key, a bad id, a value that is not JSON
//! └── ConfigError            a bad environment variable
//! ```

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use vedfolnir_sessions::Error;

create_exception!(
    vedfolnir_sessions,
    VedfolnirSessionError,
    PyException,
    "Base class of every error of the session store."
);
create_exception!(
    vedfolnir_sessions,
    ConflictError,
    VedfolnirSessionError,
    "Concurrent writers kept changing the session, or a value the change was computed from changed meanwhile; nothing was written."
);
create_exception!(
    vedfolnir_sessions,
    StaleReadError,
    ConflictError,
    "A value the change was computed from was changed by a concurrent write; nothing was written. Retry from a fresh read."
);
create_exception!(
    vedfolnir_sessions,
    SessionEndedError,
    VedfolnirSessionError,
    "The session was destroyed, expired or never existed; it can never be written again."
);
create_exception!(
    vedfolnir_sessions,
    TooLargeError,
    VedfolnirSessionError,
    "The session would exceed SESSION_MAX_BYTES; nothing was written."
);
create_exception!(
    vedfolnir_sessions,
    StoreUnavailableError,
    VedfolnirSessionError,
    "Redis could not be reached, and no audit database fallback could serve the call."
);
create_exception!(
    vedfolnir_sessions,
    InvalidInputError,
    VedfolnirSessionError,
    "The call asked for something invalid: a key the store maintains, a malformed id, a value that is not JSON."
);
create_exception!(
    vedfolnir_sessions,
    ConfigError,
    VedfolnirSessionError,
    "A configuration variable has a value that cannot be used; the message names it."
);

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add(
        "VedfolnirSessionError",
        py.get_type::<VedfolnirSessionError>(),
    )?;
    m.add("ConflictError", py.get_type::<ConflictError>())?;
    m.add("StaleReadError", py.get_type::<StaleReadError>())?;
    m.add("SessionEndedError", py.get_type::<SessionEndedError>())?;
    m.add("TooLargeError", py.get_type::<TooLargeError>())?;
    m.add(
        "StoreUnavailableError",
        py.get_type::<StoreUnavailableError>(),
    )?;
    m.add("InvalidInputError", py.get_type::<InvalidInputError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    Ok(())
}

/// The Python exception for a library error. The message is the error's
/// own text, which never holds a token or a password.
pub(crate) fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    if e.is_unavailable() {
        return StoreUnavailableError::new_err(msg);
    }
    match e {
        Error::Conflict { .. } => ConflictError::new_err(msg),
        Error::StaleRead { .. } => StaleReadError::new_err(msg),
        Error::Database(_) | Error::DataLost { .. } => StoreUnavailableError::new_err(msg),
        Error::NotFound(_) | Error::Ended { .. } => SessionEndedError::new_err(msg),
        Error::TooLarge { .. } => TooLargeError::new_err(msg),
        Error::InvalidInput(_) => InvalidInputError::new_err(msg),
        Error::Config(_) => ConfigError::new_err(msg),
        _ => VedfolnirSessionError::new_err(msg),
    }
}

/// An invalid argument, as [`InvalidInputError`].
pub(crate) fn invalid(msg: impl Into<String>) -> PyErr {
    InvalidInputError::new_err(msg.into())
}
