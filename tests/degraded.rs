//! The store in its degraded modes, against the real Redis and both real
//! databases: Redis lost its data (recovering), Redis unreachable (the
//! fallback), the audit database unreachable, a connection dropped under a
//! write. Each test is a finding of the trust review that failed before the
//! rules of `docs/design.md` were enforced:
//!
//! 1. ending is absorbing: no ended session is served again, in any mode;
//! 2. an acknowledged mutation is durable across the restart of the app
//!    server that made it during an outage;
//! 3. ending operations are complete while Redis recovers;
//! 4. the audit database failing never fails a Redis operation;
//! 5. a dropped connection is retried before the fallback;
//! 6. recovering is a fact: a fresh namespace is not a recovery, and a
//!    recovery ends without a worker;
//! 7. concurrent increments lose nothing, and a change computed from a stale
//!    read is refused.

use std::time::Duration;

use redis::AsyncCommands as _;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use vedfolnir_sessions::audit::entity::{dead_letters, session_events};
use vedfolnir_sessions::audit::{AuditConsumer, AuditSink, ConsumerConfig};
use vedfolnir_sessions::config::RedisTarget;
use vedfolnir_sessions::store::RecoveryState;
use vedfolnir_sessions::{
    Changes, Config, DestroyReason, Error, NewSession, SessionId, SessionStore, Status, Token,
};
use vedfolnir_tests::TestContext;
use vedfolnir_tests::db::{Backend, TestDb};

fn sink(config: &Config, db: &TestDb) -> AuditSink {
    AuditSink::new(
        db.db.clone(),
        config.session_timeout,
        config.event_stream.clone(),
    )
}

/// An app server's store: its own connection, the audit database attached.
async fn app(config: &Config, db: &TestDb) -> SessionStore {
    SessionStore::connect(config)
        .await
        .expect("store")
        .with_audit(sink(config, db))
}

fn consumer_config() -> ConsumerConfig {
    ConsumerConfig {
        block: Duration::from_millis(20),
        retention: Duration::from_secs(600),
        ..ConsumerConfig::default()
    }
}

/// An audit consumer that has read everything, to step on (with its token).
async fn drained_consumer(config: &Config, db: &TestDb) -> (AuditConsumer, CancellationToken) {
    let mut c = AuditConsumer::new(config, sink(config, db), consumer_config())
        .await
        .expect("consumer");
    c.ensure_group().await.expect("group");
    let token = CancellationToken::new();
    while c.step(&token).await.expect("step") > 0 {}
    (c, token)
}

/// Runs an audit consumer until it has read everything.
async fn drain(config: &Config, db: &TestDb) {
    drained_consumer(config, db).await;
}

/// Deletes every key of the test's namespace (the epoch included): what a
/// Redis restart without persistence does to it.
async fn lose_redis_data(ctx: &TestContext) {
    let keys = ctx.keys().await;
    if !keys.is_empty() {
        let _: () = ctx.conn().del(keys).await.expect("del");
    }
}

async fn events_of(db: &TestDb, id: &SessionId) -> Vec<session_events::Model> {
    use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _, QueryOrder as _};
    session_events::Entity::find()
        .filter(session_events::Column::SessionId.eq(id.as_str()))
        .order_by_asc(session_events::Column::Seq)
        .all(&db.db)
        .await
        .expect("events")
}

