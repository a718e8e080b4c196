//! Creates `partition_state`, one row per stream (partition) with what the
//! audit database knows about Redis as a whole.
//!
//! - `redis_epoch`: the epoch (a random id kept in Redis beside the data)
//!   of the Redis data set this database last knew to be complete. A Redis
//!   whose epoch key is missing or different lost its data since: the
//!   product is *recovering* until a replay has put the sessions back and
//!   recorded the new epoch here. A stream without a row is a fresh
//!   namespace, never a recovery.
//! - `drained_at`: the last time the audit consumer had committed every
//!   entry of the stream (nothing undelivered, nothing pending).
//! - `redis_down_since`: since when Redis is unreachable, as the audit
//!   consumer or an app server that began staging writes in the database
//!   saw it (null while it is reachable). With `drained_at`, this tells an
//!   app server whether the database holds everything Redis acknowledged
//!   before it became unreachable, which is what the fallback needs to serve
//!   from it. It is also the fence between the two ways of writing: writes
//!   to existing sessions are staged in the database only while it is set.
//! - `redis_up_at`: when a process last reported Redis reachable again after
//!   an outage; no app server opens the database for writes shortly after.

use sea_orm_migration::prelude::*;

/// Creates the `partition_state` table.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(PartitionState::Table)
                    .col(
                        ColumnDef::new(PartitionState::Stream)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(PartitionState::RedisEpoch).string().null())
                    .col(
                        ColumnDef::new(PartitionState::EpochAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(PartitionState::DrainedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(PartitionState::RedisDownSince)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(PartitionState::RedisUpAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(PartitionState::UpdatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(PartitionState::Table).to_owned())
            .await
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

/// Table and column names of `partition_state` as this migration created them.
#[derive(DeriveIden)]
enum PartitionState {
    Table,
    Stream,
    RedisEpoch,
    EpochAt,
    DrainedAt,
    RedisDownSince,
    RedisUpAt,
    UpdatedAt,
}
