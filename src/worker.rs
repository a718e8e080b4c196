//! The worker process: the audit consumer and the expiry reaper, side by
//! side, until a shutdown signal. With the audit database, each partition
//! also gets the database sweep of overdue sessions
//! ([`crate::reaper::OverdueSweeper`]).

use std::collections::BTreeMap;

use tokio_util::sync::CancellationToken;

use crate::audit::{self, AuditConsumer, AuditSink, ConsumerConfig};
use crate::config::Config;
use crate::error::Result;
use crate::lease::Leases;
use crate::reaper::{Reaper, ReaperConfig};
use crate::store::SessionStore;

/// Which parts to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parts {
    /// The audit consumer and the reaper.
    Both,
    /// Only the audit consumer.
    Audit,
    /// Only the reaper.
    Reaper,
}

/// Runs the worker until `shutdown` is cancelled. The audit consumer refuses
/// to start on an audit schema that is behind (`vedfolnir-sessions migrate`).
///
/// The worker works on the partitions it holds a lease on (see
/// [`crate::lease`]): for each, an audit consumer on the partition's stream
/// and a reaper on its expiry index. Partitions are spread over the running
/// workers and taken over when a worker dies (after `lease_ttl`). Without
/// partitions there is one, held by one worker at a time; the others stand by.
pub async fn run(
    config: &Config,
    parts: Parts,
    consumer: ConsumerConfig,
    reaper: ReaperConfig,
    lease_ttl: std::time::Duration,
    shutdown: CancellationToken,
) -> Result<()> {
    // Read here rather than passed in, so that the binary and the callers of
    // `run` stay as they are; a bad value still stops the worker at start.
    let overdue = crate::reaper::OverdueConfig::from_env()?;
    let store = SessionStore::connect(config).await?;
    let health = store.health().await;
    for w in &health.warnings {
        tracing::warn!(warning = %w, "redis configuration");
    }
    let mut tasks = tokio::task::JoinSet::new();
    {
        let sample = std::sync::Arc::new(Sample::default());
        let (store, token) = (store.clone(), shutdown.clone());
        tasks.spawn(async move {
            sample
                .run(store, std::time::Duration::from_secs(2), token)
                .await;
            Ok(())
        });
    }
    let db = if parts != Parts::Reaper {
        let db = audit::db::connect(&config.database_url).await?;
        audit::db::require_current_schema(&db).await?;
        let healer = crate::recovery::Healer::new(store.clone(), db.clone(), consumer.heal_check);
        let token = shutdown.clone();
        tasks.spawn(async move { healer.run(token).await.map(|_| ()) });
        Some(db)
    } else {
        None
    };
    let mut leases = Leases::new(
        store.connection(),
        store.keys().clone(),
        consumer.consumer.clone(),
        lease_ttl,
    );
    let mut running: BTreeMap<u32, CancellationToken> = BTreeMap::new();
    let mut partitions = tokio::task::JoinSet::new();
    let mut result = Ok(());
    while !shutdown.is_cancelled() {
        match leases.tick().await {
            Ok(change) => {
                for p in change.released {
                    if let Some(token) = running.remove(&p) {
                        tracing::info!(partition = p, "partition released");
                        token.cancel();
                    }
                }
                for p in change.acquired {
                    tracing::info!(partition = p, consumer = %consumer.consumer, "partition taken");
                    let token = shutdown.child_token();
                    running.insert(p, token.clone());
                    let work = Partition {
                        config: config.clone(),
                        store: store.clone(),
                        db: db.clone(),
                        consumer: consumer.clone(),
                        reaper: reaper.clone(),
                        overdue: overdue.clone(),
                        parts,
                    };
                    partitions.spawn(async move { work.run(p, token).await });
                }
            }
            Err(e) => tracing::warn!(err = %e, "partition lease tick failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(leases.interval()) => {}
            Some(done) = tasks.join_next() => {
                if let Err(e) = task_result(done) {
                    shutdown.cancel();
                    result = Err(e);
                }
            }
            Some(done) = partitions.join_next() => {
                if let Err(e) = task_result(done) {
                    shutdown.cancel();
                    result = Err(e);
                }
            }
        }
    }
    // Shutdown: every partition finishes and acknowledges its batch in hand,
    // then the leases go, so that other workers take over at once.
    if let Err(e) = join_all(&mut partitions).await {
        result = Err(e);
    }
    if let Err(e) = leases.release_all().await {
        tracing::warn!(err = %e, "releasing the partition leases failed");
    }
    if let Err(e) = join_all(&mut tasks).await {
        result = Err(e);
    }
    result
}

/// Waits for every task of `set`; the last error, if any.
async fn join_all(set: &mut tokio::task::JoinSet<Result<()>>) -> Result<()> {
    let mut result = Ok(());
    while let Some(done) = set.join_next().await {
        if let Err(e) = task_result(done) {
            result = Err(e);
        }
    }
    result
}

fn task_result(done: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match done {
        Ok(r) => r,
        Err(join) => Err(crate::error::Error::Corrupt(format!(
            "worker task failed: {join}"
        ))),
    }
}

/// The work on one partition.
struct Partition {
    config: Config,
    store: SessionStore,
    db: Option<sea_orm::DatabaseConnection>,
    consumer: ConsumerConfig,
    reaper: ReaperConfig,
    overdue: crate::reaper::OverdueConfig,
    parts: Parts,
}

impl Partition {
    async fn run(self, p: u32, token: CancellationToken) -> Result<()> {
        let keys = self.store.keys().part(p).clone();
        let mut set = tokio::task::JoinSet::new();
        if let Some(db) = &self.db {
            // Ends the reaper cannot write (no ledger left in Redis).
            let s =
                crate::reaper::OverdueSweeper::new(self.store.clone(), db.clone(), self.overdue);
            let t = token.clone();
            set.spawn(async move { s.run_partition(p, t).await.map(|_| ()) });
        }
        if let Some(db) = self.db {
            let sink = AuditSink::new(db, self.config.session_timeout, keys.stream.clone());
            let mut c =
                AuditConsumer::for_partition(&self.config, &keys, sink, self.consumer).await?;
            c.ensure_group().await?;
            tracing::info!(consumer = %c.name(), partition = p, "audit consumer started");
            let t = token.clone();
            set.spawn(async move { c.run(t).await.map(|_| ()) });
        }
        if self.parts != Parts::Audit {
            let r = Reaper::new(self.store.clone(), self.reaper);
            tracing::info!(partition = p, "expiry reaper started");
            set.spawn(async move { r.run_partition(p, token).await.map(|_| ()) });
        }
        join_all(&mut set).await
    }
}

/// Gauges read from Redis every few seconds: live sessions, stream length,
/// audit lag and pending entries, active consumers, Redis memory.
#[derive(Debug, Default)]
pub struct Sample {
    /// Sessions whose deadline is in the future.
    pub active_sessions: std::sync::atomic::AtomicU64,
    /// Entries in the stream.
    pub stream_length: std::sync::atomic::AtomicU64,
    /// Entries not yet delivered to the audit group.
    pub audit_lag: std::sync::atomic::AtomicU64,
    /// Entries delivered but not acknowledged.
    pub audit_pending: std::sync::atomic::AtomicU64,
    /// Consumers of the audit group seen within the last 30 s.
    pub audit_consumers: std::sync::atomic::AtomicU64,
    /// Redis `used_memory`.
    pub redis_used_memory: std::sync::atomic::AtomicU64,
}

impl Sample {
    /// Reads the figures once.
    pub async fn refresh(&self, store: &SessionStore) -> Result<()> {
        use redis::AsyncCommands as _;
        use std::sync::atomic::Ordering::Relaxed;
        let mut conn = store.connection();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let int = |v: Option<&redis::Value>| match v {
            Some(redis::Value::Int(i)) => u64::try_from(*i).unwrap_or(0),
            _ => 0,
        };
        let (mut active, mut len, mut lag, mut pending) = (0u64, 0u64, 0u64, 0u64);
        let mut consumers_seen = std::collections::BTreeSet::new();
        for keys in store.keys().all() {
            active += conn
                .zcount::<_, _, _, u64>(&keys.expiry, now_ms, "+inf")
                .await?;
            len += conn.xlen::<_, u64>(&keys.stream).await?;
            let groups: redis::RedisResult<Vec<std::collections::HashMap<String, redis::Value>>> =
                redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(&keys.stream)
                    .query_async(&mut conn)
                    .await;
            if let Ok(groups) = groups
                && let Some(g) = groups.iter().find(|g| {
                    matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n.as_slice() == b"audit")
                })
            {
                lag += int(g.get("lag"));
                pending += int(g.get("pending"));
                let consumers: redis::RedisResult<
                    Vec<std::collections::HashMap<String, redis::Value>>,
                > = redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(&keys.stream)
                    .arg("audit")
                    .query_async(&mut conn)
                    .await;
                for c in consumers.unwrap_or_default() {
                    if int(c.get("idle")) < 30_000
                        && let Some(redis::Value::BulkString(name)) = c.get("name")
                    {
                        consumers_seen.insert(name.clone());
                    }
                }
            }
        }
        self.active_sessions.store(active, Relaxed);
        self.stream_length.store(len, Relaxed);
        self.audit_lag.store(lag, Relaxed);
        self.audit_pending.store(pending, Relaxed);
        self.audit_consumers
            .store(consumers_seen.len() as u64, Relaxed);
        if let Some(used) = conn.used_memory().await? {
            self.redis_used_memory.store(used, Relaxed);
        }
        Ok(())
    }

    /// Registers the observable gauges that report this sample. Keep the
    /// returned handles alive as long as the gauges should be reported.
    pub fn register(
        self: &std::sync::Arc<Self>,
    ) -> Vec<opentelemetry::metrics::ObservableGauge<u64>> {
        use std::sync::atomic::Ordering::Relaxed;
        let meter = opentelemetry::global::meter("vedfolnir-sessions");
        let gauge = |name: &'static str,
                     unit: &'static str,
                     help: &'static str,
                     read: fn(&Sample) -> u64| {
            let s = self.clone();
            let mut b = meter
                .u64_observable_gauge(name)
                .with_description(help)
                .with_callback(move |o| o.observe(read(&s), &[]));
            if !unit.is_empty() {
                b = b.with_unit(unit);
            }
            b.build()
        };
        vec![
            gauge(
                "vedfolnir.sessions.active",
                "",
                "Sessions whose deadline is in the future",
                |s| s.active_sessions.load(Relaxed),
            ),
            gauge(
                "vedfolnir.stream.length",
                "",
                "Entries in the event stream",
                |s| s.stream_length.load(Relaxed),
            ),
            gauge(
                "vedfolnir.audit.lag",
                "",
                "Stream entries not yet delivered to the audit group",
                |s| s.audit_lag.load(Relaxed),
            ),
            gauge(
                "vedfolnir.audit.pending",
                "",
                "Entries delivered to the audit group and not acknowledged",
                |s| s.audit_pending.load(Relaxed),
            ),
            gauge(
                "vedfolnir.audit.consumers",
                "",
                "Audit consumers active within the last 30 s",
                |s| s.audit_consumers.load(Relaxed),
            ),
            gauge(
                "vedfolnir.redis.memory.used",
                "By",
                "Redis used_memory",
                |s| s.redis_used_memory.load(Relaxed),
            ),
        ]
    }

    /// Refreshes every `every` until `shutdown` is cancelled.
    pub async fn run(
        self: std::sync::Arc<Self>,
        store: SessionStore,
        every: std::time::Duration,
        shutdown: CancellationToken,
    ) {
        let _gauges = self.register();
        while !shutdown.is_cancelled() {
            if let Err(e) = self.refresh(&store).await {
                tracing::debug!(err = %e, "metrics sample failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}
