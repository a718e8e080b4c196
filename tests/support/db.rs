//! Audit databases for tests: a fresh SQLite file, or a fresh PostgreSQL
//! database with a unique name on the local server, migrated. Dropped with
//! the value.

use sea_orm::DatabaseConnection;

/// The PostgreSQL server the tests use (`TEST_PG_URL`, default the local one).
pub fn pg_base_url() -> String {
    std::env::var("TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// Turns `async fn name(backend: Backend)` test bodies into one test per
/// backend: `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name($crate::db::Backend::Sqlite).await } )*
        }
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name($crate::db::Backend::Postgres).await } )*
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug)]
pub struct TestDb {
    pub url: String,
    pub db: DatabaseConnection,
    backend: Backend,
    name: String,
}

impl TestDb {
    /// A fresh, migrated database.
    pub async fn new(backend: Backend) -> Self {
        let db = Self::blank(backend).await;
        vedfolnir_sessions::audit::db::migrate(&db.db)
            .await
            .expect("migrate");
        db
    }

    /// A fresh database with no migrations applied.
    pub async fn blank(backend: Backend) -> Self {
        let name = format!("vtest_{}", uuid::Uuid::new_v4().simple());
        let url = match backend {
            Backend::Sqlite => {
                let path = std::env::temp_dir().join(format!("{name}.sqlite"));
                format!("sqlite://{}?mode=rwc", path.display())
            }
            Backend::Postgres => {
                let admin = sea_orm::Database::connect(format!("{}/postgres", pg_base_url()))
                    .await
                    .expect("connect to postgres");
                use sea_orm::ConnectionTrait as _;
                admin
                    .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
                    .await
                    .expect("create test database");
                admin.close().await.ok();
                format!("{}/{name}", pg_base_url())
            }
        };
        let db = vedfolnir_sessions::audit::db::connect(&url)
            .await
            .expect("connect");
        TestDb {
            url,
            db,
            backend,
            name,
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match self.backend {
            Backend::Sqlite => {
                let path = std::env::temp_dir().join(format!("{}.sqlite", self.name));
                for suffix in ["", "-wal", "-shm", "-journal"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Backend::Postgres => {
                let base = pg_base_url();
                let _ = std::process::Command::new("psql")
                    .arg(format!("{base}/postgres"))
                    .arg("-qc")
                    .arg(format!(
                        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                        self.name
                    ))
                    .output();
            }
        }
    }
}
