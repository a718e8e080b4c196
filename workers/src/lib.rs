//! The worker process: the audit consumer, the expiry reaper and the healer,
//! side by side, until a shutdown signal. Beside each partition's audit
//! consumer runs the database sweep of overdue sessions
//! ([`vedfolnir_sessions::reaper::OverdueSweeper`]), which needs the same
//! database.
//!
//! The binary `vedfolnir-worker` (`src/main.rs`) parses the configuration,
//! installs the exporters and calls [`run`]; the tests run it in process.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use vedfolnir_sessions::audit::{self, AuditConsumer, AuditSink, ConsumerConfig};
use vedfolnir_sessions::config::Config;
use vedfolnir_sessions::error::Result;
use vedfolnir_sessions::lease::{Leases, Role};
use vedfolnir_sessions::reaper::{Reaper, ReaperConfig};
use vedfolnir_sessions::store::SessionStore;

/// Which parts to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parts {
    /// Every part: the audit consumer, the reaper and the healer.
    Both,
    /// The audit consumer (and the healer, which needs the same database).
    Audit,
    /// Only the reaper.
    Reaper,
    /// Only the healer.
    Healer,
}

impl Parts {
    /// The roles this selection runs; each has leases of its own.
    pub fn roles(self) -> &'static [Role] {
        match self {
            Parts::Both => &Role::ALL,
            Parts::Audit => &[Role::Audit, Role::Healer],
            Parts::Reaper => &[Role::Reaper],
            Parts::Healer => &[Role::Healer],
        }
    }
}

/// Runs the worker until `shutdown` is cancelled. The audit consumer and the
/// healer refuse to start on an audit schema that is behind
/// (`vedfolnir-sessions migrate`).
///
/// Each role the worker runs holds leases of its own (see [`vedfolnir_sessions::lease`]):
/// an audit consumer on a partition's stream and a reaper on its expiry
/// index where the worker holds that role's lease of the partition, and the
/// healer while it holds the healer's single lease. Leases are spread over
/// the workers that run the role and taken over when a worker dies (after
/// `lease_ttl`), so any split of the roles over processes covers every
/// partition. An audit consumer writes under a fencing token that taking the
/// lease bumped in the database, so a worker that lost its lease cannot
/// commit.
pub async fn run(
    config: &Config,
    parts: Parts,
    consumer: ConsumerConfig,
    reaper: ReaperConfig,
    lease_ttl: Duration,
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
    let overdue = vedfolnir_sessions::reaper::OverdueConfig::from_env()?;
    let roles = parts.roles();
    let db = if roles
        .iter()
        .any(|r| matches!(r, Role::Audit | Role::Healer))
    {
        let db = audit::db::connect(&config.database_url).await?;
        audit::db::require_current_schema(&db).await?;
        Some(db)
    } else {
        None
    };
    let shared = Arc::new(Shared {
        config: config.clone(),
        store,
        db,
        consumer,
        reaper,
        overdue,
        lease_ttl,
    });
    for &role in roles {
        tasks.spawn(hold_leases(role, shared.clone(), shutdown.clone()));
    }
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = task_result(done) {
            shutdown.cancel();
            result = Err(e);
        }
    }
    result
}

/// What every role's work needs.
struct Shared {
    config: Config,
    store: SessionStore,
    db: Option<sea_orm::DatabaseConnection>,
    consumer: ConsumerConfig,
    reaper: ReaperConfig,
    overdue: vedfolnir_sessions::reaper::OverdueConfig,
    lease_ttl: Duration,
}