/// Waits (at most 10 s) until `server`'s event stream of `config` holds
/// `n` entries: a write the test cannot see answered reached Redis.
async fn until_the_stream_holds(
    server: &vedfolnir_tests::redis_server::RedisServer,
    config: &Config,
    n: u64,
) {
    let mut admin = server.connection().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while admin
        .xlen::<_, u64>(&config.event_stream)
        .await
        .expect("xlen")
        < n
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the write reaches Redis"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The `seq`s the audit table holds for `id`, in order.
async fn seqs_of(db: &TestDb, id: &SessionId) -> Vec<i64> {
    events_of(db, id).await.iter().map(|e| e.seq).collect()
}

/// A Redis server of the test's own behind a proxy the test can cut, a
/// fresh audit database, and a configuration in a namespace of its own that
/// reaches Redis through the proxy and gives up on it after `timeout`.
async fn behind_proxy(
    backend: Backend,
    timeout: Duration,
) -> (
    vedfolnir_tests::redis_server::RedisServer,
    vedfolnir_tests::proxy::Proxy,
    TestDb,
    Config,
) {
    let server = vedfolnir_tests::redis_server::RedisServer::start().await;
    let proxy = vedfolnir_tests::proxy::Proxy::in_front_of(&server.url()).await;
    let db = TestDb::new(backend).await;
    let namespace = format!("vdeg:{}:", uuid::Uuid::new_v4().simple());
    let mut config = Config::default()
        .with_redis(RedisTarget::parse("REDIS_URL", &proxy.url_for(&server.url())).expect("url"))
        .with_namespace(&namespace);
    config.redis_timeout = timeout;
    (server, proxy, db, config)
}

/// Like [`behind_proxy`], with two configurations of one namespace: one
/// that reaches Redis directly, and one through the proxy, which gives up on
/// Redis after 300 ms (the app server the test cuts off).
async fn one_app_server_cut_off(
    backend: Backend,
) -> (
    vedfolnir_tests::redis_server::RedisServer,
    vedfolnir_tests::proxy::Proxy,
    TestDb,
    Config,
    Config,
) {
    let (server, proxy, db, cut_off) = behind_proxy(backend, Duration::from_millis(300)).await;
    let direct = cut_off
        .clone()
        .with_redis(RedisTarget::parse("REDIS_URL", &server.url()).expect("url"));
    (server, proxy, db, direct, cut_off)
}

/// Waits (at most 10 s) until `store` reaches Redis again after a cut.
async fn until_redis_answers(store: &SessionStore) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !store.health().await.redis_reachable {
        assert!(tokio::time::Instant::now() < deadline, "redis is back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn dead_letter_count(db: &TestDb) -> u64 {
    use sea_orm::{EntityTrait as _, PaginatorTrait as _};
    dead_letters::Entity::find()
        .count(&db.db)
        .await
        .expect("count")
}

async fn normal(store: &SessionStore) -> bool {
    let mut all = true;
    for part in store.keys().all() {
        all &= matches!(
            store.recovery_state(part).await,
            Ok(RecoveryState::Normal { .. })
        );
    }
    all
}

// ---------------------------------------------------------------------------
// 1. Ending is absorbing

/// Every way a session ends, with the audit database attached and no
/// worker (the example app's default): the ended id loads as nothing, from
/// this app server and from a fresh one, and stays ended after a loss of
/// Redis data and its replay. Before, the store took every miss for a
/// recovery (no worker had set its marker) and served the ended snapshot.
async fn ended_sessions_are_never_served_again(backend: Backend) {
    let ctx = TestContext::with(|c| c.with_max_per_user(2)).await;
    let db = TestDb::new(backend).await;
    let store = app(&ctx.config, &db).await;
    let mut ended: Vec<(SessionId, &str)> = Vec::new();
    let logout = store
        .create(NewSession::for_user(1, "one"))
        .await
        .expect("create");
    assert!(
        store
            .destroy(&logout.session_id, DestroyReason::Logout)
            .await
            .expect("destroy")
    );
    ended.push((logout.session_id, "logout"));
    let rotated = store
        .create(NewSession::for_user(2, "two"))
        .await
        .expect("create");
    let successor = store
        .rotate(&rotated.session_id, Changes::new())
        .await
        .expect("rotate");
    ended.push((rotated.session_id, "rotated"));
    let everywhere = store
        .create(NewSession::for_user(3, "three"))
        .await
        .expect("create");
    store
        .destroy_all_for_user("3", DestroyReason::LogoutAll)
        .await
        .expect("logout everywhere");
    ended.push((everywhere.session_id, "logout_all"));
    let oldest = store
        .create(NewSession::for_user(4, "four"))
        .await
        .expect("create");
    for _ in 0..2 {
        store
            .create(NewSession::for_user(4, "four"))
            .await
            .expect("create");
    }
    ended.push((oldest.session_id, "evicted"));
    for reason in [DestroyReason::Fingerprint, DestroyReason::Admin] {
        let c = store
            .create(NewSession::for_user(5, "five"))
            .await
            .expect("create");
        assert!(store.destroy(&c.session_id, reason).await.expect("destroy"));
        ended.push((c.session_id, reason.as_str()));
    }
    let fresh = app(&ctx.config, &db).await;
    for (id, how) in &ended {
        assert_eq!(store.load(id).await.expect("load"), None, "{how}");
        assert_eq!(fresh.load(id).await.expect("load"), None, "{how}");
        let err = fresh
            .update(id, Changes::new().with_set("x", 1))
            .await
            .expect_err("no write revives it");
        assert!(matches!(err, Error::Ended { .. }), "{how}: {err}");
    }
    // Redis loses everything; the replay and reads while recovering bring
    // back what lives, and nothing that ended.
    lose_redis_data(&ctx).await;
    let after = app(&ctx.config, &db).await;
    for (id, how) in &ended {
        assert_eq!(after.get(id).await.expect("get"), None, "{how}");
    }
    assert!(
        after
            .get(&successor.session_id)
            .await
            .expect("get")
            .is_some(),
        "the live successor is back"
    );
    ctx.eventually(
        "the app server's own replay",
        Duration::from_secs(10),
        || normal(&after),
    )
    .await;
    for (id, how) in &ended {
        assert_eq!(after.get(id).await.expect("get"), None, "{how}");
        let key: bool = ctx
            .conn()
            .exists(ctx.session_key(id))
            .await
            .expect("exists");
        assert!(!key, "{how}: the replay brought the key back");
    }
}

/// The snapshot lags Redis (no synchronous audit, the consumer has not read
/// the logout): a read during a recovery must not serve the older snapshot
/// over the tombstone Redis still holds.
async fn recovery_never_serves_a_snapshot_older_than_a_tombstone(backend: Backend) {
    let ctx = TestContext::with(|mut c| {
        c.db_sync = false;
        c
    })
    .await;
    let db = TestDb::new(backend).await;
    let store = app(&ctx.config, &db).await;
    let c = store
        .create(NewSession::for_user(6, "six"))
        .await
        .expect("create");
    drain(&ctx.config, &db).await;
    assert!(
        store
            .destroy(&c.session_id, DestroyReason::Logout)
            .await
            .expect("destroy")
    );
    // Redis loses the recovery signal but keeps the tombstone (a partial
    // loss); the snapshot still says live.
    let epoch = &ctx.store.keys().part(0).epoch;
    let _: () = ctx.conn().del(epoch).await.expect("del");
    let fresh = app(&ctx.config, &db).await;
    assert_eq!(fresh.get(&c.session_id).await.expect("get"), None);
    assert_eq!(
        fresh.tombstone(&c.session_id).await.expect("tombstone"),
        Some(Status::Destroyed)
    );
}

/// A session past its deadline that the reaper has not expired yet is not
/// restored during a recovery.
async fn an_expired_session_is_not_restored(backend: Backend) {
    let ctx = TestContext::with(|c| {
        c.with_session_timeout(Duration::from_millis(1500))
            .with_touch_interval(Duration::from_millis(500))
    })
    .await;
    let db = TestDb::new(backend).await;
    let store = app(&ctx.config, &db).await;
    let c = store
        .create(NewSession::for_user(7, "seven"))
        .await
        .expect("create");
    let key = ctx.session_key(&c.session_id);
    ctx.eventually("the key to expire", Duration::from_secs(10), || async {
        !ctx.conn().exists::<_, bool>(&key).await.expect("exists")
    })
    .await;
    lose_redis_data(&ctx).await;
    let fresh = app(&ctx.config, &db).await;
    assert_eq!(fresh.load(&c.session_id).await.expect("load"), None);
    assert!(!ctx.conn().exists::<_, bool>(&key).await.expect("exists"));
}

// ---------------------------------------------------------------------------
// 6. Recovering is a fact

/// A fresh namespace with an audit database is not a recovery: its epoch is
/// recorded and a miss stays a miss. A real loss is one, and ends without a
/// worker: the app server that notices replays every live session itself.
async fn recovery_is_known_and_ends_without_a_worker(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let store = app(&ctx.config, &db).await;
    let part = store.keys().part(0).clone();
    assert!(matches!(
        store.recovery_state(&part).await.expect("state"),
        RecoveryState::Normal { .. }
    ));
    let random = vedfolnir_sessions::Token::generate().session_id();
    assert_eq!(store.get(&random).await.expect("miss"), None);
    let mut ids = Vec::new();
    for n in 0..5 {
        let c = store
            .create(NewSession::for_user(n, "u").with("n", n))
            .await
            .expect("create");
        ids.push((c.session_id, c.session.to_json()));
    }
    lose_redis_data(&ctx).await;
    let fresh = app(&ctx.config, &db).await;
    assert!(matches!(
        fresh.recovery_state(&part).await.expect("state"),
        RecoveryState::Recovering { .. }
    ));
    // One read notices; the app server replays the rest by itself.
    let (first, json) = &ids[0];
    let got = fresh.get(first).await.expect("get").expect("served");
    assert_eq!(&got.to_json(), json);
    ctx.eventually("the replay", Duration::from_secs(10), || normal(&fresh))
        .await;
    for (id, json) in &ids {
        let raw: Option<String> = ctx.conn().get(ctx.session_key(id)).await.expect("get");
        assert_eq!(raw.as_deref(), Some(json.as_str()), "{id} is back");
    }
}

/// A healer that dies mid-replay (SIGKILL: its healing lock is never
/// given back) holds the next healer up for seconds, not minutes: the lock
/// lasts 15 s unless its holder renews it. The healer is stopped while its
/// replay waits for a lock on the audit table, then dropped. Before, the
/// lock lasted five minutes, and so did the recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healer_that_dies_mid_replay_holds_recovery_up_briefly() {
    let ctx = TestContext::new().await;
    let db = TestDb::new(Backend::Postgres).await;
    let (first, c) = healer_stopped_mid_replay(&ctx, &db).await;
    drop(first);
    let next = app(&ctx.config, &db).await;
    assert!(
        next.heal().await.expect("heal").is_none(),
        "the dead healer's lock holds"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
    loop {
        if next.heal().await.expect("heal").is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dead healer's lock ran out"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(normal(&next).await);
    assert!(next.get(&c.session_id).await.expect("get").is_some());
}

/// A healing lock that a store's own attempt left behind (here a replay
/// stopped mid-way; in the fault suite, a `SET NX` applied by a Redis that
/// was just coming back, whose reply and release were both lost) holds up
/// the other stores, but not the store whose name it carries: its next
/// attempt takes it again at once instead of waiting out the lock's 15 s.
/// Before, each attempt named the lock anew, and the whole recovery waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healer_takes_back_at_once_the_lock_it_left_behind() {
    let ctx = TestContext::new().await;
    let db = TestDb::new(Backend::Postgres).await;
    let (first, c) = healer_stopped_mid_replay(&ctx, &db).await;
    let other = app(&ctx.config, &db).await;
    assert!(
        other.heal().await.expect("heal").is_none(),
        "another store waits for the lock"
    );
    let started = tokio::time::Instant::now();
    assert!(
        first.heal().await.expect("heal").is_some(),
        "the store whose name the lock carries replays under it"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "at once, not after the lock ran out: {:?}",
        started.elapsed()
    );
    assert!(normal(&first).await);
    assert!(other.get(&c.session_id).await.expect("get").is_some());
    // The lock is given back once the replay is done.
    let healing = first.keys().part(0).healing.clone();
    assert!(
        !ctx.conn()
            .exists::<_, bool>(&healing)
            .await
            .expect("exists")
    );
}

/// A store whose `heal` took the healing lock after Redis lost its data and
/// was then stopped mid-replay (while its replay waited for a lock on the
/// audit table), and the session created before the loss. The lock is left
/// in Redis, under the store's name.
async fn healer_stopped_mid_replay(
    ctx: &TestContext,
    db: &TestDb,
) -> (SessionStore, vedfolnir_sessions::Created) {
    use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
    let first = app(&ctx.config, db).await;
    let c = first
        .create(NewSession::for_user(22, "twenty-two"))
        .await
        .expect("create");
    lose_redis_data(ctx).await;
    let blocker = db.db.begin().await.expect("begin");
    blocker
        .execute_unprepared("LOCK TABLE session_events IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    let dying = tokio::spawn({
        let first = first.clone();
        async move { first.heal().await }
    });
    let healing = first.keys().part(0).healing.clone();
    ctx.eventually("the healing lock taken", Duration::from_secs(10), || {
        let mut conn = ctx.conn();
        let healing = healing.clone();
        async move { conn.exists::<_, bool>(&healing).await.expect("exists") }
    })
    .await;
    // Meanwhile another call of the same store leaves the work to the one
    // under way: it does not take the lock under its own name a second time
    // (it would replay beside it, and wait here for the table).
    let again = tokio::time::timeout(Duration::from_secs(5), first.heal()).await;
    assert!(
        matches!(again, Ok(Ok(None))),
        "one replay per store at a time"
    );
    dying.abort();
    assert!(
        dying.await.is_err_and(|e| e.is_cancelled()),
        "stopped mid-replay"
    );
    blocker.commit().await.expect("unlock");
    (first, c)
}

/// The first column of the first row `sql` answers on PostgreSQL.
async fn first<T: sea_orm::TryGetable>(db: &impl sea_orm::ConnectionTrait, sql: String) -> T {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            sql.clone(),
        ))
        .await
        .expect(&sql)
        .expect("a row");
    row.try_get_by_index::<T>(0).expect("a value")
}

