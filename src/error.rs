//! The library's error type.
//!
//! One enum for the whole store boundary. Conflicts, missing sessions and ended
//! sessions are distinct variants so callers can match on them: a web layer
//! turns `Ended` into a fresh anonymous session, a CLI turns `NotFound` into
//! exit code 1, and a retry loop looks for `Conflict`.

use crate::config::ConfigError;
use crate::id::SessionId;
use crate::session::Status;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in a store operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid; the inner error names the variable.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// Redis could not be reached or answered with an error.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),

    /// Redis could not be reached when connecting. `address` is where it was
    /// looked for (`host:port`, or the cluster's seed nodes), never a
    /// password.
    #[error("cannot connect to redis at {address}: {source}{hint}")]
    Connect {
        /// `host:port` (or `cluster host:port,…`).
        address: String,
        /// What the client said.
        source: redis::RedisError,
        /// What to check, when the cause is recognised (a certificate the
        /// client does not trust), else empty.
        hint: String,
    },

    /// Concurrent writers kept changing the session; the change was not applied.
    #[error("session {session_id} changed concurrently {attempts} times; giving up")]
    Conflict {
        /// The session that was contended.
        session_id: SessionId,
        /// How many attempts were made.
        attempts: u32,
    },

    /// A change was computed from a value that a concurrent write has
    /// changed since (see [`crate::Changes::expect`]); nothing was written.
    /// Retry from a fresh read, or use an operation that is re-applied on
    /// the current state ([`crate::SessionStore::modify`],
    /// [`crate::SessionStore::increment`]).
    #[error("session {session_id}: `{key}` changed since it was read; nothing was written")]
    StaleRead {
        /// The session.
        session_id: SessionId,
        /// A key whose value the change depended on.
        key: String,
    },

    /// No live session has this id (never existed or past its deadline).
    #[error("session {0} not found")]
    NotFound(SessionId),

    /// The session was destroyed or expired; it can never be written again.
    #[error("session {session_id} has ended ({status})")]
    Ended {
        /// The ended session.
        session_id: SessionId,
        /// How it ended: [`Status::Destroyed`] or [`Status::Expired`].
        status: Status,
    },

    /// The folded session is larger than `SESSION_MAX_BYTES`; nothing was written.
    #[error("session would be {size} bytes, over the limit of {max} (SESSION_MAX_BYTES)")]
    TooLarge {
        /// Size of the encoded session JSON.
        size: usize,
        /// The configured limit.
        max: usize,
    },

    /// `REDIS_WAIT_REPLICAS`: the mutation is applied on the primary, but
    /// fewer replicas acknowledged it within `REDIS_WAIT_TIMEOUT_MS`; a
    /// failover now could lose it.
    #[error("the write reached {acknowledged} of {wanted} replicas in time (REDIS_WAIT_REPLICAS)")]
    NotReplicated {
        /// Replicas asked for.
        wanted: u32,
        /// Replicas that acknowledged.
        acknowledged: u32,
    },

    /// Redis lost its data set (a restart without persistence, `FLUSHALL`)
    /// after it applied the mutation and before the audit database recorded
    /// it: the mutation is gone with the data set and was not recorded, so it
    /// did not happen. Retry it on the session as it is now.
    #[cfg(feature = "audit")]
    #[error(
        "redis lost its data before stream entry {stream_id} was audited; the write did not happen"
    )]
    DataLost {
        /// The stream entry of the lost write.
        stream_id: String,
    },

    /// The caller asked for something invalid (a reserved key, a bad id, …).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// Data read back from Redis or the stream could not be decoded.
    #[error("corrupt data: {0}")]
    Corrupt(String),

    /// The audit database's schema is not the one this build expects.
    #[cfg(feature = "audit")]
    #[error("{0}")]
    Schema(String),

    /// The database behind the audit trail failed.
    #[cfg(feature = "audit")]
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
}

impl Error {
    /// An error that reads as unavailable ([`Error::is_unavailable`]) for an
    /// operation the store cannot answer now although Redis did not fail:
    /// the web layer answers 503, and the caller may try again.
    #[cfg(feature = "audit")]
    pub(crate) fn unavailable(reason: &'static str) -> Error {
        Error::Redis(redis::RedisError::from((redis::ErrorKind::Io, reason)))
    }

    /// Whether a mutation that failed with this error (one that means Redis
    /// is unavailable) may have been applied by Redis all the same: its
    /// connection broke or timed out after the command may have been sent.
    /// A refused connection sent nothing.
    pub fn may_have_applied(&self) -> bool {
        match self {
            Error::Redis(e) => !e.is_connection_refusal(),
            _ => false,
        }
    }

    /// True when the error means Redis could not be reached at all (as
    /// opposed to Redis answering with an error).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Redis(e) | Error::Connect { source: e, .. } => {
                e.is_io_error()
                    || e.is_connection_refusal()
                    || e.is_connection_dropped()
                    || e.is_timeout()
            }
            _ => false,
        }
    }
}
