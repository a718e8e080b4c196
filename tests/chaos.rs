//! Chaos tests against real services. Each test runs a `redis-server` of its
//! own on a free loopback port, so that it can stop it with `SHUTDOWN NOSAVE`
//! and start it again empty, while app-server tasks, the audit consumer and
//! the healer keep running in-process. Every scenario runs on SQLite and on
//! PostgreSQL.
//!
//! - `loss_under_load_*`: Redis loses everything under a steady write load;
//!   after healing every session the database knew is back, identical, and
//!   the acknowledged events that were lost (the RPO) are measured: bounded by
//!   what the audit group had not acknowledged at the crash, and 0 with
//!   `DB_SESSION_SYNC`.
//! - `outage_with_fallback`: while Redis is down, logins and updates are
//!   staged in the database; when it is back (empty), those sessions are in
//!   Redis and `verify` agrees; the audit trail holds each event once,
//!   contiguously.
//! - `verify_cli_*`: the `verify` command exits 0 when all agree, and exits 1
//!   naming a session whose key was changed behind the store's back.
//! - `fast_restart_*`: a load right after Redis restarted empty is served
//!   from the snapshot even when the store looked at the recovery state less
//!   than a second before.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use redis::AsyncCommands as _;
use redis::aio::MultiplexedConnection;
use sea_orm::{
    ColumnTrait as _, DatabaseConnection, EntityTrait as _, PaginatorTrait as _, QueryFilter as _,
};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vedfolnir_sessions::audit::entity::dead_letters;
use vedfolnir_sessions::audit::entity::session_events;
use vedfolnir_sessions::audit::entity::session_snapshots::{self, SnapshotStatus};
use vedfolnir_sessions::audit::{self, AuditConsumer, AuditSink, ConsumerConfig};
use vedfolnir_sessions::config::RedisTarget;
use vedfolnir_sessions::recovery::{self, Healer, HealerTotals};
use vedfolnir_sessions::{Changes, Config, NewSession, SessionId, SessionStore};
use vedfolnir_tests::db::{Backend, TestDb};
use vedfolnir_tests::redis_server::RedisServer;

/// How often the healer checks the epochs (`HEAL_CHECK_MS`).
const HEAL_CHECK: Duration = Duration::from_millis(100);
/// The app servers' command timeout (`REDIS_TIMEOUT_MS`).
const REDIS_TIMEOUT: Duration = Duration::from_millis(300);
/// Upper bound of every wait on an observable condition.
const PATIENCE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Set-up

/// A configuration on the test's Redis and database, in a namespace of its own.
fn config(server: &RedisServer, db: &TestDb, tweak: impl FnOnce(&mut Config)) -> Config {
    let namespace = format!("vchaos:{}:", uuid::Uuid::new_v4().simple());
    let mut c = Config::default()
        .with_redis(RedisTarget::parse("REDIS_URL", &server.url()).expect("redis url"))
        .with_namespace(&namespace);
    c.redis_timeout = REDIS_TIMEOUT;
    c.database_url = db.url.clone();
    c.db_sync = false;
    c.db_fallback = false;
    tweak(&mut c);
    c
}

/// An app server: a store on its own connection, with the audit database
/// attached on its own pool (as a separate process would have).
async fn app_store(config: &Config) -> SessionStore {
    let db = audit::db::connect(&config.database_url)
        .await
        .expect("app server database");
    SessionStore::connect(config)
        .await
        .expect("app server store")
        .with_audit(AuditSink::new(
            db,
            config.session_timeout,
            config.event_stream.clone(),
        ))
}

/// The worker, in-process: the audit consumer and the healer on their own
/// Redis connections and their own database pool.
struct Worker {
    stop: CancellationToken,
    consumer: JoinHandle<()>,
    healer: JoinHandle<HealerTotals>,
    /// Consumer steps that failed (Redis or the database unreachable).
    failed_steps: Arc<AtomicU64>,
}

