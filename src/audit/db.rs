//! Connecting to the audit database and checking its schema.

use sea_orm::{
    AccessMode, ConnectOptions, Database, DatabaseConnection, DatabaseTransaction, IsolationLevel,
    TransactionTrait as _,
};

use crate::error::{Error, Result};

/// How long the server lets one of this pool's PostgreSQL connections sit
/// idle inside a transaction before it ends the session.
pub const IDLE_IN_TRANSACTION: std::time::Duration = std::time::Duration::from_secs(10);

/// Begins a transaction that a caller dropped midway cannot leave open.
///
/// sqlx 0.9.0 counts a PostgreSQL connection as inside a transaction only
/// once the answer to its `BEGIN` is read. A caller dropped before that (a
/// web request whose client went away, a timeout around an audit write)
/// returns the connection to the pool inside a transaction that nothing
/// ends: the next borrowers' statements run in it and hold its locks until
/// the server ends the session ([`IDLE_IN_TRANSACTION`] idle, which a busy
/// connection never is), and their writes are lost with it (sqlx issue
/// 4393, fixed after 0.9.0). The `BEGIN` runs on a task of its own, which
/// reads its answer even when the caller is gone; a transaction nobody
/// takes is then dropped, which rolls it back.
pub async fn begin(db: &DatabaseConnection) -> Result<DatabaseTransaction> {
    begin_with(db, None, None).await
}

/// [`begin`] with an isolation level and an access mode.
pub async fn begin_with(
    db: &DatabaseConnection,
    isolation: Option<IsolationLevel>,
    access: Option<AccessMode>,
) -> Result<DatabaseTransaction> {
    let db = db.clone();
    let begun = tokio::spawn(async move { db.begin_with_config(isolation, access).await });
    match begun.await {
        Ok(txn) => Ok(txn?),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(Error::unavailable("the runtime is shutting down")),
    }
}

/// Opens the audit database named by `DATABASE_URL` (SQLite file or
/// PostgreSQL; see [`connection_url`]). The URL is never logged: it may hold
/// a password.
///
/// An empty URL (`DATABASE_URL` unset and no data directory, see
/// [`crate::config::data_dir`]) is a configuration error. For a SQLite file
/// opened with `mode=rwc` (create), its directory is created first.
pub async fn connect(url: &str) -> Result<DatabaseConnection> {
    if url.trim().is_empty() {
        return Err(Error::Config(crate::config::ConfigError {
            var: "DATABASE_URL",
            value: String::new(),
            reason: "unset, and neither XDG_DATA_HOME nor HOME names a data directory for \
                     the default SQLite file"
                .to_owned(),
        }));
    }
    if let Some(dir) = sqlite_dir_to_create(url) {
        std::fs::create_dir_all(&dir).map_err(|e| {
            Error::Config(crate::config::ConfigError {
                var: "DATABASE_URL",
                value: dir.display().to_string(),
                reason: format!("cannot create the SQLite file's directory: {e}"),
            })
        })?;
    }
    let mut opts = ConnectOptions::new(connection_url(url));
    opts.sqlx_logging(false)
        .max_connections(8)
        .connect_timeout(std::time::Duration::from_secs(5))
        .acquire_timeout(std::time::Duration::from_secs(5))
        // Ping a pooled connection before use only when it sat idle: under
        // load every batch would otherwise pay one more round trip, and a
        // connection that broke while busy fails its statement, which the
        // worker retries like any outage.
        .test_before_acquire_if_idle_for(std::time::Duration::from_secs(1))
        // A transaction left open on a pooled connection (a future dropped
        // while its `BEGIN` was on the wire leaves one the driver does not
        // know about, and the next statements on that connection run inside
        // it, holding their locks) is ended by the server after this long
        // idle, not when the connection happens to be used again. The audit
        // sink's own transactions set their bound themselves.
        .map_sqlx_postgres_opts(|o| {
            o.options([(
                "idle_in_transaction_session_timeout",
                IDLE_IN_TRANSACTION.as_millis().to_string(),
            )])
        });
    if url.starts_with("sqlite:") {
        // One writer at a time is all SQLite allows; more connections only
        // add lock contention.
        opts.max_connections(1);
    }
    Ok(Database::connect(opts).await?)
}

