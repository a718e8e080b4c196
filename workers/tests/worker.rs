//! The `vedfolnir-worker` process against the real Redis and both real
//! databases: killed with SIGKILL mid-run and started again, stopped with
//! SIGTERM while a batch is in hand, refused on a schema that is behind, and
//! cut off from PostgreSQL by a TCP proxy.
//!
//! Every wait is a bounded poll on something the test can observe: the
//! consumer group and its consumers (`XINFO`), the pending entries list
//! (`XPENDING`), rows in the database, the process's exit, the proxy's
//! connection counters.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::AsyncCommands as _;
use redis::streams::{StreamInfoConsumersReply, StreamInfoGroup, StreamInfoGroupsReply};
use sea_orm::{
    ColumnTrait as _, ConnectionTrait as _, DatabaseConnection, EntityTrait as _,
    PaginatorTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _,
    TransactionTrait as _,
};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vedfolnir_sessions::audit::entity::{dead_letters, session_events, session_snapshots};
use vedfolnir_sessions::{Changes, NewSession, Record, SessionId, SessionStore};
use vedfolnir_tests::TestContext;
use vedfolnir_tests::db::{Backend, TestDb, pg_base_url};

const BIN: &str = env!("CARGO_BIN_EXE_vedfolnir-worker");
const GROUP: &str = "audit";

/// A bounded wait: `tick` sleeps briefly and fails the test once the limit
/// has passed.
struct Deadline {
    what: &'static str,
    at: Instant,
}

impl Deadline {
    fn new(what: &'static str, limit: Duration) -> Self {
        Deadline {
            what,
            at: Instant::now() + limit,
        }
    }

    async fn tick(&self) {
        self.tick_every(Duration::from_millis(10)).await;
    }

    async fn tick_every(&self, pause: Duration) {
        self.tick_saying(pause, String::new).await;
    }

    /// Like `tick`, with what was observed last in the failure message.
    async fn tick_saying(&self, pause: Duration, observed: impl FnOnce() -> String) {
        if Instant::now() >= self.at {
            panic!("timed out waiting for {} {}", self.what, observed());
        }
        tokio::time::sleep(pause).await;
    }
}

