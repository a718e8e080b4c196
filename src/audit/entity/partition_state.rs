//! `partition_state`: what the audit database knows about Redis, one row per
//! stream (partition).
//!
//! The healer records the Redis epoch it made complete; the audit consumer
//! records how far it has drained the stream and since when it cannot reach
//! Redis. Together they let any process tell a recovery from a fresh
//! namespace, and a current database from one that lags Redis (see
//! `docs/recovery.md`).

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// One partition's row.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "partition_state")]
pub struct Model {
    /// The partition's stream key.
    #[sea_orm(primary_key, auto_increment = false)]
    pub stream: String,
    /// The epoch of the Redis data set this database last knew complete.
    pub redis_epoch: Option<String>,
    /// When that epoch was recorded.
    pub epoch_at: Option<DateTimeUtc>,
    /// When the audit consumer last had every entry of the stream committed.
    pub drained_at: Option<DateTimeUtc>,
    /// Since when Redis is unreachable (none while it is reachable): set by
    /// the audit consumer, or by the app server that began staging writes.
    pub redis_down_since: Option<DateTimeUtc>,
    /// When a process last reported Redis reachable again.
    pub redis_up_at: Option<DateTimeUtc>,
    /// When this row was last written.
    pub updated_at: DateTimeUtc,
}

/// `partition_state` has no foreign keys.
#[derive(Clone, Copy, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
