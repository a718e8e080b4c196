//! The HTTP error of the session layer.
//!
//! [`SessionError`] is what the [`Session`](super::Session) handle's
//! operations return and what the layer answers with when it refuses a
//! request. It implements [`IntoResponse`]: the client gets a status and a
//! small JSON body (`{"error": "<code>", "message": "<text>"}`) that says
//! nothing internal; the internal detail travels in a response extension to
//! the [`SessionLayer`](super::SessionLayer), which logs it once.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::Error;

/// What went wrong with a request's session.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The request needs a session and has none (or an anonymous one where a
    /// user is needed). HTTP 401.
    #[error("no authenticated session")]
    Unauthenticated,

    /// An unsafe request without a valid CSRF token. HTTP 403.
    #[error("missing or invalid CSRF token")]
    Csrf,

    /// The session ended (logout, logout everywhere, expiry) while this
    /// request was running; its changes were not stored. HTTP 409.
    #[error("the session ended while the request was running")]
    Ended,

    /// A concurrent request changed a value this request read and based its
    /// changes on; nothing was stored (never silently merged). HTTP 409.
    /// Use [`Session::increment`](super::Session::increment) or
    /// [`Session::modify`](super::Session::modify) for changes that are
    /// re-applied on the current value instead.
    #[error("session conflict: {0}")]
    Conflict(#[source] Error),

    /// The session would exceed `SESSION_MAX_BYTES`; nothing was stored.
    /// HTTP 413.
    #[error("session data too large: {0}")]
    TooLarge(#[source] Error),

    /// Redis cannot be reached and no fallback served the request, or the
    /// audit database the store writes through failed. HTTP 503.
    #[error("session store unavailable: {0}")]
    Unavailable(#[source] Error),

    /// Concurrent writers kept changing the session. HTTP 503.
    #[error("session busy: {0}")]
    Busy(#[source] Error),

    /// The application tried to set or remove a key the store or the layer
    /// maintains (`_version`, `created_at`, `csrf_token`, …). HTTP 500: a bug
    /// in the application, not the client's fault.
    #[error("`{0}` is maintained by the session layer")]
    ReservedKey(String),

    /// The application called an operation with unusable input (a login
    /// without `user_id`). HTTP 500.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A value could not be converted to or from JSON. HTTP 500.
    #[error("session value (de)serialization: {0}")]
    Json(#[from] serde_json::Error),

    /// The [`Session`](super::Session) extractor was used on a route that is
    /// not behind a [`SessionLayer`](super::SessionLayer). HTTP 500.
    #[error("the Session extractor needs the SessionLayer")]
    LayerMissing,

    /// Any other store failure. HTTP 500.
    #[error("session store: {0}")]
    Store(#[source] Error),
}

impl SessionError {
    /// Sorts a store error into the variant a client should see.
    pub fn from_store(err: Error) -> Self {
        if err.is_unavailable() {
            return SessionError::Unavailable(err);
        }
        match err {
            #[cfg(feature = "audit")]
            Error::Database(_) | Error::DataLost { .. } => SessionError::Unavailable(err),
            Error::Ended { .. } | Error::NotFound(_) => SessionError::Ended,
            Error::StaleRead { .. } => SessionError::Conflict(err),
            Error::TooLarge { .. } => SessionError::TooLarge(err),
            Error::Conflict { .. } => SessionError::Busy(err),
            other => SessionError::Store(other),
        }
    }

    /// The HTTP status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            SessionError::Unauthenticated => StatusCode::UNAUTHORIZED,
            SessionError::Csrf => StatusCode::FORBIDDEN,
            SessionError::Ended | SessionError::Conflict(_) => StatusCode::CONFLICT,
            SessionError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            SessionError::Unavailable(_) | SessionError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            SessionError::ReservedKey(_)
            | SessionError::InvalidInput(_)
            | SessionError::Json(_)
            | SessionError::LayerMissing
            | SessionError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable error code of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            SessionError::Unauthenticated => "unauthenticated",
            SessionError::Csrf => "csrf",
            SessionError::Ended => "session_ended",
            SessionError::Conflict(_) => "session_conflict",
            SessionError::TooLarge(_) => "session_too_large",
            SessionError::Unavailable(_) => "session_store_unavailable",
            SessionError::Busy(_) => "session_busy",
            SessionError::ReservedKey(_)
            | SessionError::InvalidInput(_)
            | SessionError::Json(_)
            | SessionError::LayerMissing
            | SessionError::Store(_) => "internal",
        }
    }

    /// The text the client gets: fixed per variant, never the internal detail.
    pub fn public_message(&self) -> &'static str {
        match self {
            SessionError::Unauthenticated => "log in first",
            SessionError::Csrf => "missing or invalid X-CSRF-Token",
            SessionError::Ended => {
                "the session ended while this request was running; its changes were not saved"
            }
            SessionError::Conflict(_) => {
                "another request changed what this one read; nothing was saved, try again"
            }
            SessionError::TooLarge(_) => "the session would be too large; nothing was saved",
            SessionError::Unavailable(_) => "the session store is unavailable; try again shortly",
            SessionError::Busy(_) => "the session is busy; nothing was changed, try again",
            _ => "internal error",
        }
    }
}

/// The internal side of an error response, carried in the response's
/// extensions from [`SessionError::into_response`] to the layer, which logs
/// it once and removes it.
#[derive(Debug, Clone)]
pub(crate) struct ErrorReport {
    pub(crate) status: StatusCode,
    pub(crate) detail: String,
}

impl ErrorReport {
    /// Logs the report: server errors at `error`, a session that ended
    /// during its request at `info`, other client errors at `debug`.
    pub(crate) fn log(&self) {
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), err = %self.detail, "session request failed");
        } else if self.status == StatusCode::CONFLICT {
            tracing::info!(status = self.status.as_u16(), err = %self.detail, "session request refused");
        } else {
            tracing::debug!(status = self.status.as_u16(), err = %self.detail, "session request refused");
        }
    }
}

impl IntoResponse for SessionError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = json!({"error": self.code(), "message": self.public_message()});
        let mut res = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        res.extensions_mut().insert(ErrorReport {
            status,
            detail: self.to_string(),
        });
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_say_nothing_internal() {
        let secret_detail = crate::error::Error::Corrupt("key vedfolnir:session:abc".to_owned());
        let res = SessionError::from_store(secret_detail).into_response();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let report = res.extensions().get::<ErrorReport>().expect("report");
        assert!(report.detail.contains("vedfolnir:session:abc"));
        assert_eq!(
            SessionError::Ended.status(),
            StatusCode::CONFLICT,
            "an ended session is a conflict, not a server error"
        );
        assert_eq!(SessionError::Csrf.code(), "csrf");
    }
}
