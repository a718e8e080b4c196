//! Creates `session_events`, the append-only log of every session event.
//!
//! One row per event, identified twice: by `event_id` (so a redelivered
//! stream entry is recognised and skipped) and by `(session_id, seq)` (so two
//! different events can never claim the same place in a session's history).

use sea_orm_migration::prelude::*;

/// Creates the `session_events` table and its indexes.
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
                    .table(SessionEvents::Table)
                    .col(
                        ColumnDef::new(SessionEvents::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(SessionEvents::EventId).uuid().not_null())
                    .col(
                        ColumnDef::new(SessionEvents::SessionId)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SessionEvents::Seq).big_integer().not_null())
                    .col(
                        ColumnDef::new(SessionEvents::EventType)
                            .string_len(32)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SessionEvents::UserId).string().null())
                    .col(
                        ColumnDef::new(SessionEvents::OccurredAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SessionEvents::RecordedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    // Null when the event was written directly in fallback mode
                    // and never passed through the stream.
                    .col(ColumnDef::new(SessionEvents::StreamId).string().null())
                    .col(
                        ColumnDef::new(SessionEvents::SchemaVersion)
                            .integer()
                            .not_null(),
                    )
                    // The event's JSON as text, byte for byte as it was
                    // serialized. Not `json`: a `serde_json::Value` is bound as
                    // `jsonb`, and PostgreSQL would store its normalized form
                    // (keys reordered, spacing changed) instead of the original.
                    .col(ColumnDef::new(SessionEvents::Payload).text().not_null())
                    .col(ColumnDef::new(SessionEvents::Traceparent).string().null())
                    // `stream` or `fallback`.
                    .col(
                        ColumnDef::new(SessionEvents::Source)
                            .string_len(16)
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_index(
                Index::create()
                    .name(UQ_EVENT_ID)
                    .table(SessionEvents::Table)
                    .col(SessionEvents::EventId)
                    .unique()
                    .to_owned(),
            )
            .await?;

        manager
            .create_index(
                Index::create()
                    .name(UQ_SESSION_ID_SEQ)
                    .table(SessionEvents::Table)
                    .col(SessionEvents::SessionId)
                    .col(SessionEvents::Seq)
                    .unique()
                    .to_owned(),
            )
            .await?;

        // A user's history, newest or oldest first.
        manager
            .create_index(
                Index::create()
                    .name(IDX_USER_ID_OCCURRED_AT)
                    .table(SessionEvents::Table)
                    .col(SessionEvents::UserId)
                    .col(SessionEvents::OccurredAt)
                    .to_owned(),
            )
            .await?;

        // Everything that happened in a time range.
        manager
            .create_index(
                Index::create()
                    .name(IDX_OCCURRED_AT)
                    .table(SessionEvents::Table)
                    .col(SessionEvents::OccurredAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Dropping the table drops its indexes with it.
        manager
            .drop_table(Table::drop().table(SessionEvents::Table).to_owned())
            .await
    }

    // Table and indexes appear together or not at all, on SQLite as well as
    // PostgreSQL (both have transactional DDL).
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

const UQ_EVENT_ID: &str = "uq_session_events_event_id";
const UQ_SESSION_ID_SEQ: &str = "uq_session_events_session_id_seq";
const IDX_USER_ID_OCCURRED_AT: &str = "idx_session_events_user_id_occurred_at";
const IDX_OCCURRED_AT: &str = "idx_session_events_occurred_at";

/// Table and column names of `session_events` as this migration created them.
#[derive(DeriveIden)]
enum SessionEvents {
    Table,
    Id,
    EventId,
    SessionId,
    Seq,
    EventType,
    UserId,
    OccurredAt,
    RecordedAt,
    StreamId,
    SchemaVersion,
    Payload,
    Traceparent,
    Source,
}
