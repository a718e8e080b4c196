//! `dead_letters`: stream entries the audit consumer could not process.
//!
//! An entry lands here when it cannot be decoded, or when the database
//! refused it on its own (written alone, for its own data). It is kept
//! verbatim so an operator can read why and retry it once the cause is fixed
//! (`vedfolnir-sessions dead-letters retry`); `(stream, stream_id)` is
//! unique, so recording the same entry twice keeps one row.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// One stream entry that was given up on.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "dead_letters")]
pub struct Model {
    /// Row number assigned by the database.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The Redis stream key the entry came from.
    #[sea_orm(unique_key = "stream_entry")]
    pub stream: String,
    /// The entry's id within that stream.
    #[sea_orm(unique_key = "stream_entry")]
    pub stream_id: String,
    /// The raw entry as a JSON object of field to value, stored as text so it
    /// is kept exactly as it was read.
    #[sea_orm(column_type = "Text")]
    pub fields: String,
    /// Why the entry was given up on.
    #[sea_orm(column_type = "Text")]
    pub reason: String,
    /// How many times the entry had been delivered when it was given up on.
    pub deliveries: i64,
    /// When this row was written.
    pub recorded_at: DateTimeUtc,
    /// The session the entry names, when it names a valid one: with `seq`,
    /// the gap it leaves in that session's history.
    pub session_id: Option<String>,
    /// The entry's `seq`, when it is a valid one.
    pub seq: Option<i64>,
    /// When an operator set it aside (`vedfolnir-sessions dead-letters
    /// discard`); `None` while it awaits a decision.
    pub discarded_at: Option<DateTimeUtc>,
}

/// `dead_letters` has no foreign keys.
#[derive(Clone, Copy, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
