//! The worker process: the audit consumer and the expiry reaper, side by
//! side, until a shutdown signal.

use tokio_util::sync::CancellationToken;

use crate::audit::{self, AuditConsumer, AuditSink, ConsumerConfig};
use crate::config::Config;
use crate::error::Result;
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
pub async fn run(
    config: &Config,
    parts: Parts,
    consumer: ConsumerConfig,
    reaper: ReaperConfig,
    shutdown: CancellationToken,
) -> Result<()> {
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
    if parts != Parts::Reaper {
        let db = audit::db::connect(&config.database_url).await?;
        audit::db::require_current_schema(&db).await?;
        let sink = AuditSink::new(
            db.clone(),
            config.session_timeout,
            config.event_stream.clone(),
        );
        let healer = crate::recovery::Healer::new(store.clone(), db, consumer.heal_check);
        let token = shutdown.clone();
        tasks.spawn(async move { healer.run(token).await.map(|_| ()) });
        let mut c = AuditConsumer::new(config, sink, consumer).await?;
        c.ensure_group().await?;
        tracing::info!(consumer = %c.name(), "audit consumer started");
        let token = shutdown.clone();
        tasks.spawn(async move { c.run(token).await.map(|_| ()) });
    }
    if parts != Parts::Audit {
        let r = Reaper::new(store.clone(), reaper);
        let token = shutdown.clone();
        tracing::info!("expiry reaper started");
        tasks.spawn(async move { r.run(token).await.map(|_| ()) });
    }
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                shutdown.cancel();
                result = Err(e);
            }
            Err(join) => {
                shutdown.cancel();
                result = Err(crate::error::Error::Corrupt(format!(
                    "worker task failed: {join}"
                )));
            }
        }
    }
    result
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
        let keys = store.keys();
        let mut conn = store.connection();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let active: u64 = conn.zcount(&keys.expiry, now_ms, "+inf").await?;
        self.active_sessions.store(active, Relaxed);
        let len: u64 = conn.xlen(&keys.stream).await?;
        self.stream_length.store(len, Relaxed);
        let groups: redis::RedisResult<Vec<std::collections::HashMap<String, redis::Value>>> =
            redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&keys.stream)
                .query_async(&mut conn)
                .await;
        let int = |v: Option<&redis::Value>| match v {
            Some(redis::Value::Int(i)) => u64::try_from(*i).unwrap_or(0),
            _ => 0,
        };
        if let Ok(groups) = groups
            && let Some(g) = groups.iter().find(|g| {
                matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n.as_slice() == b"audit")
            })
        {
            self.audit_lag.store(int(g.get("lag")), Relaxed);
            self.audit_pending.store(int(g.get("pending")), Relaxed);
            let consumers: redis::RedisResult<Vec<std::collections::HashMap<String, redis::Value>>> =
                redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(&keys.stream)
                    .arg("audit")
                    .query_async(&mut conn)
                    .await;
            let active = consumers
                .map(|cs| cs.iter().filter(|c| int(c.get("idle")) < 30_000).count() as u64)
                .unwrap_or(0);
            self.audit_consumers.store(active, Relaxed);
        }
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut conn)
            .await?;
        if let Some(used) = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
        {
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
