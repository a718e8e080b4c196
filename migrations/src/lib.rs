//! Schema migrations for the vedfolnir-sessions audit database.
//!
//! The audit database is the durable record behind the Redis session store:
//! every session event the audit consumer reads from the stream (or that an
//! app server writes directly in fallback mode), the latest folded state of
//! each session, and the stream entries that could not be processed.
//!
//! Each migration is written against table and column names (an `Iden` enum
//! per table) rather than entity types, so a later change to an entity never
//! rewrites history that has already been applied to a database.
//!
//! # Layout
//!
//! - [`Migrator`]: the ordered list of migrations, run by the operator CLI
//!   with [`MigratorTrait::up`].
//! - [`pending_count`]: how many migrations a database has not applied yet,
//!   so a worker can refuse to start against a schema that is behind.
//! - `m20261128_000001_create_session_events`: the append-only event log.
//! - `m20261128_000002_create_session_snapshots`: one row per session with
//!   its latest folded state.
//! - `m20261128_000003_create_dead_letters`: stream entries that were given
//!   up on, kept verbatim for inspection and replay.
//! - `m20261129_000004_create_partition_state`: per stream, the Redis epoch
//!   the database last knew complete and the audit consumer's progress.
//! - `m20261129_000005_create_fallback_events`: mutations accepted while
//!   Redis was unreachable, waiting to be projected through it.
//! - `m20261130_000006_create_lease_fences`: per stream and worker role, the
//!   fencing token that a worker's commits check, so that a worker that
//!   lost its lease cannot commit.
//! - `m20261130_000007_extend_dead_letters`: the refused entry's session and
//!   seq (gaps in a history) and when an operator discarded it.

pub use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseConnection;

mod m20261128_000001_create_session_events;
mod m20261128_000002_create_session_snapshots;
mod m20261128_000003_create_dead_letters;
mod m20261129_000004_create_partition_state;
mod m20261129_000005_create_fallback_events;
mod m20261130_000006_create_lease_fences;
mod m20261130_000007_extend_dead_letters;

/// The audit database's migrations, oldest first.
///
/// Apply them with `Migrator::up(&db, None)` and roll them back with
/// `Migrator::down(&db, None)`; applied migrations are recorded in the
/// `seaql_migrations` table.
#[derive(Debug, Clone, Copy, Default)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261128_000001_create_session_events::Migration),
            Box::new(m20261128_000002_create_session_snapshots::Migration),
            Box::new(m20261128_000003_create_dead_letters::Migration),
            Box::new(m20261129_000004_create_partition_state::Migration),
            Box::new(m20261129_000005_create_fallback_events::Migration),
            Box::new(m20261130_000006_create_lease_fences::Migration),
            Box::new(m20261130_000007_extend_dead_letters::Migration),
        ]
    }
}

/// Returns how many of [`Migrator`]'s migrations the database has not applied.
///
/// Zero means the schema is current. The check only reads: it never creates
/// the `seaql_migrations` table, so it works for a database user without DDL
/// privileges, and a database that has never been migrated reports every
/// migration as pending.
///
/// # Errors
///
/// Returns the database error if the migration table cannot be read, or
/// [`DbErr::Custom`] if the database records a migration that this build
/// does not know about (the schema is ahead of the binary).
pub async fn pending_count(db: &DatabaseConnection) -> Result<usize, DbErr> {
    Ok(Migrator::get_pending_migrations_read_only(db).await?.len())
}