/// A transaction whose `BEGIN` was dropped before its answer was read is
/// not left open on its pooled connection. sqlx 0.9.0 leaves one there (the
/// connection counts as inside a transaction only once the answer is read),
/// and a web request whose client went away, or the synchronous audit
/// write's timeout, drops such futures: the next borrowers' statements ran
/// inside it and held its locks (the twenty-ninth long fault run logged
/// "there is already a transaction in progress" at the end of a 21 s stall
/// after a Redis cut). The test polls a `begin` by hand until the server
/// shows its connection inside a transaction, then drops it: the window.
/// One pooled connection, so the statements after it run on that
/// connection; `SET LOCAL` lasts to the end of a transaction, and outside
/// one changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_begin_is_dropped_is_not_left_open() {
    use std::future::Future as _;
    use std::task::Poll;

    use sea_orm::{ConnectOptions, ConnectionTrait as _, Database};
    let db = TestDb::new(Backend::Postgres).await;
    let app = format!("vtest-begin-{}", uuid::Uuid::new_v4().simple());
    let mut opts = ConnectOptions::new(db.url.clone());
    let name = app.clone();
    opts.max_connections(1)
        .min_connections(1)
        .test_before_acquire(false)
        .sqlx_logging(false)
        .map_sqlx_postgres_opts(move |o| o.application_name(&name));
    let pool = Database::connect(opts).await.expect("connect");
    let show = || first::<String>(&pool, "SHOW statement_timeout".to_owned());
    let before = show().await;
    let in_transaction = || async {
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}' \
             AND state = 'idle in transaction'"
        );
        first::<i64>(&db.db, sql).await > 0
    };
    let mut dropped_in_the_window = false;
    'attempts: for _ in 0..20 {
        let mut begin = Box::pin(vedfolnir_sessions::audit::db::begin(&pool));
        for _ in 0..500 {
            let polled = std::future::poll_fn(|cx| Poll::Ready(begin.as_mut().poll(cx))).await;
            if let Poll::Ready(txn) = polled {
                // Begun and answered before the window was seen: give it
                // back (rolled back) and try again.
                drop(txn);
                continue 'attempts;
            }
            if in_transaction().await {
                drop(begin);
                dropped_in_the_window = true;
                break 'attempts;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert!(dropped_in_the_window, "no BEGIN was seen on the server");
    pool.execute_unprepared("SET LOCAL statement_timeout = '4321ms'")
        .await
        .expect("set local");
    assert_eq!(
        show().await,
        before,
        "a statement after the dropped BEGIN ran inside its transaction"
    );
}

/// A transaction left open on a pooled connection (its future dropped
/// where the driver cannot roll it back) holds its locks for at most the
/// pool's idle-in-transaction bound, not until the connection is next used:
/// the server ends it. Before, a leaked transaction held the locks that
/// every app server's staging and the replay wait for, and requests hung
/// for 20 s in a long fault run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_left_open_releases_its_locks() {
    use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
    let db = TestDb::new(Backend::Postgres).await;
    let leaked = db.db.begin().await.expect("begin");
    leaked
        .execute_unprepared("LOCK TABLE session_events IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    // Never committed, never rolled back, never returned to the pool.
    let _leaked = std::mem::ManuallyDrop::new(leaked);
    let started = tokio::time::Instant::now();
    let limit = vedfolnir_sessions::audit::db::IDLE_IN_TRANSACTION + Duration::from_secs(10);
    while let Err(e) = vedfolnir_sessions::audit::settle_writes(&db.db).await {
        assert!(
            started.elapsed() < limit,
            "the leaked lock is still held: {e}"
        );
    }
}

/// A write folded on a state read before Redis lost its data (a web
/// request's session) lands on the session restored from the database, not
/// on "not found": the user was not logged out.
async fn a_write_during_a_recovery_reaches_a_session_not_back_yet(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let store = app(&ctx.config, &db).await;
    let c = store
        .create(NewSession::for_user(19, "nineteen").with("visits", 1))
        .await
        .expect("create");
    lose_redis_data(&ctx).await;
    let s = store
        .update_from(
            &c.session_id,
            c.session.clone(),
            Changes::new().with_set("theme", "dark"),
        )
        .await
        .expect("the write lands on the restored session");
    assert_eq!(s.version(), 2);
    let s = store
        .modify_from(&c.session_id, c.session.clone(), "visits", |v| {
            Ok(Some(json!(
                v.and_then(serde_json::Value::as_i64).unwrap_or(0) + 1
            )))
        })
        .await
        .expect("modify");
    assert_eq!(s.get("visits"), Some(&json!(2)));
    assert_eq!(s.get("theme"), Some(&json!("dark")));
}

// ---------------------------------------------------------------------------
// 3. Ends are complete during a recovery

/// Logout everywhere and an operator's destroy while Redis recovers (before
/// any replay): every session the database knows ends, and none comes back
/// with the replay. Before, both looked at Redis only and ended nothing.
async fn ends_reach_sessions_that_are_not_back_yet(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let store = app(&ctx.config, &db).await;
    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(
            store
                .create(NewSession::for_user(9, "nine"))
                .await
                .expect("create")
                .session_id,
        );
    }
    let other = store
        .create(NewSession::for_user(10, "ten"))
        .await
        .expect("create")
        .session_id;
    lose_redis_data(&ctx).await;
    let fresh = app(&ctx.config, &db).await;
    let mut ended = fresh
        .destroy_all_for_user("9", DestroyReason::LogoutAll)
        .await
        .expect("logout everywhere");
    ended.sort();
    let mut expected = mine.clone();
    expected.sort();
    assert_eq!(ended, expected);
    assert!(
        fresh
            .destroy(&other, DestroyReason::Admin)
            .await
            .expect("destroy"),
        "an operator's destroy reaches a session Redis lost"
    );
    let healed = fresh.heal().await.expect("heal");
    ctx.eventually("the replay", Duration::from_secs(10), || normal(&fresh))
        .await;
    let _ = healed;
    for id in mine.iter().chain([&other]) {
        assert_eq!(fresh.get(id).await.expect("get"), None);
        assert_eq!(
            fresh.tombstone(id).await.expect("tombstone"),
            Some(Status::Destroyed)
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Durable across a restart, and the split-brain rule

/// A logout and an update made while Redis is unreachable (not wiped)
/// survive the restart of the app server that made them: another store sees
/// both once Redis answers. Before, they lived in the first store's memory.
async fn outage_writes_survive_a_restart_of_their_app_server(backend: Backend) {
    let (server, proxy, db, config) = behind_proxy(backend, Duration::from_millis(300)).await;
    let a = app(&config, &db).await;
    let gone = a
        .create(NewSession::for_user(11, "eleven"))
        .await
        .expect("create");
    let kept = a
        .create(NewSession::for_user(12, "twelve"))
        .await
        .expect("create");
    proxy.cut();
    assert!(
        a.destroy(&gone.session_id, DestroyReason::Logout)
            .await
            .expect("logout during the outage")
    );
    let s = a
        .update(&kept.session_id, Changes::new().with_set("cart", 3))
        .await
        .expect("update during the outage");
    assert_eq!(s.get("cart"), Some(&json!(3)));
    assert_eq!(a.load(&gone.session_id).await.expect("load"), None);
    drop(a);
    proxy.restore();
    let b = app(&config, &db).await;
    let mut admin = server.connection().await;
    until_redis_answers(&b).await;
    assert_eq!(b.load(&gone.session_id).await.expect("load"), None);
    let s = b.load(&kept.session_id).await.expect("load").expect("live");
    assert_eq!(s.get("cart"), Some(&json!(3)));
    let ledger: String = admin
        .get(b.keys().all()[0].ledger(&gone.session_id))
        .await
        .expect("ledger");
    assert!(ledger.contains("|destroyed|"), "{ledger}");
    assert_eq!(b.staged_count().await.expect("staged"), 0);
    drain(&config, &db).await;
    let kinds: Vec<String> = events_of(&db, &gone.session_id)
        .await
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(kinds, ["created", "destroyed"]);
    assert_eq!(dead_letter_count(&db).await, 0);
}

/// A projection that leaves a session's staged write waiting (here the
/// session's deadline passed during the outage, so it waits for the expiry
/// sweep) records the session in Redis (`<ns>staged`): when the database
/// then fails, that session answers unavailable instead of Redis's state
/// without its write, while every other session is served from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_staged_write_waits_is_not_served_without_the_database() {
    let (_server, proxy, db, mut config) =
        behind_proxy(Backend::Postgres, Duration::from_millis(300)).await;
    config.session_timeout = Duration::from_secs(2);
    config.touch_interval = Duration::from_millis(500);
    let a = app(&config, &db).await;
    let late = a
        .create(NewSession::for_user(17, "seventeen"))
        .await
        .expect("create");
    proxy.cut();
    a.update(&late.session_id, Changes::new().with_set("cart", 1))
        .await
        .expect("staged during the outage");
    // The session's deadline passes before Redis is back.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    proxy.restore();
    until_redis_answers(&a).await;
    let summary = a.project_staged().await.expect("projection");
    assert_eq!(summary.waiting, 1, "{summary:?}");
    let other = a
        .create(NewSession::for_user(18, "eighteen"))
        .await
        .expect("create");
    let outage = PgOutage::begin(&db).await;
    let b = app(&config, &db).await;
    let read = b.load(&late.session_id).await;
    assert!(
        matches!(&read, Err(e) if e.is_unavailable() || matches!(e, Error::Database(_))),
        "the session with a waiting write is not served from redis: {read:?}"
    );
    assert!(
        b.load(&other.session_id)
            .await
            .expect("served from redis")
            .is_some()
    );
    outage.end().await;
}

/// A write staged during an outage is durable until its event is in the
/// audit table, not only until it reached Redis: the projection records
/// the event before it deletes the staged row. Before, the row was deleted
/// once Redis held the event, and with no worker running (the example
/// app's default) a loss of Redis data right after lost the acknowledged
/// write (the third long fault run's missing `data put`).
async fn a_projected_write_survives_a_loss_of_redis_data(backend: Backend) {
    let (server, proxy, db, config) = behind_proxy(backend, Duration::from_millis(300)).await;
    let a = app(&config, &db).await;
    let c = a
        .create(NewSession::for_user(16, "sixteen"))
        .await
        .expect("create");
    proxy.cut();
    a.update(&c.session_id, Changes::new().with_set("cart", 3))
        .await
        .expect("staged during the outage");
    proxy.restore();
    until_redis_answers(&a).await;
    let summary = a.project_staged().await.expect("projection");
    assert_eq!(summary.projected, 1, "{summary:?}");
    let kinds: Vec<String> = events_of(&db, &c.session_id)
        .await
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(kinds, ["created", "updated"], "recorded by the projection");
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut server.connection().await)
        .await
        .expect("flushall");
    let b = app(&config, &db).await;
    let s = b
        .load(&c.session_id)
        .await
        .expect("load")
        .expect("restored from the audit database");
    assert_eq!(s.get("cart"), Some(&json!(3)));
    assert_eq!(dead_letter_count(&db).await, 0);
}

/// A write staged during an outage for a session that a process which
/// never lost Redis ended meanwhile is logged after the end, at
/// the end's seq + 1, in the stream and in the audit table alike, and the
/// session stays ended. Before, the projection recorded the event at the
/// seq of the state it folded on (1), which the audit table refused.
async fn a_staged_write_of_a_session_ended_meanwhile_is_logged_after_the_end(backend: Backend) {
    let (server, proxy, db, config) = behind_proxy(backend, Duration::from_millis(300)).await;
    let a = app(&config, &db).await;
    let direct = config
        .clone()
        .with_redis(RedisTarget::parse("REDIS_URL", &server.url()).expect("url"));
    // A process that ends sessions in Redis without looking at the
    // database (as the reaper does when it expires one): it does not take
    // Redis back from the database first, so it ends the session without
    // the staged write.
    let b = SessionStore::connect(&direct).await.expect("store");
    let s = a
        .create(NewSession::for_user(19, "nineteen"))
        .await
        .expect("create");
    proxy.cut();
    a.update(&s.session_id, Changes::new().with_set("cart", 1))
        .await
        .expect("staged during the outage");
    assert!(
        b.destroy(&s.session_id, DestroyReason::Admin)
            .await
            .expect("destroy")
    );
    proxy.restore();
    until_redis_answers(&a).await;
    let summary = a.project_staged().await.expect("projection");
    assert_eq!(summary.projected, 1, "{summary:?}");
    assert_eq!(a.load(&s.session_id).await.expect("load"), None);
    drain(&config, &db).await;
    let events: Vec<(i64, String)> = events_of(&db, &s.session_id)
        .await
        .into_iter()
        .map(|e| (e.seq, e.event_type))
        .collect();
    assert_eq!(
        events,
        [
            (1, "created".to_owned()),
            (2, "destroyed".to_owned()),
            (3, "updated".to_owned())
        ]
    );
    assert_eq!(dead_letter_count(&db).await, 0);
}

/// Split brain: the stream holds an event the audit database has not read
/// when Redis becomes unreachable, and an update is staged for the same
/// session in fallback mode. Both claim seq 2. The rule: the stream's event
/// keeps its seq; the staged event is applied after it when Redis answers.
/// Both are in the audit table, contiguous, and nothing is a dead letter.
async fn split_brain_keeps_both_writes_in_order(backend: Backend) {
    let (_server, proxy, db, mut config) = behind_proxy(backend, Duration::from_millis(300)).await;
    config.db_sync = false;
    let store = app(&config, &db).await;
    let c = store
        .create(NewSession::for_user(13, "thirteen"))
        .await
        .expect("create");
    // The consumer drains (and so vouches for the database) ...
    let (mut consumer, token) = drained_consumer(&config, &db).await;
    // ... then one more write reaches only Redis before it goes away, and
    // the consumer finds Redis unreachable (which opens the database for
    // writes: Redis is down for everyone).
    store
        .update(&c.session_id, Changes::new().with_set("a", 1))
        .await
        .expect("update");
    proxy.cut();
    assert!(consumer.step(&token).await.is_err());
    // The cut broke the connection under the first attempt: whether Redis
    // applied it is unknown, and the database's view (seq 1) is not the
    // state it was folded on (seq 2), so it is not staged; tried again, the
    // update is.
    let first = store
        .update(&c.session_id, Changes::new().with_set("b", 2))
        .await
        .expect_err("the first attempt's outcome is unknown");
    assert!(first.is_unavailable(), "{first}");
    let s = store
        .update(&c.session_id, Changes::new().with_set("b", 2))
        .await
        .expect("update staged during the outage");
    assert_eq!(s.version(), 2, "the database's view was at seq 1");
    proxy.restore();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(s)) = store.get(&c.session_id).await
            && s.version() == 3
        {
            assert_eq!(s.get("a"), Some(&json!(1)));
            assert_eq!(s.get("b"), Some(&json!(2)));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "projection");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The consumer cut off mid-read may hold the first update's entry
    // pending: one that claims idle entries at once records it.
    let mut last = AuditConsumer::new(
        &config,
        sink(&config, &db),
        ConsumerConfig {
            claim_idle: Duration::ZERO,
            ..consumer_config()
        },
    )
    .await
    .expect("consumer");
    last.ensure_group().await.expect("group");
    while last.step(&token).await.expect("step") > 0 {}
    let events = events_of(&db, &c.session_id).await;
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert!(events[1].payload.contains("\"a\""));
    assert!(events[2].payload.contains("\"b\""));
    assert_eq!(dead_letter_count(&db).await, 0);
}

