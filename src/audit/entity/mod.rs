//! SeaORM entities for the audit database's tables.
//!
//! These mirror the schema the `migration` crate creates; the migrations, not
//! these types, are the source of truth for the database, so a change here
//! needs a new migration alongside it.
//!
//! # Layout
//!
//! - [`session_events`]: the append-only log of every session event, unique
//!   by `event_id` and by `(session_id, seq)`.
//! - [`session_snapshots`]: one row per session with its latest folded state,
//!   byte-identical to what Redis holds.
//! - [`dead_letters`]: stream entries the audit consumer gave up on, kept
//!   verbatim.
//! - [`partition_state`]: per stream, the Redis epoch the database last knew
//!   complete and the audit consumer's progress.
//! - [`fallback_events`]: mutations staged while Redis was unreachable.
//! - [`lease_fences`]: per stream and worker role, the fencing token a
//!   worker's commits check.
//! - [`prelude`]: each table's `Entity` under the table's name, plus the
//!   column enums.

pub mod dead_letters;
pub mod fallback_events;
pub mod lease_fences;
pub mod partition_state;
pub mod session_events;
pub mod session_snapshots;

/// Each table's `Entity` under the table's name, for `use …::entity::prelude::*`.
pub mod prelude {
    pub use super::dead_letters::Entity as DeadLetters;
    pub use super::fallback_events::Entity as FallbackEvents;
    pub use super::lease_fences::Entity as LeaseFences;
    pub use super::partition_state::Entity as PartitionState;
    pub use super::session_events::{Entity as SessionEvents, EventSource};
    pub use super::session_snapshots::{Entity as SessionSnapshots, SnapshotStatus};
}
