//! Event-sourced web sessions on Redis Streams.
//!
//! Every session mutation is an [`event::Event`] appended to a Redis Stream;
//! the `vedfolnir:session:<id>` keys are the projection of that log, written
//! in the same atomic script as the append. A consumer group feeds the log
//! into an audit database that keeps the full history and can rebuild every
//! session after Redis loses its data.
//!
//! # Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `axum` | yes | the tower layer and the axum extractor (`web::SessionLayer`, `web::Session`) |
//! | `tls` | yes | TLS to Redis with rustls (`rediss://`, `REDIS_SSL=true`) |
//! | `tower-sessions` | no | the tower-sessions adapter (`web::TowerSessionsStore`) |
//! | `audit` | no | the audit database: sink, consumer, recovery, the fallback, `DB_SESSION_SYNC` (sea-orm) |
//! | `tracing-opentelemetry` | no | events carry the `traceparent` of the current `tracing` span |
//!
//! Without `audit` the store does everything Redis alone can: every
//! mutation, the event stream, the expiry reaper. `docs/design.md` explains
//! what each part is for and how the workspace's crates fit together.
//!
//! # Layout
//!
//! - [`config`]: environment variables, defaults and validation.
//! - [`conn`]: the Redis connection (standalone or cluster).
//! - [`id`]: cookie tokens and the `hex(SHA-256(token))` session ids.
//! - [`time`]: the microsecond RFC 3339 timestamps of the JSON and the log.
//! - [`event`]: the event envelope, the six event types, the stream codec and
//!   schema upcasting.
//! - [`session`]: the stored state and the one fold, [`session::Record::apply`].
//! - [`keys`]: the Redis key layout.
//! - [`store`]: the write path (one Lua script per mutation) and the read path.
//! - [`legacy`]: importing the Vedfolnir application's previous sessions.
//! - [`reaper`]: the expiry reaper (`expired` events from the expiry index).
//! - [`lease`]: which worker process runs which role on which partition.
//! - [`telemetry`]: trace context carried into events, and the metrics.
//! - [`error`]: the error type.
//! - `audit` (feature `audit`): the audit database, its sink and consumer.
//! - `recovery` (feature `audit`): replay into Redis, point-in-time state,
//!   verify, the healer.
//! - `web` (features `axum`, `tower-sessions`): the tower layer, the axum
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

#![warn(missing_docs, unreachable_pub)]

#[cfg(feature = "audit")]
pub mod audit;
pub mod config;
pub mod conn;
pub mod error;
pub mod event;
pub mod id;
pub mod keys;
pub mod lease;
pub mod legacy;
pub mod reaper;
#[cfg(feature = "audit")]
pub mod recovery;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod time;
#[cfg(any(feature = "axum", feature = "tower-sessions"))]
pub mod web;

pub use config::Config;
pub use error::{Error, Result};
pub use event::{DestroyReason, Event, EventKind, Import, Platform};
pub use id::{SessionId, Token};
pub use session::{Changes, NewSession, Record, Status};
pub use store::{Created, SessionStore};