/// A staged write that one projection applied, but whose row outlived it
/// (the database failed before the row was deleted), is not applied again
/// by the next projection while the consumer has not recorded it yet:
/// applying it twice would log it twice and set its keys back to what they
/// were when it was staged, over every write since.
async fn a_staged_write_already_projected_is_not_applied_again(backend: Backend) {
    use sea_orm::{ActiveModelTrait as _, ColumnTrait as _, EntityTrait as _, QueryFilter as _};
    use vedfolnir_sessions::audit::entity::fallback_events;
    let (server, proxy, db, mut config) = behind_proxy(backend, Duration::from_millis(300)).await;
    config.db_sync = false;
    let store = app(&config, &db).await;
    let c = store
        .create(NewSession::for_user(14, "fourteen"))
        .await
        .expect("create");
    let (mut consumer, token) = drained_consumer(&config, &db).await;
    proxy.cut();
    assert!(consumer.step(&token).await.is_err());
    store
        .update(&c.session_id, Changes::new().with_set("n", 1))
        .await
        .expect("update staged during the outage");
    let staged = fallback_events::Entity::find()
        .filter(fallback_events::Column::SessionId.eq(c.session_id.as_str()))
        .all(&db.db)
        .await
        .expect("staged rows");
    assert_eq!(staged.len(), 1);
    proxy.restore();
    // The first command on the connection the cut broke fails.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let summary = loop {
        match store.project_staged().await {
            Ok(s) => break s,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "projection: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(summary.projected, 1);
    // The session moves on. Then, as if the database had failed right after
    // the event reached Redis, neither its audit row nor the deletion of its
    // staged row happened; and Redis's marker of the applied event is gone
    // (it lasts SESSION_TOMBSTONE_TTL, and the consumer may lag longer).
    store
        .update(&c.session_id, Changes::new().with_set("n", 2))
        .await
        .expect("update");
    let marker = format!(
        "{}~{}",
        store.keys().all()[0].ledger_prefix,
        staged[0].event_id
    );
    let mut redis = redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let removed: i64 = redis.del(&marker).await.expect("del");
    assert_eq!(removed, 1, "the applied event's marker {marker}");
    session_events::Entity::delete_many()
        .filter(session_events::Column::EventId.eq(staged[0].event_id))
        .exec(&db.db)
        .await
        .expect("forget the audit row");
    // A row staged after a refused connection (sure that Redis never had
    // it): only the stream says it was projected since.
    let mut row: fallback_events::ActiveModel = staged[0].clone().into();
    row.unsure = sea_orm::Set(false);
    row.insert(&db.db).await.expect("the row again");
    // The next projection finds the event in the stream.
    let again = store.project_staged().await.expect("projection");
    assert_eq!(again.projected, 0);
    let left = fallback_events::Entity::find()
        .filter(fallback_events::Column::SessionId.eq(c.session_id.as_str()))
        .all(&db.db)
        .await
        .expect("staged rows");
    assert!(left.is_empty(), "the row is gone: {left:?}");
    let s = store.get(&c.session_id).await.expect("get").expect("live");
    assert_eq!((s.version(), s.get("n")), (3, Some(&json!(2))));
    // (The first command on the consumer's connection the cut broke fails.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match consumer.step(&token).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "step: {e}"),
        }
    }
    let seqs = seqs_of(&db, &c.session_id).await;
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(dead_letter_count(&db).await, 0);
}