/// The directory of a SQLite file that the URL asks to create (`mode=rwc`),
/// when it names one.
fn sqlite_dir_to_create(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite://")?;
    let (path, query) = rest.split_once('?')?;
    if !query.split('&').any(|p| p == "mode=rwc") || path.is_empty() || path == ":memory:" {
        return None;
    }
    let dir = std::path::Path::new(path).parent()?;
    (!dir.as_os_str().is_empty()).then(|| dir.to_path_buf())
}

/// The URL the audit database is opened with: `url`, except that a
/// PostgreSQL URL whose host is a loopback address (`localhost`, `127.0.0.1`,
/// `::1`) and which says nothing about TLS (no `sslmode`, no `host=`
/// parameter) gets `sslmode=disable`.
///
/// Without it the client would negotiate TLS (`sslmode=prefer`, the default)
/// with a server that has `ssl = on`, as PostgreSQL's packages set it. On
/// loopback TLS protects nothing (the traffic never leaves the machine, and
/// `prefer` falls back to plain text anyway), but it costs: the client
/// writes a request larger than one TLS record (16 KiB) in several writes,
/// and without `TCP_NODELAY` (sqlx 0.9.0 does not set it) all but the first
/// wait for the server's delayed ACK, about 40 ms each. The audit sink keeps
/// its requests under 16 KiB when TLS is possible, which costs round trips;
/// without TLS it sends a batch in one statement per step. A URL that names
/// `sslmode` (`require`, `prefer`, …) is used as it is.
pub fn connection_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.to_owned();
    };
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return url.to_owned();
    }
    let loopback = match parsed.host() {
        // `postgres:` is not a special scheme to the URL standard, so an
        // IPv4 address comes back as a domain.
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost")
                || d.parse::<std::net::Ipv4Addr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    let says = parsed
        .query_pairs()
        .any(|(k, _)| k.eq_ignore_ascii_case("sslmode") || k.eq_ignore_ascii_case("host"));
    if !loopback || says {
        return url.to_owned();
    }
    parsed.query_pairs_mut().append_pair("sslmode", "disable");
    parsed.into()
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

#[cfg(test)]
mod tests {
    use super::{connect, connection_url, sqlite_dir_to_create};
    use crate::error::Error;

    #[tokio::test]
    async fn the_default_file_and_its_directory_are_made_where_the_url_says() {
        let base = std::env::temp_dir().join(format!("vtest-db-{}", uuid::Uuid::new_v4().simple()));
        let file = base.join("vedfolnir-sessions").join("audit.sqlite");
        let url = format!("sqlite://{}?mode=rwc", file.display());
        assert_eq!(sqlite_dir_to_create(&url).as_deref(), file.parent());
        let db = connect(&url).await.expect("connect");
        drop(db);
        assert!(file.exists(), "the file is where the URL says");
        let _ = std::fs::remove_dir_all(&base);
        // Nothing is made for a file opened without `mode=rwc`, a relative
        // file in the current directory, or memory.
        for url in [
            "sqlite://x/a.db",
            "sqlite://a.db?mode=rwc",
            "sqlite::memory:",
        ] {
            assert_eq!(sqlite_dir_to_create(url), None, "{url}");
        }
        // No URL at all names the variable.
        match connect("").await {
            Err(Error::Config(e)) => assert_eq!(e.var, "DATABASE_URL"),
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn loopback_postgres_without_sslmode_connects_without_tls() {
        assert_eq!(
            connection_url("postgres://postgres@127.0.0.1:5432/audit"),
            "postgres://postgres@127.0.0.1:5432/audit?sslmode=disable"
        );
        assert_eq!(
            connection_url("postgresql://u:p@localhost/audit?application_name=w"),
            "postgresql://u:p@localhost/audit?application_name=w&sslmode=disable"
        );
        assert_eq!(
            connection_url("postgres://[::1]/audit"),
            "postgres://[::1]/audit?sslmode=disable"
        );
    }

    #[test]
    fn other_urls_are_used_as_they_are() {
        for url in [
            "postgres://postgres@127.0.0.1/audit?sslmode=require",
            "postgres://postgres@127.0.0.1/audit?SSLMODE=prefer",
            "postgres://postgres@localhost/audit?host=/var/run/postgresql",
            "postgres://postgres@db.internal/audit",
            "postgres://postgres@10.0.0.5/audit",
            "sqlite://audit.db?mode=rwc",
            "not a url",
        ] {
            assert_eq!(connection_url(url), url);
        }
    }
}
