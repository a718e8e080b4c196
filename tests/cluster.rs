//! The product on Redis Cluster: keys spread over every primary, the worker
//! auditing every partition exactly once and reaping every partition,
//! partition leases spreading and taking over, and a primary killed mid-load.
//!
//! The shared cluster comes from `bash scripts/cluster.sh start` (the test
//! command starts it); the failover test starts a cluster of its own.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sea_orm::{ConnectionTrait as _, DatabaseConnection, Statement};
use tokio_util::sync::CancellationToken;
use vedfolnir_sessions::audit::ConsumerConfig;
use vedfolnir_sessions::config::RedisTarget;
use vedfolnir_sessions::lease::Leases;
use vedfolnir_sessions::reaper::ReaperConfig;
use vedfolnir_sessions::{Changes, Config, NewSession, SessionStore};
use vedfolnir_tests::cluster::PrivateCluster;
use vedfolnir_tests::db::{Backend, TestDb};
use vedfolnir_tests::{TestContext, Topology};
use vedfolnir_worker::{self as worker, Parts};

fn consumer() -> ConsumerConfig {
    ConsumerConfig {
        block: Duration::from_millis(100),
        claim_idle: Duration::from_millis(300),
        retry_max: Duration::from_millis(200),
        // Trim everything acknowledged: the tests check the streams shrink.
        retention: Duration::ZERO,
        ..ConsumerConfig::default()
    }
}

fn reaper() -> ReaperConfig {
    ReaperConfig {
        interval: Duration::from_millis(100),
        batch: 500,
    }
}

/// Runs the worker in this process until the returned token is cancelled.
fn start_worker(config: &Config) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let token = CancellationToken::new();
    let (config, t) = (config.clone(), token.clone());
    let handle = tokio::spawn(async move {
        worker::run(
            &config,
            Parts::Both,
            consumer(),
            reaper(),
            Duration::from_millis(900),
            t,
        )
        .await
        .expect("the worker exits cleanly");
    });
    (token, handle)
}