/// An audit consumer whose read Redis applied but whose reply it lost (the
/// connection broke after the read went out: a cut, a worker stopped and
/// resumed) does not know the entries that read delivered, pending under
/// its own name. Its next step audits them. Before, they waited for its
/// claim pass, `AUDIT_CLAIM_IDLE_MS` (30 s) later, and the group was not
/// drained meanwhile (the thirty-fourth long fault run: a worker stopped
/// past its lease did not settle within 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_a_lost_read_delivered_are_audited_at_the_next_step() {
    let (server, proxy, db, config) =
        behind_proxy(Backend::Postgres, Duration::from_millis(2000)).await;
    // The app server writes on a connection of its own; only the
    // consumer's goes through the proxy.
    let direct = config
        .clone()
        .with_redis(RedisTarget::parse("REDIS_URL", &server.url()).expect("url"));
    let store = app(&direct, &db).await;
    let c = store
        .create(NewSession::for_user(41, "forty-one"))
        .await
        .expect("create");
    let (consumer, token) = drained_consumer(&config, &db).await;
    assert_eq!(seqs_of(&db, &c.session_id).await, [1]);
    store
        .update(&c.session_id, Changes::new().with_set("cart", 1))
        .await
        .expect("update");
    proxy.drop_replies(true);
    let reading = tokio::spawn(async move {
        let mut consumer = consumer;
        let r = consumer.step(&token).await;
        (consumer, token, r)
    });
    // Redis delivers the entry to the consumer, the reply goes nowhere,
    // then the connection breaks.
    let admin = server.connection().await;
    let pending = |mut admin: redis::aio::MultiplexedConnection| {
        let stream = config.event_stream.clone();
        async move {
            let reply: redis::streams::StreamPendingReply =
                admin.xpending(&stream, "audit").await.expect("xpending");
            reply.count()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pending(admin.clone()).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the read delivered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.cut();
    let (mut consumer, token, read) = reading.await.expect("task");
    assert!(read.is_err(), "the consumer never heard of it: {read:?}");
    proxy.drop_replies(false);
    proxy.restore();
    // The app server's synchronous write recorded the event already: what
    // the consumer owes is its acknowledgement, after its own commit.
    assert_eq!(seqs_of(&db, &c.session_id).await, [1, 2]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pending(admin.clone()).await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "acknowledged at the next steps, not at the claim pass 30 s later"
        );
        let _ = consumer.step(&token).await;
    }
    assert_eq!(seqs_of(&db, &c.session_id).await, [1, 2]);
}

/// A write that Redis applied but whose reply was lost (the connection
/// broke after the command went out) goes to the fallback, unsure; when
/// Redis answers again the projection finds the event in the stream and does
/// not apply it twice: one event, once.
async fn a_write_applied_before_its_reply_was_lost_is_not_applied_twice(backend: Backend) {
    let (server, proxy, db, config) = behind_proxy(backend, Duration::from_millis(2000)).await;
    let store = app(&config, &db).await;
    let c = store
        .create(NewSession::for_user(18, "eighteen"))
        .await
        .expect("create");
    let mut admin = server.connection().await;
    let stream_len = |mut admin: redis::aio::MultiplexedConnection| {
        let stream = config.event_stream.clone();
        async move { admin.xlen::<_, u64>(&stream).await.expect("xlen") }
    };
    proxy.drop_replies(true);
    let write = {
        let store = store.clone();
        let (id, base) = (c.session_id.clone(), c.session.clone());
        tokio::spawn(async move {
            store
                .update_from(&id, base, Changes::new().with_set("cart", 1))
                .await
        })
    };
    // Redis applies the write; its reply goes nowhere; then the connection
    // breaks.
    until_the_stream_holds(&server, &config, 2).await;
    proxy.cut();
    let s = write
        .await
        .expect("task")
        .expect("staged after the connection broke");
    assert_eq!(s.get("cart"), Some(&json!(1)));
    assert_eq!(store.fallback_writes(), 1);
    proxy.drop_replies(false);
    proxy.restore();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let _ = store.get(&c.session_id).await;
        if store.staged_count().await.expect("staged") == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "projection");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now = store.get(&c.session_id).await.expect("get").expect("live");
    assert_eq!(now.version(), 2, "applied once");
    assert_eq!(now.get("cart"), Some(&json!(1)));
    assert_eq!(stream_len(admin.clone()).await, 2);
    drain(&config, &db).await;
    let seqs = seqs_of(&db, &c.session_id).await;
    assert_eq!(seqs, [1, 2]);
    assert_eq!(dead_letter_count(&db).await, 0);
    let _: () = redis::cmd("PING")
        .query_async(&mut admin)
        .await
        .expect("ping");
}

/// An increment that Redis applied before its connection broke, which the
/// audit consumer recorded from the stream before Redis became unreachable
/// (the twenty-second long fault run). Staged on the database's view, it
/// finds the view moved on from the version it was folded on. Before, the
/// store folded the increment again on that view, which already held it,
/// under a new event id, and staged that: the counter went up twice for one
/// call (2, at version 3). Now the store finds its event in the audit table
/// and answers the write as applied, once; had the consumer not recorded it,
/// the call would fail as unavailable (`split_brain_keeps_both_writes_in_order`).
async fn an_increment_whose_outcome_is_unknown_is_not_folded_again(backend: Backend) {
    let (server, proxy, db, config) = behind_proxy(backend, Duration::from_millis(2000)).await;
    // The audit consumer reaches Redis through a proxy of its own, cut just
    // before the app server's: the database is current when Redis goes away
    // for everyone.
    let worker_proxy = vedfolnir_tests::proxy::Proxy::in_front_of(&server.url()).await;
    let worker_config = config.clone().with_redis(
        RedisTarget::parse("REDIS_URL", &worker_proxy.url_for(&server.url())).expect("url"),
    );
    let store = app(&config, &db).await;
    let c = store
        .create(NewSession::for_user(22, "twenty-two").with("n", 0))
        .await
        .expect("create");
    let (mut worker, token) = drained_consumer(&worker_config, &db).await;
    proxy.drop_replies(true);
    let write = {
        let store = store.clone();
        let (id, base) = (c.session_id.clone(), c.session.clone());
        tokio::spawn(async move { store.increment_from(&id, base, "n", 1).await })
    };
    until_the_stream_holds(&server, &config, 2).await;
    // The consumer records it, then loses Redis; then this app server's
    // connection breaks.
    while worker.step(&token).await.expect("step") > 0 {}
    assert_eq!(events_of(&db, &c.session_id).await.len(), 2);
    worker_proxy.cut();
    assert!(worker.step(&token).await.is_err());
    proxy.cut();
    let s = write
        .await
        .expect("task")
        .expect("applied, as the audit table shows");
    assert_eq!((s.version(), s.get("n")), (2, Some(&json!(1))));
    assert_eq!(store.fallback_writes(), 0, "nothing staged");
    proxy.drop_replies(false);
    proxy.restore();
    worker_proxy.restore();
    until_redis_answers(&store).await;
    let now = store.get(&c.session_id).await.expect("get").expect("live");
    assert_eq!(now.version(), 2, "applied once");
    assert_eq!(now.get("n"), Some(&json!(1)));
    drain(&worker_config, &db).await;
    let seqs = seqs_of(&db, &c.session_id).await;
    assert_eq!(seqs, [1, 2]);
    assert_eq!(store.staged_count().await.expect("staged"), 0);
}

