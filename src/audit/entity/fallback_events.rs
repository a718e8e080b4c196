//! `fallback_events`: mutations accepted while Redis was unreachable, staged
//! until they are projected through Redis (see `docs/recovery.md`).

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// One staged event.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "fallback_events")]
pub struct Model {
    /// Staging order.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The event's idempotency key, kept when it reaches the stream.
    #[sea_orm(unique)]
    pub event_id: Uuid,
    /// The stream (partition) it will be appended to.
    pub stream: String,
    /// The session.
    #[sea_orm(column_type = "String(StringLen::N(64))")]
    pub session_id: String,
    /// Its place in the database's view of the session while staged; the
    /// stream gives it its final `seq`.
    pub seq: i64,
    /// `created`, `updated`, `touched`, `platform_switched` or `destroyed`.
    pub event_type: String,
    /// The session's user after the event.
    pub user_id: Option<String>,
    /// The writer's clock when the event was made.
    pub occurred_at: DateTimeUtc,
    /// Event schema version.
    pub schema_version: i32,
    /// The payload object, as text.
    #[sea_orm(column_type = "Text")]
    pub payload: String,
    /// W3C trace context of the request that caused it.
    pub traceparent: Option<String>,
    /// The Redis attempt before it failed without saying whether Redis
    /// applied it; the projection looks for the event in the stream first.
    pub unsure: bool,
    /// When it was staged (database clock of the writer).
    pub recorded_at: DateTimeUtc,
}

/// `fallback_events` has no foreign keys.
#[derive(Clone, Copy, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
