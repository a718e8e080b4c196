//! What the tests of every crate in the workspace share.
//!
//! - [`TestContext`]: every test gets its own key namespace on the real
//!   Redis (`vtest:<uuid>:`), so tests run in parallel and never flush a
//!   shared server. The namespace's keys are deleted when the context
//!   drops. A context runs on standalone Redis or on the local Redis
//!   Cluster that `scripts/cluster.sh start` brings up
//!   (`VEDFOLNIR_TEST_CLUSTER_NODES`, default `127.0.0.1:7100..7105`);
//!   [`on_both_topologies!`] runs a test on both.
//! - [`db`]: a fresh, migrated SQLite or PostgreSQL audit database per test;
//!   [`on_both_backends!`] runs a test on both.
//! - [`redis_server`]: a `redis-server` process of the test's own, to stop,
//!   restart or wipe; [`cluster`]: a private Redis Cluster to fail over;
//!   [`proxy`]: a TCP proxy that cuts connections.
//! - [`binary`]: the workspace's binaries, for tests that run several of
//!   them (see its docs for why and when they are built).

pub mod cluster;
pub mod db;

/// The Rust examples of `docs/web.md`, compiled as doc tests (the guide is
/// not part of the published library, so they are compiled here).
#[cfg(doctest)]
#[doc = include_str!("../../docs/web.md")]
pub struct WebGuide;

/// The README's code blocks, compiled as doc tests with every feature of
/// the library.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct Readme;
pub mod proxy;
pub mod redis_server;

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands as _;
use vedfolnir_sessions::config::RedisTarget;
use vedfolnir_sessions::conn::{ConnOptions, RedisConn};
use vedfolnir_sessions::{Config, SessionId, SessionStore};

/// Runs each named `async fn name(topology: Topology)` as two tests, one on
/// standalone Redis and one on the cluster.
#[macro_export]
macro_rules! on_both_topologies {
    ($($name:ident),* $(,)?) => {
        mod standalone {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name($crate::Topology::Standalone).await } )*
        }
        mod cluster {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name($crate::Topology::Cluster).await } )*
        }
    };
}

/// A binary of the workspace, from the target directory this test runs
/// from (`target/<profile>/<name>`).
///
/// A test can name the binaries of its own package with
/// `env!("CARGO_BIN_EXE_<name>")`, and Cargo builds them first; that is
/// how the CLI's tests (in `cli/tests`), the worker's and the example app
/// server's run their binary. A test that runs binaries of several
/// packages at once (the fault suite: app servers, the worker and the CLI)
/// finds them here instead: `cargo test --workspace`, the test command,
/// builds every binary of the workspace before it runs any test, and so
/// does `cargo test --workspace --test <name>` for one test file. Panics
/// with that advice when the binary is missing.
pub fn binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let profile = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let path = profile.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run the tests with `cargo test --workspace` (for one \
         file: `cargo test --workspace --test <name>`), which builds every binary",
        path.display()
    );
    path
}

/// The Redis the tests use (`TEST_REDIS_URL`, default the local one).
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

/// The local cluster's seed nodes.
pub fn cluster_nodes() -> Vec<RedisTarget> {
    let list = std::env::var("VEDFOLNIR_TEST_CLUSTER_NODES").unwrap_or_else(|_| {
        (7100..7106)
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    });
    vedfolnir_sessions::config::parse_cluster_nodes(&list, false, None)
        .expect("VEDFOLNIR_TEST_CLUSTER_NODES")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Standalone,
    Cluster,
}

#[derive(Debug)]
pub struct TestContext {
    pub namespace: String,
    pub config: Config,
    pub store: SessionStore,
    pub redis: RedisConn,
    pub topology: Topology,
}

impl TestContext {
    pub async fn new() -> Self {
        Self::with(|c| c).await
    }

    pub async fn with(tweak: impl FnOnce(Config) -> Config) -> Self {
        Self::on_with(Topology::Standalone, tweak).await
    }

    pub async fn on(topology: Topology) -> Self {
        Self::on_with(topology, |c| c).await
    }

    pub async fn on_with(topology: Topology, tweak: impl FnOnce(Config) -> Config) -> Self {
        let namespace = format!("vtest:{}:", uuid::Uuid::new_v4().simple());
        let base = Config::default()
            .with_redis(RedisTarget::parse("REDIS_URL", &redis_url()).expect("test redis url"))
            .with_namespace(&namespace);
        let base = match topology {
            Topology::Standalone => base,
            Topology::Cluster => base.with_cluster(cluster_nodes(), 16),
        };
        let config = tweak(base);
        let store = SessionStore::connect(&config).await.unwrap_or_else(|e| {
            panic!(
                "connect to redis ({topology:?}): {e}; the cluster comes from \
                 `bash scripts/cluster.sh start`"
            )
        });
        let redis = RedisConn::connect(&config, ConnOptions::store(&config))
            .await
            .expect("connect");
        TestContext {
            namespace,
            config,
            store,
            redis,
            topology,
        }
    }

    /// A second store on its own connection, same namespace.
    pub async fn other_store(&self) -> SessionStore {
        SessionStore::connect(&self.config).await.expect("connect")
    }

    pub fn conn(&self) -> RedisConn {
        self.redis.clone()
    }

