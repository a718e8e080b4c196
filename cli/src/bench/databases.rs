//! The audit databases a suite runs against: those given with `--database`,
//! or a temporary SQLite file and a fresh PostgreSQL database that are
//! removed at the end.

use std::path::PathBuf;

use sea_orm::{ConnectionTrait as _, DatabaseConnection};
use serde_json::Value;

use super::{BenchArgs, Suite, progress};
use vedfolnir_sessions::error::{Error, Result};

/// Which engine a database runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    fn of(url: &str) -> Result<Engine> {
        if url.starts_with("sqlite:") {
            Ok(Engine::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Engine::Postgres)
        } else {
            Err(Error::InvalidInput(
                "--database takes a sqlite:// or postgres:// URL".to_owned(),
            ))
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
        }
    }
}

/// What to remove when the suite is done.
#[derive(Debug)]
enum Owned {
    /// Given by the user: kept.
    Kept,
    /// A temporary SQLite file.
    File(PathBuf),
    /// A database created on the PostgreSQL server.
    Created { server: String, name: String },
}

/// One migrated audit database.
#[derive(Debug)]
pub(super) struct BenchDb {
    pub engine: Engine,
    /// `sqlite`, `postgres` (with a number when one engine appears twice).
    pub label: String,
    pub db: DatabaseConnection,
    /// The server's version, for the report.
    pub version: String,
    /// `file`, `tcp` or `unix`.
    pub transport: &'static str,
    owned: Owned,
}

/// Opens (creating where they are the defaults) and migrates the databases.
/// The URLs are never printed: they may hold passwords.
pub(super) async fn open(args: &BenchArgs, suite: Suite) -> Result<Vec<BenchDb>> {
    let mut out: Vec<BenchDb> = Vec::new();
    let wanted: Vec<Option<String>> = if args.databases.is_empty() {
        vec![None, None]
    } else {
        args.databases.iter().cloned().map(Some).collect()
    };
    for (i, url) in wanted.into_iter().enumerate() {
        let opened = match url {
            Some(url) => {
                let engine = Engine::of(&url)?;
                connect(engine, &url, Owned::Kept).await
            }
            None if i == 0 => {
                let path = std::env::temp_dir().join(format!(
                    "vedfolnir-bench-{}.sqlite",
                    uuid::Uuid::new_v4().simple()
                ));
                let url = format!("sqlite://{}?mode=rwc", path.display());
                connect(Engine::Sqlite, &url, Owned::File(path)).await
            }
            None => create_postgres(&args.pg_server).await,
        };
        match opened {
            Ok(db) => out.push(db),
            Err(e) => {
                for db in out {
                    db.close().await;
                }
                return Err(e);
            }
        }
    }
    let mut seen = std::collections::HashMap::new();
    for db in &mut out {
        let n: &mut u32 = seen.entry(db.engine).or_default();
        *n += 1;
        if *n > 1 {
            db.label = format!("{}-{n}", db.engine.name());
        }
    }
    for db in &out {
        progress(
            suite,
            format!("audit database {} ({})", db.label, db.version),
        );
    }
    Ok(out)
}

async fn connect(engine: Engine, url: &str, owned: Owned) -> Result<BenchDb> {
    let db = vedfolnir_sessions::audit::db::connect(url).await?;
    vedfolnir_sessions::audit::db::migrate(&db).await?;
    let version = server_version(&db, engine).await;
    Ok(BenchDb {
        engine,
        label: engine.name().to_owned(),
        db,
        version,
        transport: match engine {
            Engine::Sqlite => "file",
            Engine::Postgres => transport(url),
        },
        owned,
    })
}

/// `server` with `db` as its database: `postgres://h:p` + `x` →
/// `postgres://h:p/x`, keeping a query string (`?host=/var/run/postgresql`).
fn database_url(server: &str, db: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (server, String::new()),
    };
    format!("{}/{db}{query}", base.trim_end_matches('/'))
}

/// How the client reaches PostgreSQL: `unix` when the URL names a socket
/// directory, `tcp` without TLS, `tcp+tls` when TLS may be negotiated (the
/// URL the worker would open, [`vedfolnir_sessions::audit::db::connection_url`]).
fn transport(url: &str) -> &'static str {
    let url = vedfolnir_sessions::audit::db::connection_url(url);
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let params = || query.split('&');
    if params().any(|kv| kv.starts_with("host=/") || kv.starts_with("host=%2F")) {
        "unix"
    } else if params().any(|kv| kv == "sslmode=disable") {
        "tcp"
    } else {
        "tcp+tls"
    }
}

async fn create_postgres(server: &str) -> Result<BenchDb> {
    let server = server.to_owned();
    let name = format!("vedfolnir_bench_{}", uuid::Uuid::new_v4().simple());
    let admin = sea_orm::Database::connect(database_url(&server, "postgres"))
        .await
        .map_err(|e| {
            Error::InvalidInput(format!(
                "cannot reach the PostgreSQL server of --pg-server ({e}); \
                 start it, or pass --database sqlite://FILE to run on SQLite only"
            ))
        })?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
        .await?;
    admin.close().await?;
    let url = database_url(&server, &name);
    connect(Engine::Postgres, &url, Owned::Created { server, name }).await
}

async fn server_version(db: &DatabaseConnection, engine: Engine) -> String {
    let sql = match engine {
        Engine::Sqlite => "SELECT 'SQLite ' || sqlite_version() AS v",
        Engine::Postgres => "SELECT 'PostgreSQL ' || current_setting('server_version') AS v",
    };
    match db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            sql,
        ))
        .await
    {
        Ok(Some(row)) => row.try_get::<String>("", "v").unwrap_or_default(),
        _ => String::new(),
    }
}

impl BenchDb {
    /// Closes the connection and removes what the suite created.
    pub async fn close(self) {
        let _ = self.db.close().await;
        match self.owned {
            Owned::Kept => {}
            Owned::File(path) => {
                for suffix in ["", "-wal", "-shm", "-journal"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Owned::Created { server, name } => {
                match sea_orm::Database::connect(database_url(&server, "postgres")).await {
                    Ok(admin) => {
                        if let Err(e) = admin
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                            ))
                            .await
                        {
                            eprintln!("bench: could not drop the database {name}: {e}");
                        }
                        let _ = admin.close().await;
                    }
                    Err(e) => eprintln!("bench: could not drop the database {name}: {e}"),
                }
            }
        }
    }

    /// The database's description for reports.
    pub fn describe(&self) -> Value {
        serde_json::json!({
            "database": self.label,
            "version": self.version,
            "transport": self.transport,
        })
    }
}

/// Closes every database of a suite.
pub(super) async fn close_all(dbs: Vec<BenchDb>) {
    for db in dbs {
        db.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_keep_the_query() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            database_url(
                "postgres://postgres@localhost/?host=/var/run/postgresql",
                "x"
            ),
            "postgres://postgres@localhost/x?host=/var/run/postgresql"
        );
        assert_eq!(
            transport("postgres://p@localhost/x?host=/var/run/postgresql"),
            "unix"
        );
        assert_eq!(transport("postgres://p@127.0.0.1:5432/x"), "tcp");
    }
}
