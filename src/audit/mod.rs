//! The audit database: every event exactly once, each session's latest
//! snapshot, and the dead letters.
//!
//! - [`entity`]: the SeaORM entities of the tables `migrations/` creates.
//! - [`db`]: connecting, migrating, refusing a schema that is behind.
//! - [`sink`]: one transaction per batch: events, conflicts, snapshots,
//!   dead letters.
//! - [`consumer`]: the consumer group `audit` that feeds the sink from the
//!   stream, acks after commit and trims what is acked.
//! - [`history`]: reading a session's or a user's audit trail.
//! - [`outbox`]: mutations staged while Redis was unreachable, and the
//!   database's view of a session meanwhile.
//! - [`rebuild`]: refolding every snapshot from the event table.
//! - [`partition`]: per partition, the Redis epoch the database knows
//!   complete and how far the audit consumer has drained the stream.

pub mod consumer;
pub mod db;
pub mod entity;
pub mod history;
pub mod outbox;
pub mod partition;
pub mod rebuild;
pub mod sink;

pub use consumer::{AuditConsumer, ConsumerConfig};
pub use sink::{AuditSink, BatchOutcome, DeadLetter, Incoming, StreamOrigin, settle_writes};
