//! Adds to `dead_letters` what an operator needs to see gaps and act on
//! them: the entry's `session_id` and `seq` (when the entry names a valid
//! one, else null), indexed together, so the sessions whose history has a
//! hole are one query away; and `discarded_at`, set by `vedfolnir-sessions
//! dead-letters discard` so that a refused entry is set aside explicitly
//! without being forgotten.
//!
//! SQLite alters one column per statement, so each column is its own step.

use sea_orm_migration::prelude::*;

/// Adds `session_id`, `seq` and `discarded_at` to `dead_letters`.
#[derive(DeriveMigrationName)]
pub struct Migration;

const IDX_SESSION_SEQ: &str = "idx_dead_letters_session_id_seq";

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for col in [
            ColumnDef::new(DeadLetters::SessionId)
                .string_len(64)
                .null()
                .to_owned(),
            ColumnDef::new(DeadLetters::Seq)
                .big_integer()
                .null()
                .to_owned(),
            ColumnDef::new(DeadLetters::DiscardedAt)
                .timestamp_with_time_zone()
                .null()
                .to_owned(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(DeadLetters::Table)
                        .add_column(col)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_index(
                Index::create()
                    .name(IDX_SESSION_SEQ)
                    .table(DeadLetters::Table)
                    .col(DeadLetters::SessionId)
                    .col(DeadLetters::Seq)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name(IDX_SESSION_SEQ)
                    .table(DeadLetters::Table)
                    .to_owned(),
            )
            .await?;
        for col in [
            DeadLetters::DiscardedAt,
            DeadLetters::Seq,
            DeadLetters::SessionId,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(DeadLetters::Table)
                        .drop_column(col)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

/// Table and column names of `dead_letters` that this migration touches.
#[derive(DeriveIden)]
enum DeadLetters {
    Table,
    SessionId,
    Seq,
    DiscardedAt,
}
