//! Creates `fallback_events`, the mutations an app server accepted while
//! Redis was unreachable, waiting to be projected through Redis.
//!
//! A row is the whole event as it will be appended to the stream (same
//! `event_id`). `seq` is its place in the database's view of the session
//! (the snapshot's `seq` plus the rows staged before it); `(session_id, seq)`
//! is unique, so two app servers writing the same session concurrently in
//! fallback mode conflict instead of losing an update. Once Redis answers,
//! whoever sees it first (an app server or the worker) applies each row to
//! Redis in `id` order through the mutation script, where it takes its final
//! `seq` after whatever the stream already holds, and deletes the row.

use sea_orm_migration::prelude::*;

/// Creates the `fallback_events` table and its indexes.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(FallbackEvents::Table)
                    .col(
                        ColumnDef::new(FallbackEvents::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(FallbackEvents::EventId).uuid().not_null())
                    .col(ColumnDef::new(FallbackEvents::Stream).string().not_null())
                    .col(
                        ColumnDef::new(FallbackEvents::SessionId)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(ColumnDef::new(FallbackEvents::Seq).big_integer().not_null())
                    .col(
                        ColumnDef::new(FallbackEvents::EventType)
                            .string_len(32)
                            .not_null(),
                    )
                    .col(ColumnDef::new(FallbackEvents::UserId).string().null())
                    .col(
                        ColumnDef::new(FallbackEvents::OccurredAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(FallbackEvents::SchemaVersion)
                            .integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(FallbackEvents::Payload).text().not_null())
                    .col(ColumnDef::new(FallbackEvents::Traceparent).string().null())
                    // The Redis attempt before it failed in a way that does
                    // not say whether Redis applied it (a timeout, a
                    // connection lost after sending): the projection first
                    // looks for the event in the stream.
                    .col(
                        ColumnDef::new(FallbackEvents::Unsure)
                            .boolean()
                            .not_null()
                            .default(false),
                    )
                    .col(
                        ColumnDef::new(FallbackEvents::RecordedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("uq_fallback_events_event_id")
                    .table(FallbackEvents::Table)
                    .col(FallbackEvents::EventId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("uq_fallback_events_session_id_seq")
                    .table(FallbackEvents::Table)
                    .col(FallbackEvents::SessionId)
                    .col(FallbackEvents::Seq)
                    .unique()
                    .to_owned(),
            )
            .await?;
        // What a projector reads: one partition's rows, oldest first.
        manager
            .create_index(
                Index::create()
                    .name("idx_fallback_events_stream_id")
                    .table(FallbackEvents::Table)
                    .col(FallbackEvents::Stream)
                    .col(FallbackEvents::Id)
                    .to_owned(),
            )
            .await?;
        // A user's staged sessions, for logout everywhere during an outage.
        manager
            .create_index(
                Index::create()
                    .name("idx_fallback_events_user_id")
                    .table(FallbackEvents::Table)
                    .col(FallbackEvents::UserId)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(FallbackEvents::Table).to_owned())
            .await
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

/// Table and column names of `fallback_events` as this migration created them.
#[derive(DeriveIden)]
enum FallbackEvents {
    Table,
    Id,
    EventId,
    Stream,
    SessionId,
    Seq,
    EventType,
    UserId,
    OccurredAt,
    SchemaVersion,
    Payload,
    Traceparent,
    Unsure,
    RecordedAt,
}