/// Holds `role`'s leases until `shutdown`: starts the role's work on each
/// partition acquired, stops it on each released, and gives up the lease of
/// a partition whose work stopped by itself (its fence was taken over).
async fn hold_leases(role: Role, shared: Arc<Shared>, shutdown: CancellationToken) -> Result<()> {
    let mut leases = Leases::new(
        shared.store.connection(),
        shared.store.keys().clone(),
        shared.consumer.consumer.clone(),
        shared.lease_ttl,
    )
    .with_role(role);
    // Each partition's work, by the generation of its start: work that ends
    // is matched to the start it belongs to, not to a later one.
    let mut running: BTreeMap<u32, (u64, CancellationToken)> = BTreeMap::new();
    let mut generation = 0u64;
    let mut work: tokio::task::JoinSet<(u32, u64, Result<()>)> = tokio::task::JoinSet::new();
    let mut result = Ok(());
    while !shutdown.is_cancelled() {
        match leases.tick().await {
            Ok(change) => {
                for p in &change.released {
                    // A lease that ran out (this process was slow to renew)
                    // and was taken again in the same tick: the work goes on.
                    // If another worker held it meanwhile, it bumped the
                    // fence, and the work stops by itself at its next commit.
                    if change.acquired.contains(p) {
                        tracing::info!(role = %role, partition = p, "lease ran out and was taken again");
                        continue;
                    }
                    if let Some((_, token)) = running.remove(p) {
                        tracing::info!(role = %role, partition = p, "partition released");
                        token.cancel();
                    }
                }
                for p in change.acquired {
                    if running.contains_key(&p) {
                        continue;
                    }
                    tracing::info!(role = %role, partition = p, worker = %leases.name(), "partition taken");
                    let token = shutdown.child_token();
                    generation += 1;
                    running.insert(p, (generation, token.clone()));
                    let (shared, g) = (shared.clone(), generation);
                    work.spawn(async move { (p, g, run_role(role, p, &shared, token).await) });
                }
            }
            Err(e) => tracing::warn!(role = %role, err = %e, "partition lease tick failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(leases.interval()) => {}
            Some(done) = work.join_next() => match done {
                Ok((p, g, Ok(()))) => {
                    // Work that stopped while its lease was still held lost
                    // its fence: let the partition go to its new holder.
                    if running.get(&p).is_some_and(|(current, t)| *current == g && !t.is_cancelled()) {
                        running.remove(&p);
                        tracing::warn!(role = %role, partition = p, "work stopped; giving up the lease");
                        if let Err(e) = leases.release(p).await {
                            tracing::warn!(err = %e, "releasing a lease failed");
                        }
                    }
                }
                Ok((_, _, Err(e))) => {
                    shutdown.cancel();
                    result = Err(e);
                }
                Err(join) => {
                    shutdown.cancel();
                    result = Err(vedfolnir_sessions::error::Error::Corrupt(format!("worker task failed: {join}")));
                }
            },
        }
    }
    // Shutdown: every partition finishes and acknowledges its batch in hand,
    // then the leases go, so that other workers take over at once.
    while let Some(done) = work.join_next().await {
        match done {
            Ok((_, _, Err(e))) => result = Err(e),
            Err(join) => {
                result = Err(vedfolnir_sessions::error::Error::Corrupt(format!(
                    "worker task failed: {join}"
                )))
            }
            Ok(_) => {}
        }
    }
    if let Err(e) = leases.release_all().await {
        tracing::warn!(role = %role, err = %e, "releasing the partition leases failed");
    }
    result
}

fn task_result(done: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match done {
        Ok(r) => r,
        Err(join) => Err(vedfolnir_sessions::error::Error::Corrupt(format!(
            "worker task failed: {join}"
        ))),
    }
}

/// The work of `role` on partition `p` (the healer's single lease: every
/// partition), until `token` is cancelled or, for the audit consumer, its
/// fence is taken over.
async fn run_role(role: Role, p: u32, shared: &Shared, token: CancellationToken) -> Result<()> {
    match role {
        Role::Audit => {
            let Some(db) = shared.db.clone() else {
                return Ok(());
            };
            let keys = shared.store.keys().part(p).clone();
            let sink = AuditSink::new(
                db.clone(),
                shared.config.session_timeout,
                keys.stream.clone(),
            );
            let mut c =
                AuditConsumer::for_partition(&shared.config, &keys, sink, shared.consumer.clone())
                    .await?
                    .with_lease(shared.consumer.consumer.clone(), shared.lease_ttl);
            c.ensure_group().await?;
            tracing::info!(consumer = %c.name(), partition = p, "audit consumer started");
            // Ends the reaper cannot write (no ledger left in Redis), under
            // the same lease as the consumer.
            let sweeper = vedfolnir_sessions::reaper::OverdueSweeper::new(
                shared.store.clone(),
                db,
                shared.overdue.clone(),
            );
            let sweeping = token.child_token();
            let (consumed, swept) = tokio::join!(
                async {
                    let r = c.run(token.clone()).await;
                    // The consumer stopped (shutdown, or its fence was
                    // taken over): so does the sweep of its partition.
                    sweeping.cancel();
                    r
                },
                sweeper.run_partition(p, sweeping.clone())
            );
            consumed.map(|_| ())?;
            swept.map(|_| ())
        }
        Role::Reaper => {
            let r = Reaper::new(shared.store.clone(), shared.reaper.clone());
            tracing::info!(partition = p, "expiry reaper started");
            r.run_partition(p, token).await.map(|_| ())
        }
        Role::Healer => {
            let Some(db) = shared.db.clone() else {
                return Ok(());
            };
            let healer = vedfolnir_sessions::recovery::Healer::new(
                shared.store.clone(),
                db,
                shared.consumer.heal_check,
            );
            tracing::info!("healer started");
            healer.run(token).await.map(|_| ())
        }
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