/// (session_id, seq, event_type) of every audited event.
async fn audited(db: &DatabaseConnection) -> Vec<(String, i64, String)> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT session_id, seq, event_type FROM session_events",
        ))
        .await
        .expect("select events");
    rows.iter()
        .map(|r| {
            (
                r.try_get("", "session_id").expect("session_id"),
                r.try_get("", "seq").expect("seq"),
                r.try_get("", "event_type").expect("event_type"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_spread_over_all_primaries_and_share_their_partitions_slot() {
    let ctx = TestContext::on(Topology::Cluster).await;
    let mut ids = Vec::new();
    for i in 0..48 {
        let c = ctx
            .store
            .create(NewSession::for_user(i % 5, "spread"))
            .await
            .expect("create");
        ids.push(c.session_id);
    }
    let mut per_primary: BTreeMap<String, usize> = BTreeMap::new();
    for (host, port) in ctx.conn().primaries().await.expect("primaries") {
        let client = redis::Client::open(format!("redis://{host}:{port}")).expect("node url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("node");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", ctx.namespace))
            .query_async(&mut conn)
            .await
            .expect("keys");
        per_primary.insert(format!("{host}:{port}"), keys.len());
    }
    assert_eq!(per_primary.len(), 3, "three primaries: {per_primary:?}");
    assert!(
        per_primary.values().all(|n| *n > 0),
        "every primary holds session keys: {per_primary:?}"
    );
    // A session's key, its ledger, its partition's stream and indexes share
    // one slot.
    let mut conn = ctx.conn();
    for id in &ids {
        let part = ctx.store.keys().for_session(id);
        let mut slots = BTreeSet::new();
        for key in [
            part.session(id),
            part.ledger(id),
            part.stream.clone(),
            part.expiry.clone(),
            part.user("0"),
        ] {
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("keyslot");
            slots.insert(slot);
        }
        assert_eq!(slots.len(), 1, "one slot for session {id}: {slots:?}");
    }
    // Cross-partition reads see every session of a user.
    let of_user_0 = ctx.store.user_sessions("0").await.expect("user sessions");
    assert_eq!(of_user_0.len(), 10);
    let stats = ctx.store.stats(3).await.expect("stats");
    assert_eq!(stats.active_sessions, 48);
    assert_eq!(stats.stream_length, 48);
    assert_eq!(stats.users_with_sessions, 5);
    assert_eq!(stats.top_users[0].sessions, 10);
    let ended = ctx
        .store
        .destroy_all_for_user("0", vedfolnir_sessions::DestroyReason::LogoutAll)
        .await
        .expect("logout everywhere");
    assert_eq!(
        ended.len(),
        10,
        "every partition's sessions of the user end"
    );
    assert!(
        ctx.store
            .user_sessions("0")
            .await
            .expect("after")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_audits_and_reaps_every_partition_exactly_once() {
    let ctx = TestContext::on_with(Topology::Cluster, |c| {
        c.with_session_timeout(Duration::from_secs(3))
    })
    .await;
    let tdb = TestDb::new(Backend::Sqlite).await;
    let mut config = ctx.config.clone();
    config.database_url = tdb.url.clone();
    let (token, handle) = start_worker(&config);
    // A malformed entry in one partition's stream: a dead letter naming it.
    let poisoned = ctx.store.keys().part(5).stream.clone();
    let _: String = redis::cmd("XADD")
        .arg(&poisoned)
        .arg("*")
        .arg("garbage")
        .arg("1")
        .query_async(&mut ctx.conn())
        .await
        .expect("xadd");
    let (sessions, updates) = (320, 5);
    let mut ids = Vec::new();
    for i in 0..sessions {
        let c = ctx
            .store
            .create(NewSession::for_user(i, "audited"))
            .await
            .expect("create");
        for u in 0..updates {
            ctx.store
                .update(&c.session_id, Changes::new().with_set("n", u))
                .await
                .expect("update");
        }
        ids.push(c.session_id.to_string());
    }
    let partitions: BTreeSet<u32> = ids
        .iter()
        .map(|i| ctx.store.keys().partition_of(&i.parse().expect("id")))
        .collect();
    assert_eq!(partitions.len(), 16, "the sessions spread: {partitions:?}");
    // Every session is audited, then idles out: one `expired` each.
    let per_session = 1 + updates as i64 + 1;
    ctx.eventually(
        "every event and every expiry audited",
        Duration::from_secs(60),
        || async { audited(&tdb.db).await.len() as i64 >= sessions as i64 * per_session },
    )
    .await;
    // Each partition's stream is trimmed below what its group acknowledged
    // (approximately: whole stream nodes of 100 entries go).
    let total = sessions as u64 * per_session as u64;
    ctx.eventually("the streams trimmed", Duration::from_secs(30), || async {
        ctx.stream_len().await < total / 2
    })
    .await;
    token.cancel();
    handle.await.expect("worker task");
    let rows = audited(&tdb.db).await;
    let distinct: HashSet<(String, i64)> = rows.iter().map(|(s, q, _)| (s.clone(), *q)).collect();
    assert_eq!(rows.len(), distinct.len(), "no event twice");
    assert_eq!(rows.len() as i64, sessions as i64 * per_session);
    let dead = tdb
        .db
        .query_all_raw(Statement::from_string(
            tdb.db.get_database_backend(),
            "SELECT stream FROM dead_letters",
        ))
        .await
        .expect("dead letters");
    let streams: Vec<String> = dead
        .iter()
        .map(|r| r.try_get("", "stream").expect("stream"))
        .collect();
    assert_eq!(
        streams,
        [poisoned],
        "one dead letter, in its partition's stream"
    );
    for id in &ids {
        let mut seqs: Vec<(i64, &str)> = rows
            .iter()
            .filter(|(s, _, _)| s == id)
            .map(|(_, q, t)| (*q, t.as_str()))
            .collect();
        seqs.sort();
        let want: Vec<i64> = (1..=per_session).collect();
        assert_eq!(
            seqs.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
            want,
            "{id}"
        );
        assert_eq!(seqs.last().map(|(_, t)| *t), Some("expired"), "{id}");
    }
    // Every partition that got events has its own audit group, and its
    // stream was consumed to the end.
    let mut conn = ctx.conn();
    for p in &partitions {
        let stream = &ctx.store.keys().part(*p).stream;
        let groups: Vec<BTreeMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(&mut conn)
            .await
            .expect("groups");
        assert_eq!(groups.len(), 1, "{stream}");
        assert_eq!(
            groups[0].get("pending"),
            Some(&redis::Value::Int(0)),
            "{stream}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_spread_partitions_and_a_dead_workers_are_taken_over() {
    let ctx = TestContext::on(Topology::Cluster).await;
    let ttl = Duration::from_millis(600);
    let space = ctx.store.keys().clone();
    let mut a = Leases::new(ctx.conn(), space.clone(), "worker-a", ttl);
    let mut b = Leases::new(ctx.conn(), space.clone(), "worker-b", ttl);
    let first = a.tick().await.expect("a alone");
    assert_eq!(first.acquired.len(), 16, "alone, a takes every partition");
    let none = b.tick().await.expect("b joins");
    assert!(none.acquired.is_empty(), "all taken: {none:?}");
    let given = a.tick().await.expect("a rebalances");
    assert_eq!(given.released.len(), 8, "a gives up above its share");
    let taken = b.tick().await.expect("b takes");
    assert_eq!(taken.acquired.len(), 8);
    assert!(a.owned().is_disjoint(b.owned()));
    assert_eq!(a.owned().union(b.owned()).count(), 16);
    // a dies (stops renewing): b takes everything once a's leases run out.
    let dead = a.owned().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b.owned().len() < 16 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b did not take over a's partitions: {:?}",
            b.owned()
        );
        tokio::time::sleep(b.interval()).await;
        b.tick().await.expect("tick");
    }
    assert!(dead.is_subset(b.owned()));
    b.release_all().await.expect("release");
    let mut conn = ctx.conn();
    for p in 0..16 {
        let held: Option<String> = redis::cmd("GET")
            .arg(space.lease(p))
            .query_async(&mut conn)
            .await
            .expect("get");
        assert_eq!(held, None, "partition {p} released");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_mid_load_loses_no_acknowledged_event() {
    let mut cluster = PrivateCluster::start().await;
    let nodes: Vec<RedisTarget> = cluster
        .nodes()
        .iter()
        .map(|u| RedisTarget::parse("REDIS_CLUSTER_NODES", u).expect("node"))
        .collect();
    let tdb = TestDb::new(Backend::Sqlite).await;
    let namespace = format!("vtest:{}:", uuid::Uuid::new_v4().simple());
    let mut config = Config::default()
        .with_namespace(&namespace)
        .with_cluster(nodes, 16)
        // Acknowledged = on a replica too, so the failover cannot lose it.
        .with_wait_replicas(1, Duration::from_millis(1000));
    config.database_url = tdb.url.clone();
    let store = SessionStore::connect(&config).await.expect("connect");
    let (token, handle) = start_worker(&config);
    let acked: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (store, acked, errors, stop) =
            (store.clone(), acked.clone(), errors.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let c = match store.create(NewSession::for_user(w, "load")).await {
                    Ok(c) => c,
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                acked
                    .lock()
                    .expect("lock")
                    .push((c.session_id.to_string(), 1));
                for n in 0..10 {
                    match store
                        .update(&c.session_id, Changes::new().with_set("n", n))
                        .await
                    {
                        Ok(s) => acked
                            .lock()
                            .expect("lock")
                            .push((c.session_id.to_string(), s.version())),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    let count = |a: &Arc<Mutex<Vec<(String, u64)>>>| a.lock().expect("lock").len();
    let wait_acked = |target: usize, what: &'static str| {
        let acked = acked.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
            while count(&acked) < target {
                assert!(tokio::time::Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_acked(200, "load before the kill").await;
    let killed = cluster.kill_primary_for_slot(0).await;
    let before_kill = count(&acked);
    let promotion = cluster
        .wait_for_promotion(&killed, Duration::from_secs(60))
        .await;
    // The old primary comes back as the new one's replica, so WAIT can be
    // satisfied on that shard again.
    cluster.restart(&killed).await;
    let after_rejoin = count(&acked);
    wait_acked(
        after_rejoin + 200,
        "the store keeps serving after the failover",
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let acked = acked.lock().expect("lock").clone();
    let want: HashSet<(String, i64)> = acked.iter().map(|(s, q)| (s.clone(), *q as i64)).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let missing = loop {
        let have: HashSet<(String, i64)> = audited(&tdb.db)
            .await
            .into_iter()
            .map(|(s, q, _)| (s, q))
            .collect();
        let missing: Vec<&(String, i64)> = want.iter().filter(|k| !have.contains(*k)).collect();
        if missing.is_empty() || tokio::time::Instant::now() >= deadline {
            break missing.len();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    token.cancel();
    handle.await.expect("worker task");
    let rows = audited(&tdb.db).await;
    let distinct: HashSet<(String, i64)> = rows.iter().map(|(s, q, _)| (s.clone(), *q)).collect();
    eprintln!(
        "failover: {killed} killed after {before_kill} acknowledged events; \
         {} promoted in {:?}; {} acknowledged in all, {} writes refused \
         (not acknowledged) during the failover; {} audited, {missing} missing",
        promotion.new_primary,
        promotion.took,
        acked.len(),
        errors.load(Ordering::Relaxed),
        rows.len(),
    );
    assert_eq!(
        missing, 0,
        "every acknowledged event reached the audit database"
    );
    assert_eq!(rows.len(), distinct.len(), "no event audited twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_verify_cover_every_partition_after_a_loss() {
    let ctx = TestContext::on(Topology::Cluster).await;
    let tdb = TestDb::new(Backend::Sqlite).await;
    let sink = vedfolnir_sessions::audit::AuditSink::new(
        tdb.db.clone(),
        ctx.config.session_timeout,
        ctx.config.event_stream.clone(),
    );
    // DB_SESSION_SYNC (on by default): each mutation is in the database when
    // it returns.
    let store = ctx.store.clone().with_audit(sink);
    let mut ids = Vec::new();
    for i in 0..40 {
        let c = store
            .create(NewSession::for_user(i, "replayed"))
            .await
            .expect("create");
        store
            .update(&c.session_id, Changes::new().with_set("k", i))
            .await
            .expect("update");
        ids.push(c.session_id);
    }
    let report = vedfolnir_sessions::recovery::verify(&ctx.store, &tdb.db)
        .await
        .expect("verify");
    assert!(report.ok, "{report:?}");
    assert_eq!(report.checked, 40);
    // Every shard loses the namespace.
    vedfolnir_tests::delete_cluster_namespace(&ctx.namespace);
    assert!(ctx.store.get(&ids[0]).await.expect("get").is_none());
    let summary = vedfolnir_sessions::recovery::replay(&ctx.store, &tdb.db, |_, _| {})
        .await
        .expect("replay");
    assert_eq!(summary.restored, 40, "{summary:?}");
    for id in &ids {
        let s = ctx.store.get(id).await.expect("get").expect("restored");
        assert_eq!(s.version(), 2);
    }
    let again = vedfolnir_sessions::recovery::replay(&ctx.store, &tdb.db, |_, _| {})
        .await
        .expect("replay again");
    assert_eq!(again.already_current, 40, "idempotent: {again:?}");
}
