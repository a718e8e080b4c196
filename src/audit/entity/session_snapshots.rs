//! `session_snapshots`: one row per session holding its latest folded state.
//!
//! Written in the same transaction as the events it folds, and only ever
//! moved forward in `seq`, so it is the audit database's answer to "what does
//! this session look like now" without replaying its history.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// The latest known state of one session.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "session_snapshots")]
pub struct Model {
    /// The session this row describes.
    #[sea_orm(
        primary_key,
        auto_increment = false,
        column_type = "String(StringLen::N(64))"
    )]
    pub session_id: String,
    /// The user the session belongs to, if anyone is logged in.
    pub user_id: Option<String>,
    /// The folded session JSON exactly as Redis holds it. Kept as text, not
    /// parsed, so it stays byte-identical and can be compared with Redis.
    #[sea_orm(column_type = "Text")]
    pub state: String,
    /// The `seq` of the last event folded into `state`.
    pub seq: i64,
    /// Whether the session is still usable.
    pub status: SnapshotStatus,
    /// When the session stops being valid; `None` if it has no expiry.
    pub expires_at: Option<DateTimeUtc>,
    /// When this row was last written.
    pub updated_at: DateTimeUtc,
}

/// A session's lifecycle state, stored as `live`, `destroyed` or `expired`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, Serialize, Deserialize,
)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
#[serde(rename_all = "snake_case")]
pub enum SnapshotStatus {
    /// In use: the session can still be loaded.
    #[sea_orm(string_value = "live")]
    Live,
    /// Ended on purpose (logout or an explicit destroy).
    #[sea_orm(string_value = "destroyed")]
    Destroyed,
    /// Ended because it passed `expires_at`.
    #[sea_orm(string_value = "expired")]
    Expired,
}

/// `session_snapshots` has no foreign keys; events are joined by `session_id`.
#[derive(Clone, Copy, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
