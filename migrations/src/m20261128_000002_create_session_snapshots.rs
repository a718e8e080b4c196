//! Creates `session_snapshots`, one row per session holding its latest state.
//!
//! `state` is the folded session JSON exactly as Redis holds it, stored as
//! text so it stays byte-identical; `seq` is the last event folded into it,
//! and the audit consumer only ever moves it forward.

use sea_orm_migration::prelude::*;

/// Creates the `session_snapshots` table and its indexes.
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
                    .table(SessionSnapshots::Table)
                    .col(
                        ColumnDef::new(SessionSnapshots::SessionId)
                            .string_len(64)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(SessionSnapshots::UserId).string().null())
                    // Text, not json/jsonb: the bytes must match Redis exactly.
                    .col(ColumnDef::new(SessionSnapshots::State).text().not_null())
                    .col(
                        ColumnDef::new(SessionSnapshots::Seq)
                            .big_integer()
                            .not_null(),
                    )
                    // `live`, `destroyed` or `expired`.
                    .col(
                        ColumnDef::new(SessionSnapshots::Status)
                            .string_len(16)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SessionSnapshots::ExpiresAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(SessionSnapshots::UpdatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;

        // A user's sessions.
        manager
            .create_index(
                Index::create()
                    .name(IDX_USER_ID)
                    .table(SessionSnapshots::Table)
                    .col(SessionSnapshots::UserId)
                    .to_owned(),
            )
            .await?;

        // Live sessions past their expiry, for the reaper.
        manager
            .create_index(
                Index::create()
                    .name(IDX_STATUS_EXPIRES_AT)
                    .table(SessionSnapshots::Table)
                    .col(SessionSnapshots::Status)
                    .col(SessionSnapshots::ExpiresAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Dropping the table drops its indexes with it.
        manager
            .drop_table(Table::drop().table(SessionSnapshots::Table).to_owned())
            .await
    }

    // Table and indexes appear together or not at all, on SQLite as well as
    // PostgreSQL (both have transactional DDL).
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

const IDX_USER_ID: &str = "idx_session_snapshots_user_id";
const IDX_STATUS_EXPIRES_AT: &str = "idx_session_snapshots_status_expires_at";

/// Table and column names of `session_snapshots` as this migration created them.
#[derive(DeriveIden)]
enum SessionSnapshots {
    Table,
    SessionId,
    UserId,
    State,
    Seq,
    Status,
    ExpiresAt,
    UpdatedAt,
}
