//! Test context: every test gets its own key namespace on the real Redis
//! (`vtest:<uuid>:`), so tests run in parallel and never flush a shared
//! server. The namespace's keys are deleted when the context drops.
#![allow(dead_code, unreachable_pub)]

#[macro_use]
pub mod db;

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands as _;
use vedfolnir_sessions::config::RedisTarget;
use vedfolnir_sessions::{Config, SessionId, SessionStore};

/// The Redis the tests use (`TEST_REDIS_URL`, default the local one).
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

pub struct TestContext {
    pub namespace: String,
    pub config: Config,
    pub store: SessionStore,
    pub redis: redis::aio::ConnectionManager,
}

impl TestContext {
    pub async fn new() -> Self {
        Self::with(|c| c).await
    }

    pub async fn with(tweak: impl FnOnce(Config) -> Config) -> Self {
        let namespace = format!("vtest:{}:", uuid::Uuid::new_v4().simple());
        let config = tweak(
            Config::default()
                .with_redis(RedisTarget::parse("REDIS_URL", &redis_url()).expect("test redis url"))
                .with_namespace(&namespace),
        );
        let store = SessionStore::connect(&config)
            .await
            .expect("connect to redis");
        let client = redis::Client::open(redis_url()).expect("client");
        let redis = redis::aio::ConnectionManager::new(client)
            .await
            .expect("connect");
        TestContext {
            namespace,
            config,
            store,
            redis,
        }
    }

    /// A second store on its own connection, same namespace.
    pub async fn other_store(&self) -> SessionStore {
        SessionStore::connect(&self.config).await.expect("connect")
    }

    pub fn conn(&self) -> redis::aio::ConnectionManager {
        self.redis.clone()
    }

    /// Every stream entry of the namespace, as field maps, in stream order.
    pub async fn stream(&self) -> Vec<HashMap<String, String>> {
        let reply: redis::streams::StreamRangeReply = self
            .conn()
            .xrange_all(&self.config.event_stream)
            .await
            .expect("xrange");
        reply
            .ids
            .into_iter()
            .map(|e| {
                e.map
                    .into_iter()
                    .map(|(k, v)| {
                        let s: String = redis::from_redis_value(v).expect("string field");
                        (k, s)
                    })
                    .collect()
            })
            .collect()
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
        self.conn()
            .xlen(&self.config.event_stream)
            .await
            .expect("xlen")
    }

    /// All keys of the namespace.
    pub async fn keys(&self) -> Vec<String> {
        let mut conn = self.conn();
        let mut out = Vec::new();
        let mut it: redis::AsyncIter<'_, String> = conn
            .scan_match(format!("{}*", self.namespace))
            .await
            .expect("scan");
        while let Some(k) = futures::StreamExt::next(&mut it).await {
            out.push(k.expect("key"));
        }
        out
    }

    pub fn session_key(&self, id: &SessionId) -> String {
        format!("{}{}", self.config.session_prefix, id)
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
        delete_namespace(&self.namespace);
    }
}

/// Best effort: removes a test namespace's keys so the shared server stays clean.
pub fn delete_namespace(namespace: &str) {
    let Ok(client) = redis::Client::open(redis_url()) else {
        return;
    };
    let Ok(mut conn) = client.get_connection() else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{namespace}*"))
        .query(&mut conn)
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("UNLINK").arg(keys).query(&mut conn);
    }
}
