//! `session_events`: one row per session event, in the order each session
//! produced them.
//!
//! The audit consumer writes a row for every event it reads from the stream;
//! an app server in fallback mode writes one directly. `event_id` makes a
//! redelivered entry a no-op (insert with `ON CONFLICT DO NOTHING`), and the
//! unique `(session_id, seq)` stops two different events from claiming the
//! same place in a session's history.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// A recorded session event.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "session_events")]
pub struct Model {
    /// Row number assigned by the database; insertion order, nothing more.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The event's own identifier, unique across all sessions.
    #[sea_orm(unique)]
    pub event_id: Uuid,
    /// The session the event belongs to.
    #[sea_orm(column_type = "String(StringLen::N(64))", unique_key = "session_seq")]
    pub session_id: String,
    /// The event's position in its session's history, starting at 1.
    #[sea_orm(unique_key = "session_seq")]
    pub seq: i64,
    /// What happened (`created`, `updated`, `destroyed`, …).
    #[sea_orm(column_type = "String(StringLen::N(32))")]
    pub event_type: String,
    /// The user the session belonged to when the event happened, if any.
    pub user_id: Option<String>,
    /// When the app server produced the event.
    pub occurred_at: DateTimeUtc,
    /// When this row was written.
    pub recorded_at: DateTimeUtc,
    /// The Redis stream entry id the event was read from; `None` when it was
    /// written directly in fallback mode.
    pub stream_id: Option<String>,
    /// Version of the event's payload format, so old rows can still be read.
    pub schema_version: i32,
    /// The event's data as JSON text, byte for byte as it was serialized;
    /// parse it with `serde_json::from_str`. Text rather than a JSON type
    /// because a `serde_json::Value` is bound as `jsonb`, which PostgreSQL
    /// normalizes (keys reordered, spacing changed) before storing.
    #[sea_orm(column_type = "Text")]
    pub payload: String,
    /// The W3C `traceparent` of the request that produced the event, if traced.
    pub traceparent: Option<String>,
    /// How the event reached the database.
    pub source: EventSource,
}

/// How an event reached the audit database, stored as `stream` or `fallback`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, Serialize, Deserialize,
)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
#[serde(rename_all = "snake_case")]
pub enum EventSource {
    /// Read from the Redis event stream by the audit consumer.
    #[sea_orm(string_value = "stream")]
    Stream,
    /// Written directly by an app server while Redis was unavailable.
    #[sea_orm(string_value = "fallback")]
    Fallback,
}

/// `session_events` has no foreign keys; sessions are joined by `session_id`.
#[derive(Clone, Copy, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
