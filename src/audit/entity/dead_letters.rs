//! `dead_letters`: stream entries the audit consumer could not process.
//!
//! An entry lands here after too many deliveries or when it can never be
//! decoded. It is kept verbatim so an operator can read why and replay it once
//! the cause is fixed; `(stream, stream_id)` is unique, so recording the same
//! entry twice keeps one row.

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
}

/// `dead_letters` has no foreign keys.
#[derive(Clone, Copy, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
