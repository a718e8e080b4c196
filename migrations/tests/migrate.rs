//! Runs the audit migrations up, down and up again against a fresh SQLite
//! file and a fresh PostgreSQL database, and checks that the schema enforces
//! what the audit consumer relies on: unique event ids, one event per
//! `(session_id, seq)`, one dead letter per stream entry, one snapshot per
//! session, and column types that keep JSON text as written.
//!
//! PostgreSQL is reached at `postgres://postgres@127.0.0.1:5432/postgres`
//! unless `DATABASE_TEST_PG_URL` names another server; each test creates its
//! own database there and drops it at the end.

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use migration::sea_orm::{
    ConnectionTrait, Database, DatabaseConnection, DbBackend, SqlErr, Statement,
};
use migration::{Migrator, MigratorTrait, SchemaManager, pending_count};
use uuid::Uuid;

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const MIGRATIONS: usize = 7;
const TABLES: [&str; 6] = [
    "session_events",
    "session_snapshots",
    "dead_letters",
    "partition_state",
    "fallback_events",
    "lease_fences",
];
const INDEXES: [(&str, &str); 11] = [
    ("session_events", "uq_session_events_event_id"),
    ("session_events", "uq_session_events_session_id_seq"),
    ("session_events", "idx_session_events_user_id_occurred_at"),
    ("session_events", "idx_session_events_occurred_at"),
    ("session_snapshots", "idx_session_snapshots_user_id"),
    (
        "session_snapshots",
        "idx_session_snapshots_status_expires_at",
    ),
    ("fallback_events", "uq_fallback_events_event_id"),
    ("fallback_events", "uq_fallback_events_session_id_seq"),
    ("fallback_events", "idx_fallback_events_stream_id"),
    ("fallback_events", "idx_fallback_events_user_id"),
    ("dead_letters", "idx_dead_letters_session_id_seq"),
];
const DEAD_LETTER_INDEX: (&str, &str) = ("dead_letters", "uq_dead_letters_stream_stream_id");
/// Deliberately not in the key order or spacing a serializer would produce.
const PAYLOAD: &str = r#"{"b": 1,  "a": [2, 3]}"#;

#[tokio::test]
async fn sqlite_migrates_up_down_up() -> Result<()> {
    let dir = TempDir::new()?;
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path.join("audit.sqlite").display()
    );
    let db = Database::connect(&url)
        .await
        .context("opening the sqlite database")?;
    let outcome = up_down_up(&db).await;
    db.close().await.context("closing the sqlite database")?;
    outcome
}

#[tokio::test]
async fn postgres_migrates_up_down_up() -> Result<()> {
    let pg = PgDatabase::create().await?;
    let db = Database::connect(&pg.url)
        .await
        .with_context(|| format!("connecting to test database {}", pg.name))?;
    let outcome = up_down_up(&db).await;
    db.close().await.context("closing the postgres database")?;
    pg.drop().await?;
    outcome
}

#[tokio::test]
async fn pending_count_refuses_a_schema_ahead_of_this_build() -> Result<()> {
    let dir = TempDir::new()?;
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path.join("audit.sqlite").display()
    );
    let db = Database::connect(&url)
        .await
        .context("opening the sqlite database")?;

    Migrator::up(&db, None).await.context("migrating up")?;
    db.execute_unprepared(
        "INSERT INTO seaql_migrations (version, applied_at) \
         VALUES ('m20991231_000000_from_a_newer_build', 0)",
    )
    .await
    .context("recording a migration this build does not have")?;

    let result = pending_count(&db).await;
    db.close().await.context("closing the sqlite database")?;
    ensure!(
        result.is_err(),
        "pending_count accepted an unknown applied migration: {result:?}"
    );
    Ok(())
}

