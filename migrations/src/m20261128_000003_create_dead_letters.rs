//! Creates `dead_letters`, the stream entries the audit consumer gave up on.
//!
//! The entry is kept verbatim (`fields`, a JSON object of field to value, as
//! text) with the reason and the number of deliveries, so an operator can
//! inspect it and replay it once the cause is fixed. `(stream, stream_id)` is
//! unique, so dead-lettering the same entry twice records it once.

use sea_orm_migration::prelude::*;

/// Creates the `dead_letters` table and its unique index.
#[derive(DeriveMigrationName)]
pub struct Migration;

// `MigrationTrait` elides `SchemaManager`'s lifetime, and under `async_trait`
// an impl that names it (`SchemaManager<'_>`) no longer matches the trait.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(DeadLetters::Table)
                    .col(
                        ColumnDef::new(DeadLetters::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(DeadLetters::Stream).string().not_null())
                    .col(ColumnDef::new(DeadLetters::StreamId).string().not_null())
                    .col(ColumnDef::new(DeadLetters::Fields).text().not_null())
                    .col(ColumnDef::new(DeadLetters::Reason).text().not_null())
                    .col(
                        ColumnDef::new(DeadLetters::Deliveries)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(DeadLetters::RecordedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_index(
                Index::create()
                    .name(UQ_STREAM_STREAM_ID)
                    .table(DeadLetters::Table)
                    .col(DeadLetters::Stream)
                    .col(DeadLetters::StreamId)
                    .unique()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Dropping the table drops its index with it.
        manager
            .drop_table(Table::drop().table(DeadLetters::Table).to_owned())
            .await
    }

    // Table and index appear together or not at all, on SQLite as well as
    // PostgreSQL (both have transactional DDL).
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

const UQ_STREAM_STREAM_ID: &str = "uq_dead_letters_stream_stream_id";

/// Table and column names of `dead_letters` as this migration created them.
#[derive(DeriveIden)]
enum DeadLetters {
    Table,
    Id,
    Stream,
    StreamId,
    Fields,
    Reason,
    Deliveries,
    RecordedAt,
}