/// The fence between the two ways of writing: app server A cannot reach
/// Redis and stages a write; app server B reaches it, and before it reads
/// or writes the session it closes the database for writes and applies A's
/// staged write. From then on A's writes are refused (unavailable), never
/// staged beside B's: the two can never diverge.
async fn once_redis_is_back_for_one_app_server_no_other_stages_writes(backend: Backend) {
    let (_server, proxy, db, direct, cut_off) = one_app_server_cut_off(backend).await;
    let a = app(&cut_off, &db).await;
    let c = a
        .create(NewSession::for_user(20, "twenty").with("n", 0))
        .await
        .expect("create");
    proxy.cut();
    let staged = a
        .update(&c.session_id, Changes::new().with_set("from_a", 1))
        .await
        .expect("staged: Redis is down for A and nobody reported it up");
    assert_eq!(staged.version(), 2);
    let b = app(&direct, &db).await;
    let seen = b.get(&c.session_id).await.expect("get").expect("live");
    assert_eq!(
        seen.get("from_a"),
        Some(&json!(1)),
        "B applied A's staged write first"
    );
    assert_eq!(b.staged_count().await.expect("staged"), 0);
    let err = a
        .update(&c.session_id, Changes::new().with_set("from_a", 2))
        .await
        .expect_err("Redis is back for B: A may not stage beside it");
    assert!(err.is_unavailable(), "{err}");
    let s = b
        .increment(&c.session_id, "n", 1)
        .await
        .expect("B writes to Redis");
    assert_eq!(s, 1);
    let now = b.get(&c.session_id).await.expect("get").expect("live");
    assert_eq!(now.get("from_a"), Some(&json!(1)));
    assert_eq!(now.version(), 3);
    assert_eq!(b.staged_count().await.expect("staged"), 0);
}

/// The fence while Redis answers one app server and not the other (a
/// partition, or a Redis so slow that only some commands time out): B
/// keeps incrementing a counter in Redis while A, cut off, tries to
/// increment it too. A's increment is refused (unavailable), not staged in
/// the database beside B's: B notices the opening within moments and takes
/// Redis back before A may use it. The counter ends at the number of
/// acknowledged increments, and no two callers were told the same value.
/// Before, A staged its increment on the database's view at once, and its
/// projection later set the counter back, losing B's increments.
async fn no_write_is_staged_while_another_app_server_writes_to_redis(backend: Backend) {
    let (_server, proxy, db, direct, cut_off) = one_app_server_cut_off(backend).await;
    let a = app(&cut_off, &db).await;
    let b = app(&direct, &db).await;
    let c = b
        .create(NewSession::for_user(21, "twenty-one"))
        .await
        .expect("create");
    assert_eq!(b.increment(&c.session_id, "n", 1).await.expect("incr"), 1);
    assert_eq!(a.increment(&c.session_id, "n", 1).await.expect("incr"), 2);
    proxy.cut();
    let stop = CancellationToken::new();
    let busy = {
        let (b, id, stop) = (b.clone(), c.session_id.clone(), stop.clone());
        tokio::spawn(async move {
            let mut told = Vec::new();
            while told.len() < 30 || !stop.is_cancelled() {
                told.push(b.increment(&id, "n", 1).await.expect("B reaches redis"));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            told
        })
    };
    let from_a = a.increment(&c.session_id, "n", 1).await;
    stop.cancel();
    let mut told = busy.await.expect("task");
    let err = from_a.expect_err("redis answers B: A may not stage beside it");
    assert!(err.is_unavailable(), "{err}");
    assert_eq!(a.staged_count().await.expect("staged"), 0);
    proxy.restore();
    until_redis_answers(&a).await;
    told.extend([1, 2]);
    told.sort_unstable();
    let n = told.len() as i64;
    assert_eq!(
        told,
        (1..=n).collect::<Vec<_>>(),
        "each caller told its own value"
    );
    for store in [&a, &b] {
        let s = store.get(&c.session_id).await.expect("get").expect("live");
        assert_eq!(s.get("n"), Some(&json!(n)), "every acknowledged increment");
    }
}

// ---------------------------------------------------------------------------
// 4. The audit database failing fails no Redis operation

/// With `DB_SESSION_SYNC` on and the audit database refusing connections, a
/// load whose touch is due and a login (rotation) succeed: Redis took them,
/// and the consumer records them later. Before, the load returned the audit
/// error (the app answered 503) and the login ended the old session and
/// then failed, logging the user out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_outage_fails_no_redis_operation() {
    let ctx = TestContext::with(|c| c.with_touch_interval(Duration::from_millis(1))).await;
    let db = TestDb::new(Backend::Postgres).await;
    let store = app(&ctx.config, &db).await;
    let c = store
        .create(NewSession::for_user(14, "fourteen"))
        .await
        .expect("create");
    let outage = PgOutage::begin(&db).await;
    let loaded = store
        .load(&c.session_id)
        .await
        .expect("a load succeeds while the audit database is down")
        .expect("live");
    assert!(loaded.version() >= 2, "the touch was written to Redis");
    let rotated = store
        .rotate(&c.session_id, Changes::new().with_set("csrf_token", "t"))
        .await
        .expect("a login succeeds while the audit database is down");
    assert_eq!(store.load(&c.session_id).await.expect("load"), None);
    assert!(
        store
            .load(&rotated.session_id)
            .await
            .expect("load")
            .is_some(),
        "the user has the new session"
    );
    outage.end().await;
}

/// Redis loses its data while a session's audit trail has a gap being
/// filled (the twenty-sixth long fault run: a worker stopped with an entry
/// pending, whose successor recorded the entries after it first). Its
/// snapshot stops before events the table holds, so the session cannot be
/// restored yet; before, a read answered "no session", and the user's
/// requests were refused (403) until the gap was filled a moment later.
/// Now the read is unavailable (503 from the web layer) until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_trail_has_a_gap_being_filled_is_not_answered_as_gone() {
    use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _};
    use vedfolnir_sessions::audit::entity::session_snapshots;
    let ctx = TestContext::new().await;
    let db = TestDb::new(Backend::Sqlite).await;
    let store = app(&ctx.config, &db).await;
    let c = store
        .create(NewSession::for_user(26, "twenty-six").with("n", 0))
        .await
        .expect("create");
    for n in 1..=2 {
        store
            .update(&c.session_id, Changes::new().with_set("n", n))
            .await
            .expect("update");
    }
    assert_eq!(seqs_of(&db, &c.session_id).await, [1, 2, 3]);
    // Seq 2 not recorded yet, and the snapshot folded up to seq 1.
    session_events::Entity::delete_many()
        .filter(session_events::Column::SessionId.eq(c.session_id.as_str()))
        .filter(session_events::Column::Seq.eq(2))
        .exec(&db.db)
        .await
        .expect("delete");
    session_snapshots::Entity::update_many()
        .col_expr(
            session_snapshots::Column::Seq,
            sea_orm::sea_query::Expr::value(1),
        )
        .filter(session_snapshots::Column::SessionId.eq(c.session_id.as_str()))
        .exec(&db.db)
        .await
        .expect("update");
    lose_redis_data(&ctx).await;
    let fresh = app(&ctx.config, &db).await;
    let err = fresh
        .get(&c.session_id)
        .await
        .expect_err("not restorable yet, not gone");
    assert!(err.is_unavailable(), "{err}");
}

