//! The audit database: entities of the tables that `migrations/` creates.
//!
//! `session_events` keeps every event exactly once, `session_snapshots` the
//! latest folded state of each session, `dead_letters` the stream entries
//! that could not be decoded.

pub mod entity;
