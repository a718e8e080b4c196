//! Event-sourced web sessions on Redis Streams.
//!
//! Every session mutation is an [`event::Event`] appended to a Redis Stream;
//! the `vedfolnir:session:<id>` keys are the projection of that log, written
//! in the same atomic script as the append. A consumer group feeds the log
//! into an audit database that keeps the full history and can rebuild every
//! session after Redis loses its data.
//!
//! # Layout
//!
//! - [`demo`]: the scripted day, the loss of Redis data and the healing.
//! - [`config`]: environment variables, defaults and validation.
//! - [`id`]: cookie tokens and the `hex(SHA-256(token))` session ids.
//! - [`time`]: the microsecond RFC 3339 timestamps of the JSON and the log.
//! - [`event`]: the event envelope, the six event types, the stream codec and
//!   schema upcasting.
//! - [`session`]: session state and the one fold, [`session::Session::apply`].
//! - [`keys`]: the Redis key layout.
//! - [`store`]: the write path (one Lua script per mutation) and the read path.
//! - [`recovery`]: replay into Redis, point-in-time state, verify.
//! - [`legacy`]: importing the Vedfolnir application's previous sessions.
//! - [`reaper`]: the expiry reaper (`expired` events from the expiry index).
//! - [`worker`]: the worker process: audit consumer and reaper.
//! - [`telemetry`]: trace context carried into events.
//! - [`audit`]: the audit database entities.
//! - [`mod@bench`]: the benchmarks behind `vedfolnir-sessions bench`.
//! - [`cli`]: the operator CLI behind the `vedfolnir-sessions` binary.
//! - [`error`]: the error type.
//! - `web` (feature `web`, on by default): the tower layer, the axum
//!   extractor and the tower-sessions adapter.
//!
//! # Example
//!
//! ```no_run
//! use vedfolnir_sessions::{Changes, Config, NewSession, SessionStore};
//!
//! # async fn run() -> vedfolnir_sessions::Result<()> {
//! let store = SessionStore::connect(&Config::from_env()?).await?;
//! let created = store.create(NewSession::for_user(1, "admin").with("role", "admin")).await?;
//! // created.token goes into the cookie; only created.session_id is stored.
//! store.update(&created.session_id, Changes::new().with_set("theme", "dark")).await?;
//! let session = store.load(&created.session_id).await?;
//! assert_eq!(session.and_then(|s| s.get("theme").cloned()), Some("dark".into()));
//! # Ok(()) }
//! ```

pub mod audit;
pub mod bench;
pub mod cli;
pub mod config;
pub mod conn;
pub mod demo;
pub mod error;
pub mod event;
pub mod id;
pub mod keys;
pub mod lease;
pub mod legacy;
pub mod reaper;
pub mod recovery;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod time;
#[cfg(feature = "web")]
pub mod web;
pub mod worker;

pub use config::Config;
pub use error::{Error, Result};
pub use event::{DestroyReason, Event, EventKind, Import, Platform};
pub use id::{SessionId, Token};
pub use session::{Changes, NewSession, Session, Status};
pub use store::{Created, SessionStore};

/// The README's code blocks, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme {}