/// The whole lifecycle, identical on every backend.
async fn up_down_up(db: &DatabaseConnection) -> Result<()> {
    // A database that was never migrated: everything pending, and asking
    // must not create the migration table.
    ensure_eq(pending_count(db).await?, MIGRATIONS, "pending migrations")?;
    let manager = SchemaManager::new(db);
    ensure!(
        !manager.has_table("seaql_migrations").await?,
        "pending_count created the migration table"
    );

    Migrator::up(db, Some(1))
        .await
        .context("applying the first migration")?;
    ensure_eq(
        pending_count(db).await?,
        MIGRATIONS - 1,
        "pending migrations",
    )?;

    Migrator::up(db, None)
        .await
        .context("applying the remaining migrations")?;
    ensure_eq(pending_count(db).await?, 0, "pending migrations")?;
    assert_schema_present(db).await?;
    assert_column_types(db).await?;
    assert_constraints(db).await?;

    Migrator::down(db, None)
        .await
        .context("rolling back every migration")?;
    ensure_eq(pending_count(db).await?, MIGRATIONS, "pending migrations")?;
    for table in TABLES {
        ensure!(
            !manager.has_table(table).await?,
            "{table} still exists after down"
        );
    }

    Migrator::up(db, None).await.context("migrating up again")?;
    ensure_eq(pending_count(db).await?, 0, "pending migrations")?;
    assert_schema_present(db).await?;
    // The rows written before `down` went with the tables.
    ensure_eq(count(db, "session_events").await?, 0, "session_events rows")?;
    assert_constraints(db).await?;
    Ok(())
}

fn ensure_eq<T: PartialEq + std::fmt::Debug>(got: T, want: T, what: &str) -> Result<()> {
    ensure!(got == want, "{what}: got {got:?}, expected {want:?}");
    Ok(())
}

async fn assert_schema_present(db: &DatabaseConnection) -> Result<()> {
    let manager = SchemaManager::new(db);
    for table in TABLES {
        ensure!(manager.has_table(table).await?, "{table} is missing");
    }
    for (table, index) in INDEXES.into_iter().chain([DEAD_LETTER_INDEX]) {
        ensure!(
            manager.has_index(table, index).await?,
            "index {index} on {table} is missing"
        );
    }
    Ok(())
}

/// JSON that must stay byte-identical is stored as text, never as `json` or
/// `jsonb`, which a driver may normalize on the way in.
async fn assert_column_types(db: &DatabaseConnection) -> Result<()> {
    let expected: &[(&str, &str, &str)] = match db.get_database_backend() {
        DbBackend::Postgres => &[
            ("session_events", "payload", "text"),
            ("session_events", "event_id", "uuid"),
            ("session_events", "occurred_at", "timestamp with time zone"),
            ("session_snapshots", "state", "text"),
            ("dead_letters", "fields", "text"),
            ("fallback_events", "payload", "text"),
            ("fallback_events", "event_id", "uuid"),
        ],
        DbBackend::Sqlite => &[
            ("session_events", "payload", "text"),
            ("session_snapshots", "state", "text"),
            ("dead_letters", "fields", "text"),
        ],
        other => bail!("no column-type check for {other:?}"),
    };
    for &(table, column, want) in expected {
        let got = column_type(db, table, column).await?;
        ensure!(
            got.eq_ignore_ascii_case(want),
            "{table}.{column} is {got}, expected {want}"
        );
    }
    Ok(())
}