    /// Every stream entry of the namespace, as field maps, in stream order
    /// (partition after partition).
    pub async fn stream(&self) -> Vec<HashMap<String, String>> {
        let mut out = Vec::new();
        for part in self.store.keys().all() {
            let reply: redis::streams::StreamRangeReply =
                self.conn().xrange_all(&part.stream).await.expect("xrange");
            out.extend(reply.ids.into_iter().map(|e| {
                e.map
                    .into_iter()
                    .map(|(k, v)| {
                        let s: String = redis::from_redis_value(v).expect("string field");
                        (k, s)
                    })
                    .collect()
            }));
        }
        out
    }

    /// The stream entries of one session, in stream order.
    pub async fn events_of(&self, id: &SessionId) -> Vec<HashMap<String, String>> {
        self.stream()
            .await
            .into_iter()
            .filter(|e| e["session_id"] == id.as_str())
            .collect()
    }

    pub async fn stream_len(&self) -> u64 {
        let mut n = 0;
        for part in self.store.keys().all() {
            n += self
                .conn()
                .xlen::<_, u64>(&part.stream)
                .await
                .expect("xlen");
        }
        n
    }

    /// All keys of the namespace (on every primary of a cluster).
    pub async fn keys(&self) -> Vec<String> {
        self.conn()
            .scan_all(&format!("{}*", self.namespace))
            .await
            .expect("scan")
    }

    pub fn session_key(&self, id: &SessionId) -> String {
        self.store.keys().session(id)
    }

    /// The expiry index of a session's partition.
    pub fn expiry_key(&self, id: &SessionId) -> String {
        self.store.keys().for_session(id).expiry.clone()
    }

    /// A session's score in its partition's expiry index, filed under any
    /// member form (the id's first 30 bytes in the lean layout, its 32 bytes
    /// as the lean layout filed it before, its hex in the ledger layout).
    pub async fn expiry_score(&self, id: &SessionId) -> Option<f64> {
        Some(self.expiry_entry(id).await?.1)
    }

    /// A session's member and score in its partition's expiry index, under
    /// any member form.
    pub async fn expiry_entry(&self, id: &SessionId) -> Option<(Vec<u8>, f64)> {
        let key = self.expiry_key(id);
        let mut conn = self.conn();
        for member in [
            id.expiry_member().to_vec(),
            id.to_bytes().to_vec(),
            id.as_str().as_bytes().to_vec(),
        ] {
            let score: Option<f64> = conn.zscore(&key, &member).await.expect("zscore");
            if let Some(s) = score {
                return Some((member, s));
            }
        }
        None
    }

    /// Files a session's expiry entry (which must exist) at `at_ms` under the
    /// member it has, as time passing or damage by hand would: the score of
    /// a lean entry keeps the id's last two bytes.
    pub async fn refile_expiry(&self, id: &SessionId, at_ms: i64) {
        let (member, _) = self.expiry_entry(id).await.expect("in the expiry index");
        let score = if member.len() == 30 {
            id.expiry_score(at_ms)
        } else {
            at_ms as f64
        };
        let added: u64 = self
            .conn()
            .zadd(self.expiry_key(id), &member, score)
            .await
            .expect("zadd");
        assert_eq!(added, 0, "the entry existed");
    }

    /// Removes a session from an index under every member form, as damage
    /// done by hand.
    pub async fn unindex(&self, key: &str, id: &SessionId) {
        let members = [
            id.as_str().as_bytes().to_vec(),
            id.to_bytes().to_vec(),
            id.expiry_member().to_vec(),
        ];
        let removed: u64 = self.conn().zrem(key, &members).await.expect("zrem");
        assert_eq!(removed, 1, "{id} was in {key}");
    }

    /// Waits (bounded) until `cond` holds; panics with `what` otherwise.
    pub async fn eventually<F, Fut>(&self, what: &str, limit: Duration, mut cond: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if cond().await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestContext {
    fn drop(&mut self) {
        match self.topology {
            Topology::Standalone => delete_namespace(&self.namespace),
            Topology::Cluster => delete_cluster_namespace(&self.namespace),
        }
    }
}

/// Best effort: removes a test namespace's keys from every node of the
/// cluster.
pub fn delete_cluster_namespace(namespace: &str) {
    for node in cluster_nodes() {
        unlink_namespace_on(node.expose_url(), namespace);
    }
}

/// Best effort: removes a test namespace's keys so the shared server stays clean.
pub fn delete_namespace(namespace: &str) {
    unlink_namespace_on(&redis_url(), namespace);
}

/// Unlinks the namespace's keys on one server, one key per command (on a
/// cluster node a multi-key command may not cross slots), in one pipeline.
fn unlink_namespace_on(url: &str, namespace: &str) {
    let Ok(mut conn) = redis::Client::open(url).and_then(|c| c.get_connection()) else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{namespace}*"))
        .query(&mut conn)
        .unwrap_or_default();
    if keys.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    for k in keys {
        pipe.cmd("UNLINK").arg(k).ignore();
    }
    // A cluster replica refuses (READONLY); its primary deletes the keys.
    let _: redis::RedisResult<()> = pipe.query(&mut conn);
}

#[cfg(test)]
mod tests {
    /// Every `tests/*.rs` is a `[[test]]` of this package (they are listed
    /// by hand, so a new file would otherwise never run).
    #[test]
    fn every_test_file_is_listed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("Cargo.toml");
        let mut files = 0;
        for entry in std::fs::read_dir(dir).expect("tests/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "rs") {
                let file = path.file_name().and_then(|f| f.to_str()).expect("name");
                assert!(
                    manifest.contains(&format!("path = \"{file}\"")),
                    "tests/{file} is not a [[test]] in tests/Cargo.toml"
                );
                files += 1;
            }
        }
        assert!(files > 10, "only {files} test files found");
    }
}