/// A synchronous audit write fails (the database is cut), the next write of
/// the same session is synchronous again, and Redis loses its data before
/// the audit consumer has read the first (the twentieth long fault run).
/// Before, the second write was committed at once, the loss made the gap
/// permanent, and the replay, which does not restore a session across a
/// gap, lost the whole session. Now the second write commits the events it
/// finds missing among the stream's last entries with its own (`a`); where
/// they are further back and a consumer reads the stream, it leaves its
/// event to the consumer (`b`), so the trail holds no gap and the session
/// comes back at its last recorded version. Where no consumer runs, nothing
/// would ever fill that gap, and the write is committed as before. An end
/// is committed whatever precedes it.
async fn a_failed_synchronous_audit_write_leaves_no_gap_where_a_consumer_reads(consumer: bool) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(Backend::Postgres).await;
    if consumer {
        // It drains the (empty) stream once, then stops: its turn comes
        // after the loss.
        drain(&ctx.config, &db).await;
    }
    let store = app(&ctx.config, &db).await;
    let mut ids = Vec::new();
    for (n, name) in [(20, "a"), (21, "b"), (22, "ended")] {
        let c = store
            .create(NewSession::for_user(n, name).with("n", 0))
            .await
            .expect("create");
        ids.push(c.session_id);
    }
    let [a, b, ended] = [&ids[0], &ids[1], &ids[2]];
    let outage = PgOutage::begin(&db).await;
    for id in [a, b, ended] {
        store
            .update(id, Changes::new().with_set("n", 1))
            .await
            .expect("an audit outage fails no write");
    }
    outage.end().await;
    // Until the store's synchronous writes commit again: a new session's
    // creation is in the table when the call returns.
    let mut attempts = 0;
    loop {
        let probe = store
            .create(NewSession::for_user(23, "probe"))
            .await
            .expect("create");
        if !events_of(&db, &probe.session_id).await.is_empty() {
            break;
        }
        attempts += 1;
        assert!(attempts < 50, "synchronous audit writes commit again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // `a`'s missing event is among the stream's last entries.
    store
        .update(a, Changes::new().with_set("n", 2))
        .await
        .expect("update");
    assert_eq!(seqs_of(&db, a).await, [1, 2, 3], "the gap filled");
    // `b`'s and `ended`'s are further back than a write looks.
    for _ in 0..300 {
        store.create(NewSession::anonymous()).await.expect("create");
    }
    store
        .update(b, Changes::new().with_set("n", 2))
        .await
        .expect("update");
    if !consumer {
        assert_eq!(
            seqs_of(&db, b).await,
            [1, 3],
            "no consumer: committed at once"
        );
        return;
    }
    assert_eq!(
        seqs_of(&db, b).await,
        [1, 3],
        "acknowledged, so committed after the gap"
    );
    assert!(
        store
            .destroy(ended, DestroyReason::Logout)
            .await
            .expect("destroy")
    );
    let kinds: Vec<(i64, String)> = events_of(&db, ended)
        .await
        .into_iter()
        .map(|e| (e.seq, e.event_type))
        .collect();
    assert_eq!(
        kinds,
        [(1, "created".to_owned()), (3, "destroyed".to_owned())]
    );
    lose_redis_data(&ctx).await;
    let fresh = app(&ctx.config, &db).await;
    assert_eq!(
        fresh.get(ended).await.expect("get"),
        None,
        "an ended session stays ended"
    );
    let back = fresh.get(a).await.expect("get").expect("restored");
    assert_eq!((back.version(), back.get("n")), (3, Some(&json!(2))));
    // `b`'s trail has a gap nothing can fill: it is not restored (the
    // limit that remains when the missing event is not in the stream's
    // last entries).
    assert!(!matches!(fresh.get(b).await, Ok(Some(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_synchronous_audit_write_leaves_no_gap_beside_a_consumer() {
    a_failed_synchronous_audit_write_leaves_no_gap_where_a_consumer_reads(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_synchronous_audit_write_without_a_consumer_is_followed_at_once() {
    a_failed_synchronous_audit_write_leaves_no_gap_where_a_consumer_reads(false).await;
}

/// Redis loses its data while the audit database is unreachable (the
/// sixteenth long fault run: an empty restart, and requests that had waited
/// out the outage read the new, empty Redis before any replay). Nothing can
/// say what the lost data set held, so a read of a session that was live
/// answers an error (503 from the web layer), not "no session": before, the
/// store took the failed read of the recovery state for "not recovering",
/// the web layer answered 401/403 and the user was logged out, although the
/// replay brought the session back moments later. A read from a process that never confirmed
/// an epoch, while Redis still has its epoch, still stands (an audit outage
/// fails no read while Redis is whole), and once the database is back the
/// session is served from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_after_redis_lost_its_data_is_no_answer_while_the_database_is_down() {
    let (ctx, db, store, c, unknown) = confirmed(16, "sixteen").await;
    let fresh = app(&ctx.config, &db).await;

    // An audit outage alone, Redis whole: misses stand, also for a process
    // that never confirmed an epoch, and the live session is served.
    let outage = PgOutage::begin(&db).await;
    assert_eq!(store.get(&unknown).await.expect("miss stands"), None);
    assert_eq!(fresh.get(&unknown).await.expect("miss stands"), None);
    assert!(store.get(&c.session_id).await.expect("get").is_some());

    // Redis loses its data during the audit outage.
    lose_redis_data(&ctx).await;
    let read = store.get(&c.session_id).await;
    assert!(
        matches!(&read, Err(Error::Database(_))) || matches!(&read, Err(e) if e.is_unavailable()),
        "a session the lost data set may have held is no miss: {read:?}"
    );
    outage.end().await;
    let back = store
        .get(&c.session_id)
        .await
        .expect("get")
        .expect("served from the database once it is back");
    assert_eq!(back.get("username"), Some(&json!("sixteen")));
}

/// An app server on PostgreSQL with one session of `user`, the audit trail
/// drained, whose miss of an unknown id (returned) has confirmed Redis's
/// epoch.
async fn confirmed(
    user: u64,
    name: &str,
) -> (
    TestContext,
    TestDb,
    SessionStore,
    vedfolnir_sessions::store::Created,
    SessionId,
) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(Backend::Postgres).await;
    let store = app(&ctx.config, &db).await;
    let c = store
        .create(NewSession::for_user(user, name))
        .await
        .expect("create");
    drain(&ctx.config, &db).await;
    // A miss confirms this process's epoch.
    let unknown = Token::generate().session_id();
    assert_eq!(store.get(&unknown).await.expect("miss"), None);
    (ctx, db, store, c, unknown)
}

/// The twenty-ninth long fault run: an app server that last confirmed the
/// data set Redis lost asked the database, at its first miss after another
/// process's replay had finished, whether the new data set was complete; the
/// database was cut, and a logged-out user's request got 503 instead of
/// 401. The healer now copies the epoch it recorded beside the data set, so
/// the miss stands without the database, while the live session is served.
/// A copy that names another data set than Redis's (one written just after
/// another loss) confirms nothing: that miss is still no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_after_a_finished_replay_stands_while_the_database_is_down() {
    let (ctx, db, store, c, unknown) = confirmed(17, "seventeen").await;
    let part = store.keys().for_session(&c.session_id).clone();
    let lost: Option<String> = ctx.conn().get(&part.epoch).await.expect("epoch");

    // Redis loses its data; another process replays it and records it.
    lose_redis_data(&ctx).await;
    let healer = app(&ctx.config, &db).await;
    let summary = healer.heal().await.expect("heal").expect("replayed");
    assert_eq!(summary.restored, 1);
    let epoch: Option<String> = ctx.conn().get(&part.epoch).await.expect("epoch");
    let copied: Option<String> = ctx.conn().get(&part.recovered).await.expect("copy");
    assert!(
        epoch.is_some() && epoch != lost,
        "a new data set: {epoch:?}"
    );
    assert_eq!(
        copied, epoch,
        "the epoch recorded complete, beside the data"
    );

    // The audit database fails: this process, which confirmed the lost data
    // set, answers the miss from Redis alone.
    let outage = PgOutage::begin(&db).await;
    assert_eq!(
        store.get(&unknown).await.expect("the miss stands"),
        None,
        "Redis holds the data set the database recorded complete"
    );
    let served = store.get(&c.session_id).await.expect("get").expect("live");
    assert_eq!(served.get("username"), Some(&json!("seventeen")));

    // Redis loses its data again, and a late copy of the old epoch lands
    // in the new data set: it names another epoch, so nothing is confirmed.
    lose_redis_data(&ctx).await;
    let _: () = ctx
        .conn()
        .set(&part.epoch, uuid::Uuid::now_v7().to_string())
        .await
        .expect("set");
    let _: () = ctx
        .conn()
        .set(&part.recovered, epoch.expect("epoch"))
        .await
        .expect("set");
    let read = store.get(&c.session_id).await;
    assert!(
        matches!(&read, Err(Error::Database(_))) || matches!(&read, Err(e) if e.is_unavailable()),
        "a session the lost data set may have held is no miss: {read:?}"
    );
    outage.end().await;
    assert!(store.get(&c.session_id).await.expect("get").is_some());
}

/// An outage of a PostgreSQL test database: new connections are refused
/// and the open ones terminated, until [`PgOutage::end`].
struct PgOutage {
    admin: sea_orm::DatabaseConnection,
    name: String,
}

impl PgOutage {
    async fn begin(db: &TestDb) -> PgOutage {
        let name = db.url.rsplit('/').next().expect("db name").to_owned();
        let admin =
            sea_orm::Database::connect(format!("{}/postgres", vedfolnir_tests::db::pg_base_url()))
                .await
                .expect("admin");
        let outage = PgOutage { admin, name };
        outage.allow(false).await;
        outage
            .sql(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'",
                outage.name
            ))
            .await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        outage
    }

    async fn end(self) {
        self.allow(true).await;
    }

    async fn allow(&self, on: bool) {
        self.sql(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {on}",
            self.name
        ))
        .await;
    }

    async fn sql(&self, sql: &str) {
        use sea_orm::ConnectionTrait as _;
        self.admin.execute_unprepared(sql).await.expect(sql);
    }
}

/// A Redis outage with a write staged in the database, then the database
/// fails before the write was projected (the fourth long fault run). The
/// store cannot tell from the database whether the session has staged
/// writes, but Redis holds the outage's mark: the session answers
/// unavailable, from the app server that saw the outage and from one started
/// since, instead of Redis's older state (before, the counter read 1 and
/// the next increment wrote 2 over the staged 2, losing one). Once the
/// database is back the staged write is applied, the mark cleared, and the
/// count goes on from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_staged_before_the_database_failed_is_not_overwritten() {
    let (server, proxy, db, config) =
        behind_proxy(Backend::Postgres, Duration::from_millis(300)).await;
    let a = app(&config, &db).await;
    let c = a
        .create(NewSession::for_user(15, "fifteen"))
        .await
        .expect("create");
    assert_eq!(a.increment(&c.session_id, "n", 1).await.expect("incr"), 1);
    proxy.cut();
    assert_eq!(
        a.increment(&c.session_id, "n", 1)
            .await
            .expect("staged during the outage"),
        2
    );
    assert_eq!(a.staged_count().await.expect("staged"), 1);
    let outage = PgOutage::begin(&db).await;
    proxy.restore();
    let mut admin = server.connection().await;
    let mark = a.keys().all()[0].outage.clone();
    for store in [a.clone(), app(&config, &db).await] {
        // Unavailable, or the database's own error: both are 503s.
        let refused = |e: &Error| e.is_unavailable() || matches!(e, Error::Database(_));
        let read = store.load(&c.session_id).await;
        assert!(
            matches!(&read, Err(e) if refused(e)),
            "Redis's older state is not served: {read:?}"
        );
        let write = store.increment(&c.session_id, "n", 1).await;
        assert!(
            matches!(&write, Err(e) if refused(e)),
            "no write on Redis's older state: {write:?}"
        );
    }
    let marked: bool = admin.exists(&mark).await.expect("exists");
    assert!(marked, "the outage is marked in redis");
    outage.end().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let n = loop {
        match a.increment(&c.session_id, "n", 1).await {
            Ok(n) => break n,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the database is back: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(n, 3, "the staged increment was applied first");
    assert_eq!(a.staged_count().await.expect("staged"), 0);
    a.project_staged().await.expect("projection");
    let marked: bool = admin.exists(&mark).await.expect("exists");
    assert!(!marked, "a projection clears the mark");
    // Redis now holds every staged write: a database outage alone fails
    // nothing.
    let outage = PgOutage::begin(&db).await;
    let s = a.load(&c.session_id).await.expect("load").expect("live");
    assert_eq!(s.get("n"), Some(&json!(3)));
    outage.end().await;
}

// ---------------------------------------------------------------------------
// 5. A dropped connection is retried before the fallback

/// `CLIENT KILL TYPE normal` drops the store's connection: the next write (a
/// login, the first command after the kill) is sent again on a new
/// connection and lands in Redis, not in the fallback; so does a write that
/// folds on a state read before the kill.
async fn a_dropped_connection_is_retried_not_a_fallback(backend: Backend) {
    let server = vedfolnir_tests::redis_server::RedisServer::start().await;
    let db = TestDb::new(backend).await;
    let namespace = format!("vdeg:{}:", uuid::Uuid::new_v4().simple());
    let config = Config::default()
        .with_redis(RedisTarget::parse("REDIS_URL", &server.url()).expect("url"))
        .with_namespace(&namespace);
    let store = app(&config, &db).await;
    let c = store
        .create(NewSession::for_user(15, "fifteen"))
        .await
        .expect("create");
    let mut admin = server.connection().await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query_async(&mut admin)
        .await
        .expect("client kill");
    assert!(killed >= 1);
    let login = store
        .create(NewSession::for_user(15, "fifteen"))
        .await
        .expect("login after the kill");
    let exists: bool = admin
        .exists(format!("{namespace}session:{}", login.session_id))
        .await
        .expect("exists");
    assert!(exists, "the login is in Redis");
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query_async(&mut admin)
        .await
        .expect("client kill");
    assert!(killed >= 1);
    let s = store
        .update_from(
            &c.session_id,
            c.session.clone(),
            Changes::new().with_set("after", "kill"),
        )
        .await
        .expect("update");
    assert_eq!(s.version(), 2);
    assert_eq!(store.fallback_writes(), 0, "nothing went to the fallback");
    assert_eq!(store.staged_count().await.expect("staged"), 0);
    let raw: String = admin
        .get(format!("{namespace}session:{}", c.session_id))
        .await
        .expect("get");
    assert!(raw.contains("\"after\":\"kill\""), "{raw}");
}

// ---------------------------------------------------------------------------
// 7. No lost updates for what users write

/// Twenty concurrent increments of one session, through `increment` and
/// through `modify`: the counter ends at twenty, and every caller was told a
/// different value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_lose_nothing() {
    let ctx = TestContext::new().await;
    let c = ctx
        .store
        .create(NewSession::for_user(16, "sixteen"))
        .await
        .expect("create");
    let tasks = (0..20).map(|n| {
        let store = ctx.store.clone();
        let id = c.session_id.clone();
        tokio::spawn(async move {
            if n % 2 == 0 {
                store.increment(&id, "visits", 1).await.expect("increment")
            } else {
                let s = store
                    .modify(&id, "visits", |v| {
                        let now = v.and_then(serde_json::Value::as_i64).unwrap_or(0);
                        Ok(Some(json!(now + 1)))
                    })
                    .await
                    .expect("modify");
                s.get("visits")
                    .and_then(serde_json::Value::as_i64)
                    .expect("set")
            }
        })
    });
    let mut told: Vec<i64> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    told.sort_unstable();
    assert_eq!(told, (1..=20).collect::<Vec<_>>());
    let s = ctx
        .store
        .get(&c.session_id)
        .await
        .expect("get")
        .expect("live");
    assert_eq!(s.get("visits"), Some(&json!(20)));
    assert_eq!(s.version(), 21);
    let err = ctx
        .store
        .update(&c.session_id, Changes::new().with_set("name", "x"))
        .await
        .and(ctx.store.increment(&c.session_id, "name", 1).await)
        .expect_err("a string is not a counter");
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
}

/// A change computed from a read is refused when a concurrent write changed
/// what was read, never merged; a change of other keys is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_from_a_stale_read_is_refused() {
    let ctx = TestContext::new().await;
    let c = ctx
        .store
        .create(NewSession::for_user(17, "seventeen").with("visits", 1))
        .await
        .expect("create");
    let read = c.session.clone();
    ctx.store
        .update(&c.session_id, Changes::new().with_set("visits", 2))
        .await
        .expect("a concurrent write");
    let err = ctx
        .store
        .update_from(
            &c.session_id,
            read.clone(),
            Changes::new()
                .with_set("visits", 2)
                .with_expect("visits", Some(json!(1))),
        )
        .await
        .expect_err("computed from a stale read");
    assert!(
        matches!(&err, Error::StaleRead { key, .. } if key == "visits"),
        "{err}"
    );
    let s = ctx
        .store
        .update_from(
            &c.session_id,
            read,
            Changes::new()
                .with_set("theme", "dark")
                .with_expect("other", None),
        )
        .await
        .expect("unaffected by the concurrent write");
    assert_eq!(s.get("visits"), Some(&json!(2)));
    assert_eq!(s.get("theme"), Some(&json!("dark")));
}

vedfolnir_tests::on_both_backends!(
    ended_sessions_are_never_served_again,
    recovery_never_serves_a_snapshot_older_than_a_tombstone,
    an_expired_session_is_not_restored,
    recovery_is_known_and_ends_without_a_worker,
    ends_reach_sessions_that_are_not_back_yet,
    outage_writes_survive_a_restart_of_their_app_server,
    a_projected_write_survives_a_loss_of_redis_data,
    a_staged_write_of_a_session_ended_meanwhile_is_logged_after_the_end,
    split_brain_keeps_both_writes_in_order,
    a_dropped_connection_is_retried_not_a_fallback,
    a_write_applied_before_its_reply_was_lost_is_not_applied_twice,
    an_increment_whose_outcome_is_unknown_is_not_folded_again,
    a_staged_write_already_projected_is_not_applied_again,
    a_write_during_a_recovery_reaches_a_session_not_back_yet,
    once_redis_is_back_for_one_app_server_no_other_stages_writes,
    no_write_is_staged_while_another_app_server_writes_to_redis,
);