async fn assert_constraints(db: &DatabaseConnection) -> Result<()> {
    let first = Uuid::now_v7();
    insert_event(db, first, "s-1", 1)
        .await
        .context("inserting the first event")?;
    insert_event(db, Uuid::now_v7(), "s-1", 2)
        .await
        .context("inserting the next event of the same session")?;

    // A redelivered event: same event id, even under another session.
    expect_unique_violation(insert_event(db, first, "s-2", 1).await, "event_id")?;
    // Two events claiming the same place in one session's history.
    expect_unique_violation(
        insert_event(db, Uuid::now_v7(), "s-1", 2).await,
        "session_id",
    )?;
    ensure_eq(count(db, "session_events").await?, 2, "session_events rows")?;

    // The payload comes back exactly as written: key order and spacing kept.
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(Statement::from_string(
            backend,
            format!(
                "SELECT CAST(payload AS TEXT) AS p FROM session_events WHERE event_id = '{first}'"
            ),
        ))
        .await?
        .context("reading the first event back")?;
    let payload: String = row.try_get("", "p")?;
    ensure_eq(payload.as_str(), PAYLOAD, "stored payload")?;

    let missing_payload = db
        .execute_unprepared(
            "INSERT INTO session_events \
             (event_id, session_id, seq, event_type, occurred_at, recorded_at, \
              schema_version, payload, source) \
             VALUES ('00000000-0000-7000-8000-000000000000', 's-3', 1, 'created', \
                     '2026-11-28T10:00:00Z', '2026-11-28T10:00:01Z', 1, NULL, 'stream')",
        )
        .await;
    ensure!(
        missing_payload.is_err(),
        "an event without a payload was accepted"
    );

    let snapshot = "INSERT INTO session_snapshots \
         (session_id, user_id, state, seq, status, expires_at, updated_at) \
         VALUES ('s-1', 'u-1', '{\"a\": 1}', 2, 'live', NULL, '2026-11-28T10:00:00Z')";
    db.execute_unprepared(snapshot)
        .await
        .context("inserting a snapshot")?;
    expect_unique_violation(db.execute_unprepared(snapshot).await, "session_snapshots")?;

    let dead_letter = "INSERT INTO dead_letters \
         (stream, stream_id, fields, reason, deliveries, recorded_at) \
         VALUES ('vedfolnir:events', '1764324000000-0', '{\"event\": \"x\"}', \
                 'unknown event type', 5, '2026-11-28T10:00:00Z')";
    db.execute_unprepared(dead_letter)
        .await
        .context("inserting a dead letter")?;
    expect_unique_violation(db.execute_unprepared(dead_letter).await, "stream")?;

    // Rows from another stream with the same entry id are distinct.
    db.execute_unprepared(
        "INSERT INTO dead_letters \
         (stream, stream_id, fields, reason, deliveries, recorded_at) \
         VALUES ('other:events', '1764324000000-0', '{}', 'bad', 1, '2026-11-28T10:00:00Z')",
    )
    .await
    .context("inserting a dead letter from another stream")?;
    ensure_eq(count(db, "dead_letters").await?, 2, "dead_letters rows")?;

    // Two app servers staging the same place of one session in fallback
    // mode: the second must conflict, not overwrite.
    let staged = |event_id: Uuid| {
        format!(
            "INSERT INTO fallback_events \
             (event_id, stream, session_id, seq, event_type, user_id, occurred_at, \
              schema_version, payload, traceparent, recorded_at) \
             VALUES ('{event_id}', 'vedfolnir:events', 's-1', 3, 'updated', 'u-1', \
                     '2026-11-28T10:00:00Z', 1, '{PAYLOAD}', NULL, '2026-11-28T10:00:01Z')"
        )
    };
    db.execute_unprepared(&staged(Uuid::now_v7()))
        .await
        .context("staging a fallback event")?;
    expect_unique_violation(db.execute_unprepared(&staged(Uuid::now_v7())).await, "seq")?;

    // One fencing token per stream and role.
    let fence = |role: &str| {
        format!(
            "INSERT INTO lease_fences (stream, role, token, holder, updated_at) \
             VALUES ('vedfolnir:events', '{role}', 1, 'w-1', '2026-11-30T10:00:00Z')"
        )
    };
    db.execute_unprepared(&fence("audit"))
        .await
        .context("inserting a fence")?;
    db.execute_unprepared(&fence("reaper"))
        .await
        .context("inserting the fence of another role")?;
    expect_unique_violation(db.execute_unprepared(&fence("audit")).await, "lease_fences")?;

    // A dead letter names its session and seq, and can be discarded.
    db.execute_unprepared(
        "INSERT INTO dead_letters \
         (stream, stream_id, fields, reason, deliveries, recorded_at, session_id, seq, discarded_at) \
         VALUES ('vedfolnir:events', '1764324000001-0', '{}', 'bad', 1, '2026-11-28T10:00:00Z', \
                 's-1', 4, '2026-11-30T10:00:00Z')",
    )
    .await
    .context("inserting a dead letter with its session and seq")?;
    Ok(())
}