/// A `vedfolnir-worker` process configured for one test's namespace and
/// database. Its log (stderr) goes to a file that is printed when a test
/// fails; the process is killed when the value drops.
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn start(ctx: &TestContext, database_url: &str, extra: &[(&str, &str)]) -> Self {
        Self::start_with(ctx, database_url, extra, &[])
    }

    /// Like `start`, with command-line arguments (`--only audit`).
    fn start_with(
        ctx: &TestContext,
        database_url: &str,
        extra: &[(&str, &str)],
        args: &[&str],
    ) -> Self {
        let log = std::env::temp_dir().join(format!(
            "vtest_worker_{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log).expect("create the worker log");
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("REDIS_URL", vedfolnir_tests::redis_url())
            .env("REDIS_SESSION_PREFIX", &ctx.config.session_prefix)
            .env("REDIS_EVENT_STREAM", &ctx.config.event_stream)
            .env(
                "REDIS_SESSION_TIMEOUT",
                ctx.config.session_timeout.as_secs().to_string(),
            )
            .env("DATABASE_URL", database_url)
            .env("AUDIT_BLOCK_MS", "100")
            .env("AUDIT_CLAIM_IDLE_MS", "300")
            // Keep acknowledged entries, so the stream is the reference the
            // database is compared with.
            .env("AUDIT_STREAM_RETENTION_SECS", "600")
            .env("AUDIT_DB_RETRY_MAX_MS", "200")
            .env("REAPER_INTERVAL_MS", "200")
            .env("WORKER_LEASE_MS", "600");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start vedfolnir-worker");
        Worker { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal with the `kill` command (`TERM`, `KILL`, …).
    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits (bounded) for the process to end.
    async fn exit(&mut self, limit: Duration) -> ExitStatus {
        let d = Deadline::new("the worker to exit", limit);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            d.tick().await;
        }
    }

    /// Whether `consumer` is this process's name in the group: names are
    /// `<host>-<pid>-<random>`.
    fn owns(&self, consumer: &str) -> bool {
        consumer
            .rsplit_once('-')
            .is_some_and(|(head, _)| head.ends_with(&format!("-{}", self.pid())))
    }

    /// Waits (bounded) until the group exists and this process has joined it
    /// as a consumer; returns the consumer's name.
    async fn wait_until_consuming(&mut self, ctx: &TestContext) -> String {
        let d = Deadline::new(
            "the worker to join the consumer group",
            Duration::from_secs(10),
        );
        loop {
            assert!(self.running(), "the worker exited:\n{}", self.log());
            if group(ctx).await.is_some()
                && let Some(c) = consumers(ctx).await.into_iter().find(|c| self.owns(c))
            {
                return c;
            }
            d.tick().await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- log of vedfolnir-worker {} ---\n{}",
                self.pid(),
                self.log()
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The group `audit` of the test's stream, if it exists.
async fn group(ctx: &TestContext) -> Option<StreamInfoGroup> {
    let reply: redis::RedisResult<StreamInfoGroupsReply> =
        ctx.conn().xinfo_groups(&ctx.config.event_stream).await;
    reply.ok()?.groups.into_iter().find(|g| g.name == GROUP)
}

/// The names of the group's consumers.
async fn consumers(ctx: &TestContext) -> Vec<String> {
    let reply: redis::RedisResult<StreamInfoConsumersReply> = ctx
        .conn()
        .xinfo_consumers(&ctx.config.event_stream, GROUP)
        .await;
    reply
        .map(|r| r.consumers.into_iter().map(|c| c.name).collect())
        .unwrap_or_default()
}

/// Entries delivered to `consumer` and not acknowledged.
async fn pending_of(ctx: &TestContext, consumer: &str) -> usize {
    let reply: StreamInfoConsumersReply = ctx
        .conn()
        .xinfo_consumers(&ctx.config.event_stream, GROUP)
        .await
        .expect("xinfo consumers");
    reply
        .consumers
        .into_iter()
        .find(|c| c.name == consumer)
        .map(|c| c.pending)
        .unwrap_or(0)
}

/// The ids of every entry the group has delivered and not acknowledged.
async fn pending_ids(ctx: &TestContext) -> HashSet<String> {
    let reply: redis::streams::StreamPendingCountReply = ctx
        .conn()
        .xpending_count(&ctx.config.event_stream, GROUP, "-", "+", 100_000)
        .await
        .expect("xpending");
    reply.ids.into_iter().map(|p| p.id).collect()
}

async fn pending_count(ctx: &TestContext) -> usize {
    let reply: redis::streams::StreamPendingReply = ctx
        .conn()
        .xpending(&ctx.config.event_stream, GROUP)
        .await
        .expect("xpending");
    reply.count()
}

async fn event_count(db: &DatabaseConnection) -> u64 {
    session_events::Entity::find()
        .count(db)
        .await
        .expect("count session_events")
}

/// Appends events through the store until `stop`: new sessions, then
/// updates of them, paced so the worker has something to do at every moment.
/// Counts every event whose write returned Ok.
fn spawn_writer(
    store: SessionStore,
    stop: CancellationToken,
    written: Arc<AtomicU64>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ids: Vec<SessionId> = Vec::new();
        let mut n: u64 = 0;
        while !stop.is_cancelled() {
            if ids.len() < 20 && n.is_multiple_of(5) {
                let c = store
                    .create(NewSession::for_user((n % 3) as i64, format!("w{n}")))
                    .await
                    .expect("create");
                ids.push(c.session_id);
            } else {
                let id = &ids[(n as usize) % ids.len()];
                store
                    .update(
                        id,
                        Changes::new().with_set(format!("k{}", n % 7), json!({"n": n})),
                    )
                    .await
                    .expect("update");
            }
            written.fetch_add(1, Ordering::SeqCst);
            n += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

/// Writes `sessions` × `per_session` events (a create, then updates) with a
/// few concurrent writers.
async fn write_events(store: &SessionStore, sessions: usize, per_session: usize) {
    let mut tasks = Vec::new();
    for s in 0..sessions {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let c = store
                .create(NewSession::for_user(s as i64, format!("u{s}")))
                .await
                .expect("create");
            for m in 1..per_session {
                store
                    .update(&c.session_id, Changes::new().with_set("m", m))
                    .await
                    .expect("update");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
}

/// The stream and the database agree: every stream entry is one row (same
/// event ids, as many rows as `expected`), `seq` is contiguous 1..n per
/// session, every live session's snapshot is byte-identical to its Redis
/// JSON, nothing went to dead letters and nothing is pending.
async fn assert_audited_exactly_once(ctx: &TestContext, db: &DatabaseConnection, expected: u64) {
    let stream = ctx.stream().await;
    assert_eq!(stream.len() as u64, expected, "events in the stream");
    let stream_ids: HashSet<String> = stream.iter().map(|e| e["event_id"].clone()).collect();
    assert_eq!(stream_ids.len(), stream.len(), "event ids are unique");
    let rows: Vec<(uuid::Uuid, String, i64)> = session_events::Entity::find()
        .select_only()
        .column(session_events::Column::EventId)
        .column(session_events::Column::SessionId)
        .column(session_events::Column::Seq)
        .into_tuple()
        .all(db)
        .await
        .expect("read session_events");
    assert_eq!(rows.len() as u64, expected, "rows in session_events");
    let row_ids: HashSet<String> = rows.iter().map(|r| r.0.to_string()).collect();
    assert_eq!(
        row_ids, stream_ids,
        "the same events in Redis and the database"
    );
    let mut seqs: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (_, session, seq) in rows {
        seqs.entry(session).or_default().push(seq);
    }
    for (session, mut s) in seqs {
        s.sort_unstable();
        let n = s.len() as i64;
        assert_eq!(
            s,
            (1..=n).collect::<Vec<_>>(),
            "seq contiguous for {session}"
        );
        let snap = session_snapshots::Entity::find_by_id(session.clone())
            .one(db)
            .await
            .expect("read snapshot")
            .unwrap_or_else(|| panic!("no snapshot for {session}"));
        assert_eq!(snap.seq, n, "snapshot seq of {session}");
        let raw: Option<String> = ctx
            .conn()
            .get(format!("{}{session}", ctx.config.session_prefix))
            .await
            .expect("get session");
        let raw = raw.unwrap_or_else(|| panic!("session {session} is gone from Redis"));
        assert_eq!(snap.state, raw, "snapshot equals Redis for {session}");
        assert_eq!(snap.status, session_snapshots::SnapshotStatus::Live);
    }
    let dead = dead_letters::Entity::find()
        .all(db)
        .await
        .expect("read dead_letters");
    assert!(dead.is_empty(), "dead letters: {dead:?}");
    assert_eq!(pending_count(ctx).await, 0, "nothing pending in the group");
}

/// Waits (bounded) until the database holds `total` events and nothing is
/// pending; fails at once on more rows than events or on a dead letter.
async fn wait_all_audited(
    ctx: &TestContext,
    db: &DatabaseConnection,
    total: u64,
    what: &'static str,
) {
    let d = Deadline::new(what, Duration::from_secs(20));
    loop {
        let rows = event_count(db).await;
        assert!(rows <= total, "{rows} rows for {total} events");
        let dead = dead_letters::Entity::find()
            .all(db)
            .await
            .expect("read dead_letters");
        assert!(dead.is_empty(), "dead letters: {dead:?}");
        let pending = pending_count(ctx).await;
        if rows == total && pending == 0 {
            return;
        }
        d.tick_saying(Duration::from_millis(10), || {
            format!("({rows} of {total} rows, {pending} pending)")
        })
        .await;
    }
}

async fn sigkill_mid_run_then_restart_audits_every_event_once(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let stop = CancellationToken::new();
    let written = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(ctx.store.clone(), stop.clone(), written.clone());
    // Kill workers in the middle of a batch, at least twice, and until one
    // has died holding entries it had not acknowledged (almost always the
    // first): each new worker starts with the dead ones' entries pending.
    let mut dead_consumers = Vec::new();
    let mut held_at_death = 0;
    while dead_consumers.len() < 2 || held_at_death == 0 {
        assert!(
            dead_consumers.len() < 6,
            "no killed worker held unacknowledged entries"
        );
        let mut w = Worker::start(&ctx, &db.url, &[("AUDIT_BATCH_SIZE", "50")]);
        let name = w.wait_until_consuming(&ctx).await;
        let before = event_count(&db.db).await;
        let d = Deadline::new(
            "the worker to audit events and hold a batch",
            Duration::from_secs(10),
        );
        loop {
            if event_count(&db.db).await > before && pending_of(&ctx, &name).await > 0 {
                break;
            }
            d.tick_every(Duration::from_millis(2)).await;
        }
        w.signal("KILL");
        let status = w.exit(Duration::from_secs(5)).await;
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
        held_at_death += pending_of(&ctx, &name).await;
        dead_consumers.push(name);
    }
    // Started again while the writer goes on: it takes over what the dead
    // consumer held (XAUTOCLAIM) and keeps up with new events.
    let mut w = Worker::start(&ctx, &db.url, &[("AUDIT_BATCH_SIZE", "50")]);
    w.wait_until_consuming(&ctx).await;
    let resumed_at = event_count(&db.db).await;
    let d = Deadline::new(
        "the restarted worker to make progress",
        Duration::from_secs(10),
    );
    while event_count(&db.db).await < resumed_at + 100 {
        d.tick().await;
    }
    stop.cancel();
    writer.await.expect("writer");
    let total = written.load(Ordering::SeqCst);
    wait_all_audited(&ctx, &db.db, total, "every event audited and acknowledged").await;
    for name in &dead_consumers {
        assert_eq!(
            pending_of(&ctx, name).await,
            0,
            "the dead consumer {name} still holds entries"
        );
    }
    assert_audited_exactly_once(&ctx, &db.db, total).await;
    assert!(w.running(), "the restarted worker is still running");
    w.signal("TERM");
    assert!(w.exit(Duration::from_secs(10)).await.success());
    eprintln!(
        "{total} events, {} kill(s), {held_at_death} entries held by the dead consumers",
        dead_consumers.len()
    );
}

/// Holds the write lock on `session_events` from another connection, so the
/// worker's next batch blocks inside its transaction. PostgreSQL: a table
/// lock that lets reads through; SQLite: a write transaction (the worker
/// waits for it within its 5 s busy timeout).
async fn hold_write_lock(url: &str, backend: Backend) -> sea_orm::DatabaseTransaction {
    let conn = sea_orm::Database::connect(url)
        .await
        .expect("connect to lock");
    let txn = conn.begin().await.expect("begin");
    let sql = match backend {
        Backend::Postgres => "LOCK TABLE session_events IN SHARE ROW EXCLUSIVE MODE",
        Backend::Sqlite => "DELETE FROM session_events WHERE 1 = 0",
    };
    txn.execute_unprepared(sql).await.expect("take the lock");
    txn
}

async fn sigterm_finishes_the_batch_in_hand_and_exits_0(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    // 300 events, all written before the signal; one batch holds them all.
    write_events(&ctx.store, 30, 10).await;
    let total = ctx.stream_len().await;
    let last_id: redis::streams::StreamRangeReply = ctx
        .conn()
        .xrevrange_count(&ctx.config.event_stream, "+", "-", 1)
        .await
        .expect("xrevrange");
    let last_id = last_id.ids[0].id.clone();
    let lock = hold_write_lock(&db.url, backend).await;
    // One budget for everything done while the lock is held, under SQLite's
    // 5 s busy timeout, so the worker's write waits instead of failing.
    let held = Deadline::new(
        "the worker to take the batch and acknowledge the signal",
        Duration::from_secs(4),
    );
    let mut w = Worker::start(&ctx, &db.url, &[("AUDIT_BATCH_SIZE", "500")]);
    // The worker has read everything and cannot commit yet: the batch is in
    // its hands when the signal arrives.
    loop {
        assert!(w.running(), "the worker exited:\n{}", w.log());
        if let Some(g) = group(&ctx).await
            && g.last_delivered_id == last_id
            && g.pending as u64 == total
        {
            break;
        }
        held.tick().await;
    }
    w.signal("TERM");
    while !w.log().contains("shutdown requested") {
        held.tick().await;
    }
    assert!(w.running(), "it waits for the batch in hand");
    assert_eq!(event_count(&db.db).await, 0, "nothing committed yet");
    assert_eq!(
        pending_count(&ctx).await as u64,
        total,
        "nothing acknowledged before its commit"
    );
    lock.commit().await.expect("release the lock");
    let status = w.exit(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status:?}\n{}", w.log());
    assert_eq!(pending_count(&ctx).await, 0, "nothing left pending");
    assert_audited_exactly_once(&ctx, &db.db, total).await;
}

/// Runs the worker to its end on a database whose schema is behind; returns
/// its stderr.
async fn refused(ctx: &TestContext, url: &str) -> String {
    let mut w = Worker::start(ctx, url, &[]);
    let status = w.exit(Duration::from_secs(15)).await;
    let log = w.log();
    assert!(
        !status.success(),
        "the worker started on an old schema:\n{log}"
    );
    assert!(status.code().is_some(), "it exited, not killed: {status:?}");
    assert!(
        log.contains("vedfolnir-sessions migrate"),
        "stderr says what to run:\n{log}"
    );
    log
}

async fn refuses_a_schema_that_is_behind(backend: Backend) {
    let ctx = TestContext::new().await;
    // Never migrated.
    let blank = TestDb::blank(backend).await;
    let log = refused(&ctx, &blank.url).await;
    assert!(
        log.contains("behind") || log.contains("cannot read"),
        "{log}"
    );
    let conn = vedfolnir_sessions::audit::db::connect(&blank.url)
        .await
        .expect("connect");
    let all = <migration::Migrator as migration::MigratorTrait>::migrations().len();
    assert_eq!(
        migration::pending_count(&conn).await.expect("pending"),
        all,
        "the worker did not migrate by itself"
    );
    // One migration behind.
    let db = TestDb::new(backend).await;
    <migration::Migrator as migration::MigratorTrait>::down(&db.db, Some(1))
        .await
        .expect("roll back one migration");
    let log = refused(&ctx, &db.url).await;
    assert!(log.contains("1 migration(s) behind"), "{log}");
    // It stopped before joining the stream.
    assert!(group(&ctx).await.is_none(), "no consumer group was created");
    let exists: bool = ctx
        .conn()
        .exists(&ctx.config.event_stream)
        .await
        .expect("exists");
    assert!(!exists, "no stream was created");
}

/// A TCP proxy in front of PostgreSQL that can be cut: a cut closes every
/// proxied connection and refuses new ones (accepted and closed at once)
/// until it is restored.
struct Proxy {
    port: u16,
    state: Arc<ProxyState>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    /// Whether it is cut, and the token that closes the connections of the
    /// current generation; one lock so no connection slips through a cut.
    gate: Mutex<(bool, CancellationToken)>,
    accepted: AtomicUsize,
    refused: AtomicUsize,
    live: AtomicUsize,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let state = Arc::new(ProxyState::default());
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let token = {
                    let gate = s.gate.lock().expect("gate");
                    if gate.0 {
                        s.refused.fetch_add(1, Ordering::SeqCst);
                        drop(inbound);
                        continue;
                    }
                    gate.1.clone()
                };
                s.accepted.fetch_add(1, Ordering::SeqCst);
                let upstream = upstream.clone();
                let s = s.clone();
                tokio::spawn(async move {
                    s.live.fetch_add(1, Ordering::SeqCst);
                    if let Ok(mut outbound) = TcpStream::connect(&upstream).await {
                        tokio::select! {
                            _ = token.cancelled() => {}
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        }
                    }
                    s.live.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Proxy { port, state, task }
    }

    /// Cuts: returns how many proxied connections it closed.
    fn cut(&self) -> usize {
        let mut gate = self.state.gate.lock().expect("gate");
        gate.0 = true;
        let live = self.state.live.load(Ordering::SeqCst);
        std::mem::take(&mut gate.1).cancel();
        live
    }

    fn restore(&self) {
        self.state.gate.lock().expect("gate").0 = false;
    }

    fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.state.gate.lock().expect("gate").1.cancel();
    }
}

/// Stream entries after `after` (exclusive): (stream id, event id).
async fn entries_after(ctx: &TestContext, after: &str) -> Vec<(String, String)> {
    let reply: redis::streams::StreamRangeReply = ctx
        .conn()
        .xrange(&ctx.config.event_stream, format!("({after}"), "+")
        .await
        .expect("xrange");
    reply
        .ids
        .into_iter()
        .map(|e| {
            let id: String = e.get("event_id").expect("event_id");
            (e.id, id)
        })
        .collect()
}

async fn last_stream_id(ctx: &TestContext) -> String {
    let reply: redis::streams::StreamRangeReply = ctx
        .conn()
        .xrevrange_count(&ctx.config.event_stream, "+", "-", 1)
        .await
        .expect("xrevrange");
    reply
        .ids
        .first()
        .map(|e| e.id.clone())
        .unwrap_or_else(|| "0-0".to_owned())
}

/// Fails unless every entry of `entries` is still unacknowledged: pending
/// in the group, or not yet delivered. Returns the group's state.
async fn assert_none_acked(ctx: &TestContext, entries: &[(String, String)]) -> StreamInfoGroup {
    let g = group(ctx).await.expect("group");
    let pending = pending_ids(ctx).await;
    for (stream_id, _) in entries {
        assert!(
            pending.contains(stream_id) || id_after(stream_id, &g.last_delivered_id),
            "{stream_id} was acknowledged while the database was unreachable"
        );
    }
    g
}

fn id_after(a: &str, b: &str) -> bool {
    let parse = |id: &str| {
        let (ms, seq) = id.split_once('-').expect("stream id");
        (
            ms.parse::<u64>().expect("ms"),
            seq.parse::<u64>().expect("seq"),
        )
    };
    parse(a) > parse(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cut_off_mid_run_acks_nothing_then_lands_everything_once() {
    let ctx = TestContext::new().await;
    let db = TestDb::new(Backend::Postgres).await;
    let authority = {
        let base = pg_base_url();
        let rest = base.split_once("://").expect("scheme").1.to_owned();
        let auth = rest.split('/').next().unwrap_or_default().to_owned();
        auth.rsplit_once('@')
            .map(|(_, h)| h.to_owned())
            .unwrap_or(auth)
    };
    let proxy = Proxy::start(authority.clone()).await;
    let via_proxy = db
        .url
        .replacen(&authority, &format!("127.0.0.1:{}", proxy.port), 1);
    assert_ne!(via_proxy, db.url);
    // A low delivery limit: an outage, however long, must not turn events
    // into dead letters.
    let mut w = Worker::start(
        &ctx,
        &via_proxy,
        &[("AUDIT_BATCH_SIZE", "50"), ("AUDIT_MAX_DELIVERIES", "2")],
    );
    w.wait_until_consuming(&ctx).await;

    // Up: 100 events land through the proxy.
    write_events(&ctx.store, 10, 10).await;
    let d = Deadline::new("the first events to land", Duration::from_secs(10));
    while event_count(&db.db).await < 100 {
        d.tick().await;
    }
    assert!(proxy.accepted() >= 1, "the worker talks through the proxy");

    // Cut: 100 more events are written while the database is unreachable.
    let before_cut = last_stream_id(&ctx).await;
    let closed = proxy.cut();
    assert!(closed >= 1, "the cut closed the worker's connections");
    let refused_at_cut = proxy.refused();
    write_events(&ctx.store, 10, 10).await;
    let cut_entries = entries_after(&ctx, &before_cut).await;
    assert_eq!(cut_entries.len(), 100);
    // Observable: the worker took a batch of them and kept trying to reach
    // the database; meanwhile none of them is ever acknowledged.
    let d = Deadline::new(
        "the worker to hold a batch and retry the database",
        Duration::from_secs(15),
    );
    loop {
        let g = assert_none_acked(&ctx, &cut_entries).await;
        if g.pending > 0 && proxy.refused() >= refused_at_cut + 5 {
            if let Some(lag) = g.lag {
                assert_eq!(g.pending + lag, cut_entries.len(), "pending + lag: {g:?}");
            }
            break;
        }
        d.tick().await;
    }
    // And the database (read directly, not through the proxy) has none of them.
    assert_eq!(event_count(&db.db).await, 100);
    let cut_event_ids: Vec<uuid::Uuid> = cut_entries
        .iter()
        .map(|(_, e)| e.parse().expect("uuid"))
        .collect();
    let landed = session_events::Entity::find()
        .filter(session_events::Column::EventId.is_in(cut_event_ids))
        .count(&db.db)
        .await
        .expect("count");
    assert_eq!(landed, 0, "nothing of the cut reached the database");
    assert!(w.running(), "the worker survives the outage");

    // Restored: everything lands, once.
    proxy.restore();
    write_events(&ctx.store, 5, 10).await;
    let total = ctx.stream_len().await;
    assert_eq!(total, 250);
    wait_all_audited(
        &ctx,
        &db.db,
        total,
        "everything to land after the database returns",
    )
    .await;
    assert_audited_exactly_once(&ctx, &db.db, total).await;
    w.signal("TERM");
    assert!(w.exit(Duration::from_secs(10)).await.success());
}

vedfolnir_tests::on_both_backends!(
    sigkill_mid_run_then_restart_audits_every_event_once,
    sigterm_finishes_the_batch_in_hand_and_exits_0,
    refuses_a_schema_that_is_behind,
    split_roles_cover_every_partition,
    a_worker_paused_past_its_lease_cannot_commit,
);

/// `vedfolnir-worker --only audit` and `--only reaper` in two processes over
/// four partitions, as `docs/audit.md` offers: every partition is audited
/// and every partition is reaped (each role has leases of its own).
async fn split_roles_cover_every_partition(backend: Backend) {
    let ctx = TestContext::with(|c| {
        c.with_partitions(4)
            .with_session_timeout(Duration::from_secs(1))
    })
    .await;
    let db = TestDb::new(backend).await;
    let keys = ctx.store.keys().clone();
    let mut ids = Vec::new();
    let mut per_partition = [0u32; 4];
    while per_partition.iter().any(|n| *n < 2) {
        assert!(ids.len() < 500, "sessions never spread: {per_partition:?}");
        let c = ctx
            .store
            .create(NewSession::for_user(1, "u"))
            .await
            .expect("create");
        per_partition[keys.partition_of(&c.session_id) as usize] += 1;
        ids.push(c.session_id);
    }
    let env = [("REDIS_PARTITIONS", "4")];
    let mut audit = Worker::start_with(&ctx, &db.url, &env, &["--only", "audit"]);
    let mut reaper = Worker::start_with(&ctx, &db.url, &env, &["--only", "reaper"]);
    let d = Deadline::new(
        "every partition audited and reaped",
        Duration::from_secs(30),
    );
    loop {
        assert!(audit.running(), "the audit worker exited:\n{}", audit.log());
        assert!(reaper.running(), "the reaper exited:\n{}", reaper.log());
        let stream = ctx.stream().await;
        let expired: HashSet<String> = stream
            .iter()
            .filter(|e| e["type"] == "expired")
            .map(|e| e["session_id"].clone())
            .collect();
        let reaped = ids
            .iter()
            .filter(|id| expired.contains(id.as_str()))
            .count();
        let rows = event_count(&db.db).await;
        if reaped == ids.len() && rows == stream.len() as u64 {
            break;
        }
        d.tick_saying(Duration::from_millis(50), || {
            format!(
                "({reaped} of {} sessions expired, {rows} of {} events audited)",
                ids.len(),
                stream.len()
            )
        })
        .await;
    }
    for id in &ids {
        let snap = session_snapshots::Entity::find_by_id(id.as_str().to_owned())
            .one(&db.db)
            .await
            .expect("snapshot")
            .expect("a snapshot");
        assert_eq!(snap.status, session_snapshots::SnapshotStatus::Expired);
    }
    audit.signal("TERM");
    reaper.signal("TERM");
    assert!(audit.exit(Duration::from_secs(10)).await.success());
    assert!(reaper.exit(Duration::from_secs(10)).await.success());
}

/// True when a session of the test's PostgreSQL database waits for a lock.
async fn someone_waits_for_a_lock(db: &DatabaseConnection) -> bool {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        ))
        .await
        .expect("pg_stat_activity")
        .expect("a row");
    row.try_get::<i64>("", "n").expect("n") > 0
}

/// The session folded from the events the table holds, in `seq` order.
async fn fold_of_table(db: &DatabaseConnection, id: &SessionId) -> (Record, usize) {
    let rows = session_events::Entity::find()
        .filter(session_events::Column::SessionId.eq(id.as_str()))
        .order_by_asc(session_events::Column::Seq)
        .all(db)
        .await
        .expect("events");
    let n = rows.len();
    let mut s = Record::default();
    for r in rows {
        let i = vedfolnir_sessions::audit::sink::incoming_from_row(&r).expect("row");
        if i.event.seq != s.version() + 1 {
            break;
        }
        s = s.apply(&i.event);
    }
    (s, n)
}

/// Whether the snapshot of `id` is the fold of its `events` events.
async fn snapshot_is_the_fold(db: &DatabaseConnection, id: &SessionId, events: usize) -> bool {
    let (fold, n) = fold_of_table(db, id).await;
    let Some(snap) = session_snapshots::Entity::find_by_id(id.as_str().to_owned())
        .one(db)
        .await
        .expect("snapshot")
    else {
        return false;
    };
    n == events
        && snap.seq == fold.version() as i64
        && snap.state == fold.to_json()
        && vedfolnir_sessions::audit::sink::status_of(snap.status) == fold.status()
}

/// Worker A is committing seq 3 when it is stopped (SIGSTOP) past its
/// lease; worker B takes the partition over and commits seq 4, a logout;
/// A resumes. A must not commit anything (its fencing token is stale), the
/// snapshot is the fold of all four events (destroyed), and after Redis
/// loses the namespace the healer does not bring the session back.
///
/// On SQLite the single writer lock already orders A's commit after B's,
/// so this guards the behaviour rather than reproducing the finding.
async fn a_worker_paused_past_its_lease_cannot_commit(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    // A long claim idle time: B takes over A's entries only because it
    // took A's lease, never because they sat idle.
    let env = [("AUDIT_CLAIM_IDLE_MS", "60000"), ("HEAL_CHECK_MS", "100")];
    let mut a = Worker::start_with(&ctx, &db.url, &env, &["--only", "audit"]);
    let a_name = a.wait_until_consuming(&ctx).await;
    let s = ctx
        .store
        .create(NewSession::for_user(1, "u"))
        .await
        .expect("create");
    ctx.store
        .update(&s.session_id, Changes::new().with_set("k", 1))
        .await
        .expect("update");
    let d = Deadline::new("the first two events", Duration::from_secs(10));
    while !snapshot_is_the_fold(&db.db, &s.session_id, 2).await {
        d.tick().await;
    }
    // A reads seq 3 and blocks inside its transaction on our lock.
    let lock = hold_write_lock(&db.url, backend).await;
    ctx.store
        .update(&s.session_id, Changes::new().with_set("k", 3))
        .await
        .expect("update");
    // On SQLite, A may first wait out its busy timeout (5 s) on our lock
    // while it records its progress (`partition_state`), before it reads.
    let limit = match backend {
        Backend::Postgres => Duration::from_secs(4),
        Backend::Sqlite => Duration::from_secs(15),
    };
    let d = Deadline::new("A to be committing seq 3", limit);
    loop {
        assert!(a.running(), "A exited:\n{}", a.log());
        if pending_of(&ctx, &a_name).await == 1
            && (backend == Backend::Sqlite || someone_waits_for_a_lock(&db.db).await)
        {
            break;
        }
        d.tick().await;
    }
    if backend == Backend::Sqlite {
        // No view of SQLite's lock waits: give A time to reach its write.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    a.signal("STOP");
    lock.commit().await.expect("release the lock");
    let mut b = Worker::start_with(&ctx, &db.url, &env, &["--only", "audit"]);
    ctx.store
        .destroy(&s.session_id, vedfolnir_sessions::DestroyReason::Logout)
        .await
        .expect("destroy");
    let d = Deadline::new("B to commit seq 4", Duration::from_secs(20));
    loop {
        assert!(b.running(), "B exited:\n{}", b.log());
        let rows = session_events::Entity::find()
            .filter(session_events::Column::SessionId.eq(s.session_id.as_str()))
            .filter(session_events::Column::Seq.eq(4))
            .count(&db.db)
            .await
            .expect("count");
        if rows == 1 {
            break;
        }
        d.tick_every(Duration::from_millis(20)).await;
    }
    a.signal("CONT");
    let d = Deadline::new(
        "the snapshot to be the fold of the four events",
        Duration::from_secs(20),
    );
    loop {
        if pending_count(&ctx).await == 0 && snapshot_is_the_fold(&db.db, &s.session_id, 4).await {
            break;
        }
        d.tick_saying(Duration::from_millis(50), || {
            format!("(A's log:\n{}\nB's log:\n{})", a.log(), b.log())
        })
        .await;
    }
    // A has resumed for a while (several of its retries): still the fold.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(snapshot_is_the_fold(&db.db, &s.session_id, 4).await);
    let snap = session_snapshots::Entity::find_by_id(s.session_id.as_str().to_owned())
        .one(&db.db)
        .await
        .expect("snapshot")
        .expect("a snapshot");
    assert_eq!(snap.status, session_snapshots::SnapshotStatus::Destroyed);
    // Redis loses the namespace: the healer replays, the logout stays.
    vedfolnir_tests::delete_namespace(&ctx.namespace);
    let part = ctx.store.keys().part(0).clone();
    let d = Deadline::new("the healer to replay", Duration::from_secs(20));
    loop {
        let epoch: Option<String> = ctx.conn().get(&part.epoch).await.expect("get");
        let known = vedfolnir_sessions::audit::partition::load(&db.db, &part.stream)
            .await
            .expect("partition state")
            .and_then(|r| r.redis_epoch);
        if epoch.is_some() && epoch == known {
            break;
        }
        d.tick_every(Duration::from_millis(20)).await;
    }
    let key = ctx.session_key(&s.session_id);
    assert!(
        !ctx.conn().exists::<_, bool>(&key).await.expect("exists"),
        "the logged-out session came back"
    );
    a.signal("KILL");
    b.signal("TERM");
    assert!(
        b.exit(Duration::from_secs(10)).await.success(),
        "{}",
        b.log()
    );
}

/// Reads a process's peak resident set (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("a number");
    kb * 1024
}

/// Entries of about 1 MB each: a batch is bounded by `AUDIT_BATCH_BYTES`
/// (read-ahead included), not only by `AUDIT_BATCH_SIZE`, so the worker's
/// memory stays near the byte bound instead of growing with the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batches_stay_within_audit_batch_bytes() {
    use vedfolnir_sessions::event::SCHEMA_VERSION;
    use vedfolnir_sessions::{Event, EventKind};
    let ctx = TestContext::new().await;
    let db = TestDb::new(Backend::Postgres).await;
    let sid: SessionId = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
    .parse()
    .expect("id");
    const N: u64 = 80;
    for seq in 1..=N {
        let kind = if seq == 1 {
            let mut fields = serde_json::Map::new();
            fields.insert("user_id".to_owned(), json!(1));
            EventKind::Created {
                fields,
                imported: None,
                rotated_from: None,
            }
        } else {
            let mut set = serde_json::Map::new();
            set.insert(
                "blob".to_owned(),
                json!(format!("{seq}{}", "x".repeat(1 << 20))),
            );
            EventKind::Updated { set, unset: vec![] }
        };
        let e = Event {
            event_id: uuid::Uuid::now_v7(),
            session_id: sid.clone(),
            seq,
            occurred_at: vedfolnir_sessions::time::Timestamp::now(),
            user_id: Some("1".to_owned()),
            schema: SCHEMA_VERSION,
            kind,
            traceparent: None,
        };
        let fields: Vec<(&str, String)> = e.to_fields();
        let _: String = ctx
            .conn()
            .xadd(&ctx.config.event_stream, "*", &fields)
            .await
            .expect("xadd");
    }
    let mut w = Worker::start_with(
        &ctx,
        &db.url,
        &[("AUDIT_BATCH_BYTES", "4194304")],
        &["--only", "audit"],
    );
    let d = Deadline::new("every large event audited", Duration::from_secs(120));
    while event_count(&db.db).await < N {
        assert!(w.running(), "the worker exited:\n{}", w.log());
        d.tick_every(Duration::from_millis(50)).await;
    }
    let peak = peak_rss(w.pid());
    eprintln!("peak RSS {} MiB for {N} entries of 1 MiB", peak >> 20);
    assert!(
        peak < 160 << 20,
        "the worker peaked at {} MiB with AUDIT_BATCH_BYTES=4 MiB",
        peak >> 20
    );
    w.signal("TERM");
    assert!(w.exit(Duration::from_secs(20)).await.success());
}