impl Worker {
    async fn start(config: &Config) -> Worker {
        // The worker is a process of its own, with the default command
        // timeout: the short one is the app servers'.
        let mut config = config.clone();
        config.redis_timeout = Duration::from_secs(2);
        let config = &config;
        let db = audit::db::connect(&config.database_url)
            .await
            .expect("worker database");
        audit::db::require_current_schema(&db)
            .await
            .expect("migrated");
        let store = SessionStore::connect(config).await.expect("worker store");
        let healer = Healer::new(store, db.clone(), HEAL_CHECK);
        let sink = AuditSink::new(db, config.session_timeout, config.event_stream.clone());
        let cfg = ConsumerConfig {
            block: Duration::from_millis(50),
            batch: 200,
            retention: Duration::from_secs(600),
            retry_max: Duration::from_millis(200),
            ..ConsumerConfig::default()
        };
        let mut consumer = AuditConsumer::new(config, sink, cfg)
            .await
            .expect("consumer");
        consumer.ensure_group().await.expect("group");
        let stop = CancellationToken::new();
        let failed_steps = Arc::new(AtomicU64::new(0));
        let consumer = {
            let stop = stop.clone();
            let failed = failed_steps.clone();
            // `AuditConsumer::run` with its step failures counted, so the test
            // can tell when a batch in flight at a crash has been settled.
            tokio::spawn(async move {
                let mut backoff = Duration::from_millis(20);
                while !stop.is_cancelled() {
                    match consumer.step(&stop).await {
                        Ok(_) => backoff = Duration::from_millis(20),
                        Err(_) => {
                            failed.fetch_add(1, Ordering::SeqCst);
                            tokio::select! {
                                _ = stop.cancelled() => break,
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(Duration::from_millis(200));
                        }
                    }
                }
            })
        };
        let healer = {
            let stop = stop.clone();
            tokio::spawn(async move { healer.run(stop).await.expect("healer") })
        };
        Worker {
            stop,
            consumer,
            healer,
            failed_steps,
        }
    }

    async fn stop(self) -> HealerTotals {
        self.stop.cancel();
        self.consumer.await.expect("consumer task");
        self.healer.await.expect("healer task")
    }
}

// ---------------------------------------------------------------------------
// Observations

/// Waits (bounded) until `cond` holds.
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `op` as a client retrying a 503 would: an answer of "unavailable"
/// (the write is refused, not lost: within the settle window after some
/// process last reached Redis, no app server stages writes) is retried until
/// the window is over.
async fn retrying<T, F, Fut>(mut op: F) -> vedfolnir_sessions::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = vedfolnir_sessions::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + REDIS_TIMEOUT * 2 + Duration::from_secs(2);
    loop {
        match op().await {
            Err(e) if e.is_unavailable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Redis holds the data set the audit database knows complete (the same
/// epoch), and nothing staged during an outage waits for it.
async fn healed(_conn: MultiplexedConnection, store: &SessionStore) -> bool {
    let normal = matches!(
        store.recovery_state(store.keys().part(0)).await,
        Ok(vedfolnir_sessions::store::RecoveryState::Normal { .. })
    );
    normal && store.staged_count().await.is_ok_and(|n| n == 0)
}

fn parse_id(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').unwrap_or((id, "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

/// The audit group has committed and acknowledged every entry of the stream.
async fn audit_caught_up(mut conn: MultiplexedConnection, stream: &str) -> bool {
    let last: redis::streams::StreamRangeReply =
        match conn.xrevrange_count(stream, "+", "-", 1).await {
            Ok(r) => r,
            Err(_) => return false,
        };
    let Some(last) = last.ids.first() else {
        return true;
    };
    let groups: redis::streams::StreamInfoGroupsReply = match conn.xinfo_groups(stream).await {
        Ok(g) => g,
        Err(_) => return false,
    };
    groups.groups.iter().any(|g| {
        g.name == "audit" && g.pending == 0 && parse_id(&g.last_delivered_id) >= parse_id(&last.id)
    })
}

/// The `op` number a test mutation carried in its payload.
fn op_of(v: &Value) -> Option<u64> {
    match v {
        Value::Object(o) => o
            .get("op")
            .and_then(Value::as_u64)
            .or_else(|| o.values().find_map(op_of)),
        _ => None,
    }
}

async fn all_events(db: &DatabaseConnection) -> Vec<session_events::Model> {
    session_events::Entity::find()
        .all(db)
        .await
        .expect("session_events")
}

async fn event_count(db: &DatabaseConnection) -> u64 {
    session_events::Entity::find()
        .count(db)
        .await
        .expect("count")
}

async fn live_snapshots(db: &DatabaseConnection) -> BTreeMap<String, session_snapshots::Model> {
    session_snapshots::Entity::find()
        .filter(session_snapshots::Column::Status.eq(SnapshotStatus::Live))
        .all(db)
        .await
        .expect("snapshots")
        .into_iter()
        .map(|s| (s.session_id.clone(), s))
        .collect()
}

/// Every session's seq runs 1..n without a gap and no event is there twice.
fn assert_contiguous(events: &[session_events::Model]) -> BTreeMap<String, i64> {
    let ids: HashSet<_> = events.iter().map(|e| e.event_id).collect();
    assert_eq!(
        ids.len(),
        events.len(),
        "an event is in the audit table twice"
    );
    let mut by_session: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for e in events {
        by_session
            .entry(e.session_id.clone())
            .or_default()
            .push(e.seq);
    }
    by_session
        .into_iter()
        .map(|(sid, mut seqs)| {
            seqs.sort_unstable();
            let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
            assert_eq!(seqs, expected, "seq of session {sid} is not contiguous");
            (sid, seqs.len() as i64)
        })
        .collect()
}

async fn dead_letter_count(db: &DatabaseConnection) -> u64 {
    dead_letters::Entity::find()
        .count(db)
        .await
        .expect("dead letters")
}

/// Asserts that Redis holds exactly the snapshot's JSON, with a TTL within
/// 1 s of the snapshot's deadline.
async fn assert_restored(
    conn: &mut MultiplexedConnection,
    store: &SessionStore,
    snap: &session_snapshots::Model,
) {
    let id: SessionId = snap.session_id.parse().expect("session id");
    let key = store.keys().session(&id);
    let (json, pttl): (Option<String>, i64) = redis::pipe()
        .get(&key)
        .pttl(&key)
        .query_async(conn)
        .await
        .expect("get and pttl");
    let expected_ttl = snap
        .expires_at
        .map(|t| (t - Utc::now()).num_milliseconds())
        .expect("a live snapshot has a deadline");
    assert_eq!(
        json.as_deref(),
        Some(snap.state.as_str()),
        "session {id} is not back identical to its snapshot"
    );
    assert!(
        (pttl - expected_ttl).abs() <= 1000,
        "session {id}: TTL {pttl} ms, snapshot deadline in {expected_ttl} ms"
    );
}

/// Waits until a store's connection works again after a restart of Redis.
async fn reconnected(store: &SessionStore) {
    eventually("the store to reconnect", || async {
        store.health().await.redis_reachable
    })
    .await;
}

// ---------------------------------------------------------------------------
// 1. Loss of all Redis data under load

/// One acknowledged mutation.
#[derive(Debug, Clone)]
struct Ack {
    session_id: SessionId,
    op: u64,
    version: u64,
    json: String,
}

#[derive(Debug, Default)]
struct WriterLog {
    acks: Vec<Ack>,
    /// The sessions it created first and never changed again.
    cold: Vec<SessionId>,
    /// Typed "Redis unreachable" errors.
    unavailable: u64,
    /// Anything else (none expected).
    unexpected: Vec<String>,
    /// Reads of a session this writer owns that came back empty (never
    /// expected: an unreachable Redis must be an error).
    empty_reads: u64,
}

#[derive(Debug, Default)]
struct Counters {
    acked: AtomicU64,
    errors: AtomicU64,
}

/// Sessions each writer creates first and then leaves alone (users who
/// logged in and went idle): the oldest entries of the stream, so audited
/// long before the crash.
const COLD_SESSIONS: usize = 2;
/// The interval between two mutations of one writer.
const WRITER_PACE: Duration = Duration::from_millis(4);

/// An app-server task: logs users in and updates their sessions at a steady
/// pace, each mutation carrying a unique `op` number.
async fn writer(
    w: i64,
    store: SessionStore,
    ops: Arc<AtomicU64>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) -> WriterLog {
    let mut log = WriterLog::default();
    let mut mine: Vec<SessionId> = Vec::new();
    let mut i = 0usize;
    // A steady load: at most one mutation per pace per writer.
    let mut pace = tokio::time::interval(WRITER_PACE);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.is_cancelled() {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = pace.tick() => {}
        }
        i += 1;
        let op = ops.fetch_add(1, Ordering::SeqCst);
        let result = if i <= COLD_SESSIONS || mine.len() < 4 || i.is_multiple_of(8) {
            store
                .create(NewSession::for_user(w, format!("writer{w}")).with("op", op))
                .await
                .map(|c| {
                    if i <= COLD_SESSIONS {
                        log.cold.push(c.session_id.clone());
                    } else {
                        mine.push(c.session_id.clone());
                    }
                    (c.session_id, c.session)
                })
        } else {
            let id = mine[i % mine.len()].clone();
            store
                .update(&id, Changes::new().with_set("op", op).with_set("i", i))
                .await
                .map(|s| (id, s))
        };
        let failed = match result {
            Ok((session_id, s)) => {
                log.acks.push(Ack {
                    session_id,
                    op,
                    version: s.version(),
                    json: s.to_json(),
                });
                counters.acked.fetch_add(1, Ordering::SeqCst);
                false
            }
            Err(e) if e.is_unavailable() => {
                log.unavailable += 1;
                true
            }
            Err(e) => {
                log.unexpected.push(e.to_string());
                true
            }
        };
        if i.is_multiple_of(16)
            && let Some(id) = mine.first()
        {
            match store.get(id).await {
                Ok(Some(_)) => {}
                Ok(None) => log.empty_reads += 1,
                Err(e) if e.is_unavailable() => {}
                Err(e) => log.unexpected.push(format!("get: {e}")),
            }
        }
        if failed {
            counters.errors.fetch_add(1, Ordering::SeqCst);
            // Pace the retries of a writer that cannot reach Redis.
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    }
    log
}

/// What the stream held at the crash that the audit group had not
/// acknowledged: the `op` numbers of those entries.
struct AtCrash {
    stream_entries: usize,
    unacked_ops: HashSet<u64>,
}

/// Freezes writes (`CLIENT PAUSE … WRITE`: scripts, `XADD`, `XREADGROUP`,
/// `XACK` wait; reads go on), reads what the audit group has not
/// acknowledged, and kills the server without saving: exactly that is what a
/// crash at this instant loses.
async fn crash(server: &mut RedisServer, stream: &str) -> AtCrash {
    let mut admin = server.connection().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(30_000)
        .arg("WRITE")
        .query_async(&mut admin)
        .await
        .expect("client pause");
    let entries: redis::streams::StreamRangeReply = admin.xrange_all(stream).await.expect("xrange");
    let groups: redis::streams::StreamInfoGroupsReply =
        admin.xinfo_groups(stream).await.expect("xinfo groups");
    let group = groups
        .groups
        .into_iter()
        .find(|g| g.name == "audit")
        .expect("the audit group");
    let pending: redis::streams::StreamPendingCountReply = admin
        .xpending_count(stream, "audit", "-", "+", group.pending.max(1))
        .await
        .expect("xpending");
    server.shutdown_on(&mut admin).await;
    let pending: HashSet<String> = pending.ids.into_iter().map(|p| p.id).collect();
    let delivered = parse_id(&group.last_delivered_id);
    let unacked_ops = entries
        .ids
        .iter()
        .filter(|e| parse_id(&e.id) > delivered || pending.contains(&e.id))
        .filter_map(|e| {
            let payload: String = e.get("payload")?;
            op_of(&serde_json::from_str(&payload).ok()?)
        })
        .collect();
    AtCrash {
        stream_entries: entries.ids.len(),
        unacked_ops,
    }
}

async fn loss_under_load(backend: Backend, db_sync: bool) {
    const WRITERS: i64 = 4;
    let started = Instant::now();
    let mut server = RedisServer::start().await;
    let test_db = TestDb::new(backend).await;
    let db = &test_db.db;
    let config = config(&server, &test_db, |c| c.db_sync = db_sync);
    let admin = server.connection().await;
    let worker = Worker::start(&config).await;
    let observer = app_store(&config).await;
    eventually("the healer to record the namespace's epoch", || {
        healed(admin.clone(), &observer)
    })
    .await;

    // Steady load from several app servers.
    let ops = Arc::new(AtomicU64::new(1));
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let mut writers = Vec::new();
    let mut stores = Vec::new();
    for w in 0..WRITERS {
        let store = app_store(&config).await;
        stores.push(store.clone());
        writers.push(tokio::spawn(writer(
            w,
            store,
            ops.clone(),
            counters.clone(),
            stop.clone(),
        )));
    }
    let load_started = Instant::now();
    eventually("load acknowledged and partly audited", || async {
        counters.acked.load(Ordering::SeqCst) >= 400 && event_count(db).await >= 300
    })
    .await;

    // Crash: Redis loses everything.
    let failed_before = worker.failed_steps.load(Ordering::SeqCst);
    let errors_before = counters.errors.load(Ordering::SeqCst);
    let acked_at_crash = counters.acked.load(Ordering::SeqCst);
    let at_crash = crash(&mut server, &config.event_stream).await;
    let load_secs = load_started.elapsed().as_secs_f64();
    // The consumer's batch in flight (if any) is settled once a step fails.
    eventually("the consumer to notice the crash", || async {
        worker.failed_steps.load(Ordering::SeqCst) > failed_before
    })
    .await;
    // The writers keep going and get typed errors.
    eventually("the writers to hit the outage", || async {
        counters.errors.load(Ordering::SeqCst) >= errors_before + WRITERS as u64
    })
    .await;
    stop.cancel();
    let mut logs = Vec::new();
    for w in writers {
        logs.push(w.await.expect("writer task"));
    }
    let outage_errors: u64 = logs.iter().map(|l| l.unavailable).sum();
    for l in &logs {
        assert!(
            l.unexpected.is_empty(),
            "untyped errors: {:?}",
            l.unexpected
        );
        assert_eq!(
            l.empty_reads, 0,
            "an unreachable Redis must be an error, never an empty session"
        );
    }

    // What reached the database before the crash, and what was lost.
    let before = live_snapshots(db).await;
    let audited_ops: HashSet<u64> = all_events(db)
        .await
        .iter()
        .filter_map(|e| op_of(&serde_json::from_str(&e.payload).ok()?))
        .collect();
    let acks: Vec<&Ack> = logs.iter().flat_map(|l| &l.acks).collect();
    let lost: Vec<&Ack> = acks
        .iter()
        .copied()
        .filter(|a| !audited_ops.contains(&a.op))
        .collect();
    let rpo = lost.len();
    println!("RPO (db_sync={db_sync}): {rpo} acknowledged events lost");
    println!(
        "  {backend:?}: {WRITERS} writers, {} mutations acknowledged in {load_secs:.2} s \
         ({:.0}/s) before the crash; {} stream entries at the crash, {} not yet \
         acknowledged by the audit group; {outage_errors} typed errors during the outage",
        acked_at_crash,
        acked_at_crash as f64 / load_secs,
        at_crash.stream_entries,
        at_crash.unacked_ops.len(),
    );
    for a in &lost {
        assert!(
            at_crash.unacked_ops.contains(&a.op),
            "op {} of {} was acknowledged and audited-or-in-flight, yet is lost",
            a.op,
            a.session_id
        );
    }
    assert!(rpo <= at_crash.unacked_ops.len());
    if db_sync {
        assert_eq!(rpo, 0, "DB_SESSION_SYNC must lose nothing acknowledged");
    }

    // Redis comes back empty; the worker heals it with no operator.
    let heal_started = Instant::now();
    server.restart().await;
    let mut admin = server.connection().await;
    eventually("the healer to replay", || healed(admin.clone(), &observer)).await;
    let heal_secs = heal_started.elapsed().as_secs_f64();
    println!(
        "  restart to healed: {heal_secs:.2} s, {} live sessions restored",
        before.len()
    );
    for snap in before.values() {
        assert_restored(&mut admin, &observer, snap).await;
    }
    // The app servers' connections died with the server: the first command
    // after the restart can fail (typed, unavailable) while they reconnect.
    let app = &stores[0];
    reconnected(&observer).await;
    reconnected(app).await;
    // Every session whose last acknowledged event reached the database is
    // back exactly as its user last saw it.
    let mut last_ack: HashMap<&SessionId, &Ack> = HashMap::new();
    for a in &acks {
        let e = last_ack.entry(&a.session_id).or_insert(a);
        if a.version > e.version {
            *e = a;
        }
    }
    let mut identical = 0;
    for (id, a) in &last_ack {
        if !audited_ops.contains(&a.op) {
            continue;
        }
        let snap = &before[id.as_str()];
        assert!(snap.seq as u64 >= a.version);
        if snap.seq as u64 == a.version {
            let json: Option<String> = admin.get(observer.keys().session(id)).await.expect("get");
            assert_eq!(json.as_deref(), Some(a.json.as_str()), "session {id}");
            identical += 1;
        }
    }
    let cold: Vec<&SessionId> = logs.iter().flat_map(|l| &l.cold).collect();
    assert_eq!(cold.len(), COLD_SESSIONS * WRITERS as usize);
    for id in &cold {
        assert!(
            before.contains_key(id.as_str()) && audited_ops.contains(&last_ack[id].op),
            "idle session {id} should have been audited long before the crash"
        );
    }
    assert!(
        identical >= cold.len(),
        "{identical} sessions back as last seen"
    );
    // Sessions whose creation was lost are gone, not half there.
    for a in &lost {
        if !before.contains_key(a.session_id.as_str()) {
            assert_eq!(observer.get(&a.session_id).await.expect("get"), None);
        }
    }

    // Versions continue from the database, and the log stays contiguous.
    for (sid, snap) in &before {
        let id: SessionId = sid.parse().expect("id");
        let s = app
            .update(&id, Changes::new().with_set("after_heal", true))
            .await
            .expect("update after healing");
        assert_eq!(s.version(), snap.seq as u64 + 1);
    }
    eventually("the audit consumer to catch up", || {
        audit_caught_up(admin.clone(), &config.event_stream)
    })
    .await;
    let seqs = assert_contiguous(&all_events(db).await);
    for (sid, snap) in &before {
        assert_eq!(seqs[sid], snap.seq + 1, "session {sid}");
    }
    assert_eq!(dead_letter_count(db).await, 0);
    let report = recovery::verify(&observer, db).await.expect("verify");
    assert!(report.ok && report.lag.is_empty(), "{report:?}");
    assert_eq!(report.agree, before.len() as u64);
    let totals = worker.stop().await;
    // One replay healed the crash: the worker's or an app server's,
    // whichever took the healing lock first. A fresh namespace is none.
    assert!(totals.recoveries <= 1, "{totals:?}");
    println!("  whole scenario: {:.2} s", started.elapsed().as_secs_f64());
}

async fn loss_under_load_async_audit(backend: Backend) {
    loss_under_load(backend, false).await;
}

async fn loss_under_load_sync_audit(backend: Backend) {
    loss_under_load(backend, true).await;
}

// ---------------------------------------------------------------------------
// 2. An outage with the database fallback on

async fn outage_with_fallback(backend: Backend) {
    let started = Instant::now();
    let mut server = RedisServer::start().await;
    let test_db = TestDb::new(backend).await;
    let db = &test_db.db;
    let config = config(&server, &test_db, |c| c.db_fallback = true);
    let admin = server.connection().await;
    let worker = Worker::start(&config).await;
    let store = app_store(&config).await;
    eventually("the healer to record the namespace's epoch", || {
        healed(admin.clone(), &store)
    })
    .await;

    let mut acked = 0u64;
    let mut existing = Vec::new();
    for u in 0..8 {
        let c = store
            .create(NewSession::for_user(u, format!("user{u}")))
            .await
            .expect("create");
        store
            .update(&c.session_id, Changes::new().with_set("theme", "dark"))
            .await
            .expect("update");
        existing.push(c.session_id);
        acked += 2;
    }
    eventually("the audit consumer to catch up", || {
        audit_caught_up(admin.clone(), &config.event_stream)
    })
    .await;
    assert_eq!(event_count(db).await, acked);

    // Redis goes away.
    server.shutdown_nosave().await;
    let outage_started = Instant::now();
    let mut latencies = Vec::new();
    let mut last: BTreeMap<SessionId, String> = BTreeMap::new();
    // Logins and updates of existing sessions, concurrently as app servers
    // would serve them.
    let logins = (100..104).map(|u| {
        let store = store.clone();
        async move {
            let t = Instant::now();
            let c = store
                .create(NewSession::for_user(u, format!("user{u}")))
                .await
                .expect("login during the outage");
            (c.session_id, c.session.to_json(), t.elapsed())
        }
    });
    let updates = existing.iter().cloned().map(|id| {
        let store = store.clone();
        async move {
            let t = Instant::now();
            let s = retrying(|| store.update(&id, Changes::new().with_set("during_outage", true)))
                .await
                .expect("update during the outage");
            (id, s.to_json(), t.elapsed())
        }
    });
    let (a, b) = tokio::join!(
        futures::future::join_all(logins),
        futures::future::join_all(updates)
    );
    let mut made = Vec::new();
    for (id, json, took) in a {
        made.push(id.clone());
        last.insert(id, json);
        latencies.push(took);
    }
    for (id, json, took) in b {
        last.insert(id, json);
        latencies.push(took);
    }
    acked += 12;
    // The new sessions are usable during the outage too.
    let second = made.iter().cloned().map(|id| {
        let store = store.clone();
        async move {
            let t = Instant::now();
            let s = store
                .update(&id, Changes::new().with_set("cart", 3))
                .await
                .expect("update of a session made during the outage");
            (id, s.to_json(), t.elapsed())
        }
    });
    for (id, json, took) in futures::future::join_all(second).await {
        last.insert(id, json);
        latencies.push(took);
    }
    acked += 4;
    let outage_ops = 16u64;
    // Loads are served from the snapshots.
    let t = Instant::now();
    let one = store
        .get(&existing[0])
        .await
        .expect("read during the outage");
    let one_load = t.elapsed();
    assert_eq!(one.map(|s| s.to_json()).as_ref(), last.get(&existing[0]));
    let reads = last.iter().map(|(id, json)| {
        let store = store.clone();
        async move {
            let s = store
                .get(id)
                .await
                .expect("read during the outage")
                .expect("served from the database");
            assert_eq!(&s.to_json(), json);
        }
    });
    futures::future::join_all(reads).await;
    assert_eq!(store.fallback_writes(), outage_ops);
    // Staged in the database (durably, not in this process's memory), not
    // yet in the event table: they take their place in the log through Redis.
    assert_eq!(store.staged_count().await.expect("staged"), outage_ops);
    assert_eq!(event_count(db).await, acked - outage_ops);
    let max_latency = latencies.iter().max().copied().unwrap_or_default();
    let mean_latency = latencies.iter().sum::<Duration>() / latencies.len() as u32;
    let outage_secs = outage_started.elapsed().as_secs_f64();

    // Redis comes back, empty.
    server.restart().await;
    let mut admin = server.connection().await;
    // The app server projects what it staged during the outage before its
    // next read; the worker replays everything else (or the app server
    // does, whichever notices first).
    let _ = store.get(&existing[0]).await;
    eventually("the replay and the projection", || {
        healed(admin.clone(), &store)
    })
    .await;
    // The staged events reach the audit table through the stream.
    eventually("the audit consumer to catch up", || async {
        audit_caught_up(admin.clone(), &config.event_stream).await && event_count(db).await >= acked
    })
    .await;
    println!(
        "outage with fallback ({backend:?}): {outage_ops} mutations served by the database in \
         {outage_secs:.2} s (latency mean {mean_latency:?}, max {max_latency:?}); \
         one load alone: {one_load:?}"
    );

    let snaps = live_snapshots(db).await;
    assert_eq!(snaps.len(), 12);
    for (id, json) in &last {
        let snap = &snaps[id.as_str()];
        assert_eq!(&snap.state, json);
        assert_restored(&mut admin, &store, snap).await;
    }
    let report = recovery::verify(&store, db).await.expect("verify");
    assert!(report.ok && report.lag.is_empty(), "{report:?}");
    assert_eq!(report.agree, 12);
    let events = all_events(db).await;
    assert_contiguous(&events);
    assert_eq!(events.len() as u64, acked, "each event exactly once");
    assert_eq!(dead_letter_count(db).await, 0);

    // Back on Redis: versions continue after the fallback events, through the
    // stream and the consumer, and nothing is counted twice.
    for id in &made {
        let before = snaps[id.as_str()].seq as u64;
        let s = store
            .update(id, Changes::new().with_set("back", true))
            .await
            .expect("update after the outage");
        assert_eq!(s.version(), before + 1);
        acked += 1;
    }
    eventually("the audit consumer to catch up", || async {
        audit_caught_up(admin.clone(), &config.event_stream).await && event_count(db).await >= acked
    })
    .await;
    let events = all_events(db).await;
    assert_contiguous(&events);
    assert_eq!(events.len() as u64, acked, "each event exactly once");
    assert_eq!(dead_letter_count(db).await, 0);
    let report = recovery::verify(&store, db).await.expect("verify");
    assert!(report.ok && report.lag.is_empty(), "{report:?}");
    assert_eq!(report.agree, 12);
    worker.stop().await;
    println!("  whole scenario: {:.2} s", started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------
// 3. `verify` through the CLI binary

async fn run_verify(config: &Config) -> (i32, Value, String) {
    let out = tokio::process::Command::new(vedfolnir_tests::binary("vedfolnir-sessions"))
        .arg("verify")
        .env_clear()
        .env("REDIS_URL", config.redis.expose_url())
        .env("REDIS_SESSION_PREFIX", &config.session_prefix)
        .env("REDIS_EVENT_STREAM", &config.event_stream)
        .env("DATABASE_URL", &config.database_url)
        .output()
        .await
        .expect("run vedfolnir-sessions verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("verify printed no JSON ({e}): {stdout}"));
    (
        out.status.code().unwrap_or(-1),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn verify_cli_names_a_tampered_key(backend: Backend) {
    let server = RedisServer::start().await;
    let test_db = TestDb::new(backend).await;
    let db = &test_db.db;
    let config = config(&server, &test_db, |_| {});
    let mut admin = server.connection().await;
    let worker = Worker::start(&config).await;
    let store = app_store(&config).await;
    let mut ids = Vec::new();
    for u in 0..5 {
        let c = store
            .create(NewSession::for_user(u, format!("user{u}")))
            .await
            .expect("create");
        store
            .update(&c.session_id, Changes::new().with_set("role", "viewer"))
            .await
            .expect("update");
        ids.push(c.session_id);
    }
    eventually("the audit consumer to catch up", || async {
        audit_caught_up(admin.clone(), &config.event_stream).await && event_count(db).await == 10
    })
    .await;

    let (code, report, stderr) = run_verify(&config).await;
    assert_eq!(code, 0, "verify failed: {report:#} {stderr}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["agree"], 5);

    // An admin edits a session key by hand, keeping its TTL.
    let victim = &ids[2];
    let key = store.keys().session(victim);
    let raw: String = admin.get(&key).await.expect("get");
    let forged = raw.replace("\"viewer\"", "\"admin\"");
    assert_ne!(forged, raw);
    let _: () = admin
        .set_options(
            &key,
            &forged,
            redis::SetOptions::default().with_expiration(redis::SetExpiry::KEEPTTL),
        )
        .await
        .expect("tamper");
    let ttl: i64 = admin.pttl(&key).await.expect("pttl");
    assert!(ttl > 0, "the TTL was kept");

    let (code, report, stderr) = run_verify(&config).await;
    assert_eq!(code, 1, "verify must fail: {report:#}");
    assert_eq!(report["ok"], false);
    let divergences = report["divergences"].as_array().expect("divergences");
    assert_eq!(divergences.len(), 1, "{report:#}");
    assert_eq!(divergences[0]["session_id"], victim.as_str());
    assert_eq!(divergences[0]["kind"], "different");
    assert!(stderr.contains("1 divergence"), "{stderr}");

    // A live session missing from Redis is named too.
    let gone = &ids[4];
    let _: () = admin.del(store.keys().session(gone)).await.expect("del");
    let (code, report, _) = run_verify(&config).await;
    assert_eq!(code, 1, "verify must fail: {report:#}");
    let named: BTreeMap<String, String> = report["divergences"]
        .as_array()
        .expect("divergences")
        .iter()
        .map(|d| {
            (
                d["session_id"].as_str().unwrap_or_default().to_owned(),
                d["kind"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(named.len(), 2, "{report:#}");
    assert_eq!(named[victim.as_str()], "different");
    assert_eq!(named[gone.as_str()], "missing");
    worker.stop().await;
}

// ---------------------------------------------------------------------------
// 4. A restart within a second of an app server's last miss

/// Redis restarts empty less than a second after this app server last
/// looked up the recovery state (on a miss for an unknown cookie). Until the
/// worker notices, a load of an audited session must still be served from its
/// snapshot: the epoch is gone, and the store must not trust an earlier
/// "not recovering".
async fn fast_restart_keeps_audited_users_logged_in(backend: Backend) {
    let mut server = RedisServer::start().await;
    let test_db = TestDb::new(backend).await;
    let config = config(&server, &test_db, |c| c.db_sync = true);
    let store = app_store(&config).await;
    // The worker's first check (no healer runs afterwards: the window before
    // it notices the loss is what this test looks at).
    let healer_db = audit::db::connect(&config.database_url).await.expect("db");
    let healer = Healer::new(app_store(&config).await, healer_db, HEAL_CHECK);
    assert!(
        healer.check().await.expect("first check").is_none(),
        "a fresh namespace is not a recovery"
    );
    let c = store
        .create(NewSession::for_user(7, "seven"))
        .await
        .expect("create (committed to the database before it returns)");
    // An unknown cookie: a miss, and the store reads the recovery state.
    let random = vedfolnir_sessions::Token::generate().session_id();
    assert_eq!(store.get(&random).await.expect("miss"), None);
    let looked = Instant::now();
    server.shutdown_nosave().await;
    server.restart().await;
    reconnected(&store).await;
    let within = looked.elapsed();
    let got = store.get(&c.session_id).await.expect("load");
    println!("load {within:?} after the last recovery check: {got:?}");
    assert_eq!(
        got.map(|s| s.to_json()),
        Some(c.session.to_json()),
        "an audited user was logged out while Redis was recovering"
    );
}

vedfolnir_tests::on_both_backends!(
    loss_under_load_async_audit,
    loss_under_load_sync_audit,
    outage_with_fallback,
    verify_cli_names_a_tampered_key,
    fast_restart_keeps_audited_users_logged_in,
);