async fn insert_event(
    db: &DatabaseConnection,
    event_id: Uuid,
    session_id: &str,
    seq: i64,
) -> Result<(), migration::DbErr> {
    let sql = format!(
        "INSERT INTO session_events \
         (event_id, session_id, seq, event_type, user_id, occurred_at, recorded_at, \
          stream_id, schema_version, payload, traceparent, source) \
         VALUES ('{event_id}', '{session_id}', {seq}, 'created', 'u-1', \
                 '2026-11-28T10:00:00Z', '2026-11-28T10:00:01Z', NULL, 1, \
                 '{PAYLOAD}', NULL, 'fallback')"
    );
    db.execute_unprepared(&sql).await.map(drop)
}

/// Checks that `result` failed on a unique constraint whose message names
/// `key` (a column or table name, which both backends put in the message).
fn expect_unique_violation<T: std::fmt::Debug>(
    result: Result<T, migration::DbErr>,
    key: &str,
) -> Result<()> {
    match result {
        Ok(value) => bail!("duplicate {key} was accepted: {value:?}"),
        Err(err) => match err.sql_err() {
            Some(SqlErr::UniqueConstraintViolation(message)) => {
                ensure!(
                    message.contains(key),
                    "unique violation on {key} expected, got: {message}"
                );
                Ok(())
            }
            _ => bail!("expected a unique violation on {key}, got: {err}"),
        },
    }
}

async fn count(db: &DatabaseConnection, table: &str) -> Result<i64> {
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(Statement::from_string(
            backend,
            format!("SELECT COUNT(*) AS n FROM {table}"),
        ))
        .await?
        .with_context(|| format!("counting {table}"))?;
    Ok(row.try_get("", "n")?)
}

async fn column_type(db: &DatabaseConnection, table: &str, column: &str) -> Result<String> {
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => format!(
            "SELECT data_type AS t FROM information_schema.columns \
             WHERE table_schema = current_schema() \
               AND table_name = '{table}' AND column_name = '{column}'"
        ),
        _ => format!("SELECT type AS t FROM pragma_table_info('{table}') WHERE name = '{column}'"),
    };
    let row = db
        .query_one_raw(Statement::from_string(backend, sql))
        .await?
        .with_context(|| format!("{table}.{column} does not exist"))?;
    Ok(row.try_get("", "t")?)
}

/// A directory under the system temp dir, removed when dropped.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("vedfolnir_mig_{}", Uuid::now_v7().simple()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A PostgreSQL database created for one test.
struct PgDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl PgDatabase {
    async fn create() -> Result<Self> {
        let admin_url =
            std::env::var("DATABASE_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned());
        let name = format!("vedfolnir_mig_{}", Uuid::now_v7().simple());
        let url = with_database(&admin_url, &name);
        let admin = Database::connect(&admin_url)
            .await
            .context("connecting to the postgres server (set DATABASE_TEST_PG_URL)")?;
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .with_context(|| format!("creating database {name}"))?;
        admin.close().await?;
        Ok(Self {
            admin_url,
            name,
            url,
        })
    }

    async fn drop(self) -> Result<()> {
        let admin = Database::connect(&self.admin_url)
            .await
            .context("reconnecting to the postgres server")?;
        admin
            .execute_unprepared(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await
            .with_context(|| format!("dropping database {}", self.name))?;
        admin.close().await?;
        Ok(())
    }
}

/// `base` with its database name replaced by `name`, keeping any query string.
fn with_database(base: &str, name: &str) -> String {
    let (without_query, query) = match base.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (base, None),
    };
    let authority_start = without_query.find("://").map_or(0, |i| i + 3);
    let server = match without_query[authority_start..].find('/') {
        Some(slash) => &without_query[..authority_start + slash],
        None => without_query,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

#[test]
fn with_database_replaces_only_the_name() {
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
        "postgres://postgres@127.0.0.1:5432/x"
    );
    assert_eq!(
        with_database("postgres://u:p@h/db?sslmode=disable", "x"),
        "postgres://u:p@h/x?sslmode=disable"
    );
    assert_eq!(
        with_database("postgres://h:5432", "x"),
        "postgres://h:5432/x"
    );
}
