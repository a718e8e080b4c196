//! Connecting to the audit database and checking its schema.

use sea_orm::{ConnectOptions, Database, DatabaseConnection};

use crate::error::{Error, Result};

/// Opens the audit database named by `DATABASE_URL` (SQLite file or
/// PostgreSQL). The URL is never logged: it may hold a password.
pub async fn connect(url: &str) -> Result<DatabaseConnection> {
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.sqlx_logging(false)
        .max_connections(8)
        .connect_timeout(std::time::Duration::from_secs(5))
        .acquire_timeout(std::time::Duration::from_secs(5));
    if url.starts_with("sqlite:") {
        // One writer at a time is all SQLite allows; more connections only
        // add lock contention.
        opts.max_connections(1);
    }
    Ok(Database::connect(opts).await?)
}

/// Applies every pending migration; returns how many were applied.
pub async fn migrate(db: &DatabaseConnection) -> Result<usize> {
    use migration::MigratorTrait as _;
    let pending = migration::pending_count(db).await?;
    migration::Migrator::up(db, None).await?;
    Ok(pending)
}

/// Fails unless every migration has been applied, with a message that says
/// what to run. The worker calls it at start: it never changes the schema
/// itself, so upgrades stay an explicit operator step.
pub async fn require_current_schema(db: &DatabaseConnection) -> Result<()> {
    match migration::pending_count(db).await {
        Ok(0) => Ok(()),
        Ok(n) => Err(Error::Schema(format!(
            "the audit database is {n} migration(s) behind; run `vedfolnir-sessions migrate` first"
        ))),
        Err(e) => Err(Error::Schema(format!(
            "cannot read the audit schema ({e}); run `vedfolnir-sessions migrate` with this version"
        ))),
    }
}
