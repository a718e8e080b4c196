//! Recovery against the real Redis and both databases: replay after a loss,
//! point-in-time state, verify, reads while recovering, and the ends that
//! only the database sweep of overdue sessions can write.

use std::time::Duration;

use redis::AsyncCommands as _;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use vedfolnir_sessions::audit::entity::dead_letters;
use vedfolnir_sessions::audit::entity::session_events::{self, EventSource};
use vedfolnir_sessions::audit::entity::session_snapshots::{self, SnapshotStatus};
use vedfolnir_sessions::audit::partition::DRAIN_SLACK;
use vedfolnir_sessions::audit::{AuditConsumer, AuditSink, ConsumerConfig};
use vedfolnir_sessions::reaper::{OverdueConfig, OverdueSweeper, Reaper, ReaperConfig};
use vedfolnir_sessions::recovery::{self, Healer, Selection};
use vedfolnir_sessions::{Changes, DestroyReason, NewSession, SessionId};
use vedfolnir_tests::TestContext;
use vedfolnir_tests::db::{Backend, TestDb};

fn sink(ctx: &TestContext, db: &TestDb) -> AuditSink {
    AuditSink::new(
        db.db.clone(),
        ctx.config.session_timeout,
        ctx.config.event_stream.clone(),
    )
}

async fn drain(ctx: &TestContext, db: &TestDb) {
    let cfg = ConsumerConfig {
        block: Duration::from_millis(20),
        retention: Duration::from_secs(600),
        ..ConsumerConfig::default()
    };
    let mut c = AuditConsumer::new(&ctx.config, sink(ctx, db), cfg)
        .await
        .expect("consumer");
    c.ensure_group().await.expect("group");
    let token = CancellationToken::new();
    while c.step(&token).await.expect("step") > 0 {}
}

/// Deletes every key of the test's namespace: what a Redis restart without
/// persistence does to it.
async fn lose_redis_data(ctx: &TestContext) {
    let keys = ctx.keys().await;
    if !keys.is_empty() {
        let _: () = ctx.conn().del(keys).await.expect("del");
    }
}

async fn replay_restores_identical_sessions(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let mut live = Vec::new();
    for n in 0..20 {
        let c = ctx
            .store
            .create(NewSession::for_user(n % 3, "u"))
            .await
            .expect("create");
        ctx.store
            .update(
                &c.session_id,
                Changes::new()
                    .with_set("n", n)
                    .with_set("deep", json!({"a": [1, "é"]})),
            )
            .await
            .expect("update");
        if n % 5 == 0 {
            ctx.store
                .destroy(&c.session_id, DestroyReason::Logout)
                .await
                .expect("destroy");
        } else {
            live.push(c.session_id);
        }
    }
    drain(&ctx, &db).await;
    let mut before = Vec::new();
    for id in &live {
        let raw: String = ctx.conn().get(ctx.session_key(id)).await.expect("get");
        let pttl: i64 = ctx.conn().pttl(ctx.session_key(id)).await.expect("pttl");
        // The deadline the key had, on this clock.
        before.push((raw, chrono::Utc::now().timestamp_millis() + pttl));
    }
    lose_redis_data(&ctx).await;
    assert_eq!(
        ctx.store.get(&live[0]).await.expect("get"),
        None,
        "the loss is real"
    );
    let summary = recovery::replay(&ctx.store, &db.db, |_, _| {})
        .await
        .expect("replay");
    assert_eq!(summary.restored, live.len() as u64);
    assert_eq!(summary.destroyed, 4);
    for (id, (raw, deadline)) in live.iter().zip(&before) {
        let now: String = ctx.conn().get(ctx.session_key(id)).await.expect("restored");
        assert_eq!(&now, raw, "identical JSON for {id}");
        let ttl: i64 = ctx.conn().pttl(ctx.session_key(id)).await.expect("pttl");
        let restored = chrono::Utc::now().timestamp_millis() + ttl;
        assert!(
            (restored - deadline).abs() < 1000,
            "restored deadline {restored} vs {deadline}: the remaining TTL is off"
        );
    }
    let mine = ctx
        .store
        .user_sessions("1")
        .await
        .expect("user index rebuilt");
    assert_eq!(
        mine.len(),
        live.iter().filter(|_| true).count().min(mine.len())
    );
    assert!(!mine.is_empty());
    // Versions continue from the database.
    let s = ctx
        .store
        .update(&live[0], Changes::new().with_set("after", true))
        .await
        .expect("update");
    assert_eq!(s.version(), 3);
    // Idempotent, and never overwrites a newer session.
    let again = recovery::replay(&ctx.store, &db.db, |_, _| {})
        .await
        .expect("replay");
    assert_eq!(again.restored, 0);
    assert_eq!(again.skipped_newer, 1);
    assert_eq!(again.already_current, live.len() as u64 - 1);
    let raw: String = ctx
        .conn()
        .get(ctx.session_key(&live[0]))
        .await
        .expect("get");
    assert!(raw.contains("\"after\":true"));
    drain(&ctx, &db).await;
    let report = recovery::verify(&ctx.store, &db.db).await.expect("verify");
    assert!(report.ok, "{report:?}");
    assert_eq!(report.agree, live.len() as u64);
}

async fn point_in_time_and_verify(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let c = ctx
        .store
        .create(NewSession::for_user(9, "nine"))
        .await
        .expect("create");
    ctx.store
        .update(&c.session_id, Changes::new().with_set("stage", "one"))
        .await
        .expect("update");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let t1 = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    ctx.store
        .update(&c.session_id, Changes::new().with_set("stage", "two"))
        .await
        .expect("update");
    let other = ctx
        .store
        .create(NewSession::for_user(8, "eight"))
        .await
        .expect("create");
    drain(&ctx, &db).await;
    let at_t1 = recovery::state_at(
        &db.db,
        t1,
        &Selection {
            session_id: Some(c.session_id.to_string()),
            user_id: None,
        },
    )
    .await
    .expect("state at");
    assert_eq!(at_t1.len(), 1);
    assert_eq!(at_t1[0].seq, 2);
    assert_eq!(at_t1[0].state["stage"], "one");
    let by_user = recovery::state_at(
        &db.db,
        chrono::Utc::now(),
        &Selection {
            session_id: None,
            user_id: Some("9".to_owned()),
        },
    )
    .await
    .expect("state at");
    assert_eq!(by_user.len(), 1);
    assert_eq!(by_user[0].state["stage"], "two");

    let report = recovery::verify(&ctx.store, &db.db).await.expect("verify");
    assert!(report.ok && report.lag.is_empty(), "{report:?}");
    // Lag is not divergence.
    ctx.store
        .update(&other.session_id, Changes::new().with_set("x", 1))
        .await
        .expect("update");
    let report = recovery::verify(&ctx.store, &db.db).await.expect("verify");
    assert!(report.ok, "{report:?}");
    assert_eq!(report.lag.len(), 1);
    assert_eq!(report.lag[0].session_id, other.session_id.as_str());
    drain(&ctx, &db).await;
    // A key changed behind the store's back is named.
    let key = ctx.session_key(&c.session_id);
    let raw: String = ctx.conn().get(&key).await.expect("get");
    let _: () = ctx
        .conn()
        .set_options(
            &key,
            raw.replace("two", "TWO"),
            redis::SetOptions::default().with_expiration(redis::SetExpiry::KEEPTTL),
        )
        .await
        .expect("tamper");
    let report = recovery::verify(&ctx.store, &db.db).await.expect("verify");
    assert!(!report.ok);
    assert_eq!(report.divergences.len(), 1, "{report:?}");
    assert_eq!(report.divergences[0].session_id, c.session_id.as_str());
    assert_eq!(report.divergences[0].kind, "different");
    // A live session missing from Redis is named too.
    let _: () = ctx
        .conn()
        .del(ctx.session_key(&other.session_id))
        .await
        .expect("del");
    let report = recovery::verify(&ctx.store, &db.db).await.expect("verify");
    assert!(
        report
            .divergences
            .iter()
            .any(|d| d.kind == "missing" && d.session_id == other.session_id.as_str()),
        "{report:?}"
    );
}

async fn loads_during_recovery_come_from_the_database(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let store = ctx.store.clone().with_audit(sink(&ctx, &db));
    let healer = Healer::new(store.clone(), db.db.clone(), Duration::from_millis(50));
    assert!(
        healer.check().await.expect("check").is_none(),
        "a fresh namespace is not a recovery"
    );
    assert!(
        healer.check().await.expect("check").is_none(),
        "same epoch in Redis and the database: nothing to do"
    );
    let c = store
        .create(NewSession::for_user(4, "four"))
        .await
        .expect("create");
    store
        .update(&c.session_id, Changes::new().with_set("kept", true))
        .await
        .expect("update");
    drain(&ctx, &db).await;
    let raw: String = ctx
        .conn()
        .get(ctx.session_key(&c.session_id))
        .await
        .expect("get");
    lose_redis_data(&ctx).await;
    // Before the worker notices: the epoch is gone, so the miss is served
    // from the snapshot and the session is put back.
    let fresh = ctx.other_store().await.with_audit(sink(&ctx, &db));
    let s = fresh
        .get(&c.session_id)
        .await
        .expect("get")
        .expect("still logged in");
    assert_eq!(s.to_json(), raw);
    let back: Option<String> = ctx
        .conn()
        .get(ctx.session_key(&c.session_id))
        .await
        .expect("get");
    assert_eq!(back.as_deref(), Some(raw.as_str()));
    // Unknown cookies stay misses, and outside recovery cost no database work.
    let random = vedfolnir_sessions::Token::generate().session_id();
    assert_eq!(fresh.get(&random).await.expect("get"), None);
    // The loss is healed by whichever process takes the healing lock first:
    // the worker's healer, or the app server that noticed it (here `fresh`,
    // on the miss above).
    if let Some(summary) = healer.check().await.expect("check") {
        assert_eq!(summary.already_current + summary.restored, 1);
    }
    ctx.eventually("the replay to finish", Duration::from_secs(10), || async {
        matches!(
            store.recovery_state(ctx.store.keys().part(0)).await,
            Ok(vedfolnir_sessions::store::RecoveryState::Normal { .. })
        )
    })
    .await;
    assert!(matches!(
        store
            .recovery_state(ctx.store.keys().part(0))
            .await
            .expect("state"),
        vedfolnir_sessions::store::RecoveryState::Normal { .. }
    ));
    // Without recovery, a miss is a miss even when a snapshot exists.
    let _: () = ctx
        .conn()
        .del(ctx.session_key(&c.session_id))
        .await
        .expect("del");
    let later = ctx.other_store().await.with_audit(sink(&ctx, &db));
    assert_eq!(later.get(&c.session_id).await.expect("get"), None);
}

async fn synchronous_mode_commits_before_returning(backend: Backend) {
    let ctx = TestContext::with(|mut c| {
        c.db_sync = true;
        c.max_per_user = 1;
        c
    })
    .await;
    let db = TestDb::new(backend).await;
    let store = ctx.store.clone().with_audit(sink(&ctx, &db));
    let a = store
        .create(NewSession::for_user(5, "five"))
        .await
        .expect("create");
    store
        .update(&a.session_id, Changes::new().with_set("k", 1))
        .await
        .expect("update");
    // The per-user limit evicts `a` inside the script: its event is synced too.
    let b = store
        .create(NewSession::for_user(5, "five"))
        .await
        .expect("create");
    assert_eq!(b.evicted, vec![a.session_id.clone()]);
    let r = store
        .rotate(&b.session_id, Changes::new().with_set("csrf_token", "t"))
        .await
        .expect("rotate");
    store
        .destroy_all_for_user("5", DestroyReason::LogoutAll)
        .await
        .expect("logout all");
    // No consumer ran: everything is in the database already.
    let stream = ctx.stream().await.len() as u64;
    use sea_orm::{EntityTrait as _, PaginatorTrait as _};
    let rows = vedfolnir_sessions::audit::entity::session_events::Entity::find()
        .count(&db.db)
        .await
        .expect("count");
    assert_eq!(
        rows, stream,
        "every event committed before its mutation returned"
    );
    for id in [&a.session_id, &b.session_id, &r.session_id] {
        let snap = sink(&ctx, &db)
            .snapshot(id.as_str())
            .await
            .expect("snapshot")
            .expect("exists");
        assert_eq!(
            snap.session.status(),
            vedfolnir_sessions::Status::Destroyed,
            "{id}"
        );
    }
    // The consumer then counts nothing twice.
    drain(&ctx, &db).await;
    let rows2 = vedfolnir_sessions::audit::entity::session_events::Entity::find()
        .count(&db.db)
        .await
        .expect("count");
    assert_eq!(rows2, rows);
}

// ---------------------------------------------------------------------------
// Every end in the log exactly once

/// The database sweep with no grace period: anything past its deadline.
fn sweeper(
    store: vedfolnir_sessions::SessionStore,
    db: sea_orm::DatabaseConnection,
) -> OverdueSweeper {
    OverdueSweeper::new(
        store,
        db,
        OverdueConfig {
            grace: Duration::ZERO,
            ..OverdueConfig::default()
        },
    )
}

async fn snapshot_row(db: &TestDb, id: &SessionId) -> session_snapshots::Model {
    use sea_orm::EntityTrait as _;
    session_snapshots::Entity::find_by_id(id.to_string())
        .one(&db.db)
        .await
        .expect("read the snapshot")
        .expect("a snapshot")
}

async fn audited_events(db: &TestDb, id: &SessionId) -> Vec<session_events::Model> {
    use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _, QueryOrder as _};
    session_events::Entity::find()
        .filter(session_events::Column::SessionId.eq(id.as_str()))
        .order_by_asc(session_events::Column::Seq)
        .all(&db.db)
        .await
        .expect("read the events")
}

async fn dead_letter_count(db: &TestDb) -> u64 {
    use sea_orm::{EntityTrait as _, PaginatorTrait as _};
    dead_letters::Entity::find()
        .count(&db.db)
        .await
        .expect("count")
}

/// Waits until the audit consumer's next drain can prove the database
/// current at the snapshot's deadline (a drain at least [`DRAIN_SLACK`]
/// after it).
async fn wait_past_deadline(ctx: &TestContext, snap: &session_snapshots::Model) {
    let deadline = snap.expires_at.expect("a live snapshot has a deadline");
    ctx.eventually(
        "the deadline to be DRAIN_SLACK behind",
        Duration::from_secs(20),
        || async move { chrono::Utc::now() > deadline + DRAIN_SLACK },
    )
    .await;
}

/// The end, once: one `expired` event at the next seq, and the snapshot
/// expired with it.
async fn assert_expired_once(db: &TestDb, id: &SessionId, seq: i64, source: EventSource) {
    let events = audited_events(db, id).await;
    let expired: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "expired")
        .collect();
    assert_eq!(expired.len(), 1, "exactly one expired event: {events:?}");
    assert_eq!(expired[0].seq, seq, "{events:?}");
    assert_eq!(expired[0].source, source, "{events:?}");
    assert_eq!(
        expired[0].stream_id.is_none(),
        source == EventSource::Fallback
    );
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seq).collect::<Vec<_>>(), "contiguous");
    let snap = snapshot_row(db, id).await;
    assert_eq!(snap.status, SnapshotStatus::Expired);
    assert_eq!(snap.seq, seq);
    assert_eq!(snap.expires_at, None);
    let state: serde_json::Value = serde_json::from_str(&snap.state).expect("JSON");
    assert_eq!(state["_version"], seq);
}

/// The reaper was down longer than `SESSION_TOMBSTONE_TTL`: when it comes
/// back the ledger is gone, the `expire` script answers `gone` and drops the
/// index entry, and nothing in Redis can write the end any more. The
/// database sweep writes it, once, even with two sweepers at the same time,
/// and only once the audit consumer has drained the stream past the
/// deadline.
async fn an_expiry_the_reaper_learns_late_is_written_once(backend: Backend) {
    let ctx = TestContext::with(|c| {
        let mut c = c.with_session_timeout(Duration::from_secs(1));
        c.tombstone_ttl = Duration::from_secs(1);
        c
    })
    .await;
    let db = TestDb::new(backend).await;
    let s = ctx
        .store
        .create(NewSession::for_user(6, "late"))
        .await
        .expect("create");
    drain(&ctx, &db).await;
    let ledger = ctx.store.keys().ledger(&s.session_id);
    ctx.eventually("the ledger to expire", Duration::from_secs(10), || {
        let (mut conn, ledger) = (ctx.conn(), ledger.clone());
        async move { !conn.exists::<_, bool>(&ledger).await.expect("exists") }
    })
    .await;
    // The reaper comes back: the script finds no ledger and writes nothing.
    let reaper = Reaper::new(ctx.store.clone(), ReaperConfig::default());
    assert_eq!(reaper.sweep().await.expect("sweep"), 0);
    assert!(
        ctx.events_of(&s.session_id)
            .await
            .iter()
            .all(|e| e["type"] != "expired")
    );
    let score = ctx.expiry_score(&s.session_id).await;
    assert_eq!(score, None, "the index entry is gone too");
    let snap = snapshot_row(&db, &s.session_id).await;
    assert_eq!(
        snap.status,
        SnapshotStatus::Live,
        "the end is not in the log yet"
    );
    // The database cannot yet be proven to hold everything the stream had at
    // the deadline: the sweep waits.
    let early = sweeper(ctx.store.clone(), db.db.clone())
        .sweep()
        .await
        .expect("sweep");
    assert_eq!(
        (early.examined, early.written_to_database, early.waiting),
        (1, 0, 1)
    );
    wait_past_deadline(&ctx, &snap).await;
    drain(&ctx, &db).await;
    // Two sweepers at once, each with its own Redis connection and pool.
    let other_db = vedfolnir_sessions::audit::db::connect(&db.url)
        .await
        .expect("connect");
    let a = sweeper(ctx.store.clone(), db.db.clone());
    let b = sweeper(ctx.other_store().await, other_db);
    let (x, y) = tokio::join!(a.sweep(), b.sweep());
    let (x, y) = (x.expect("sweep"), y.expect("sweep"));
    assert_eq!(
        x.written_to_database + y.written_to_database,
        1,
        "one of them wrote it: {x:?} {y:?}"
    );
    assert_eq!(x.expired_in_redis + y.expired_in_redis, 0);
    assert_expired_once(&db, &s.session_id, 2, EventSource::Fallback).await;
    let payload: serde_json::Value =
        serde_json::from_str(&audited_events(&db, &s.session_id).await[1].payload)
            .expect("payload");
    assert_eq!(
        payload["deadline"],
        vedfolnir_sessions::time::Timestamp::from_datetime(snap.expires_at.expect("deadline"))
            .to_string()
    );
    // Nothing is left to sweep, and nothing else arrives from the stream.
    let again = a.sweep().await.expect("sweep");
    assert_eq!(again.examined, 0, "{again:?}");
    drain(&ctx, &db).await;
    assert_expired_once(&db, &s.session_id, 2, EventSource::Fallback).await;
    assert_eq!(dead_letter_count(&db).await, 0);
    let report = recovery::verify(&ctx.store, &db.db).await.expect("verify");
    assert!(report.ok, "{report:?}");
}

/// The deadline passed just before Redis lost its data: replay skips the
/// session (it is over) and nothing in Redis remembers it. The database
/// sweep writes its end once the consumer has drained the new stream.
async fn a_deadline_that_passed_before_a_redis_loss_gets_its_end(backend: Backend) {
    let ctx = TestContext::with(|c| c.with_session_timeout(Duration::from_secs(1))).await;
    let db = TestDb::new(backend).await;
    let s = ctx
        .store
        .create(NewSession::for_user(7, "lost"))
        .await
        .expect("create");
    ctx.store
        .update(&s.session_id, Changes::new().with_set("k", 1))
        .await
        .expect("update");
    drain(&ctx, &db).await;
    let store = ctx.store.clone();
    let id = s.session_id.clone();
    ctx.eventually("the key to expire", Duration::from_secs(10), || {
        let (store, id) = (store.clone(), id.clone());
        async move { store.get(&id).await.expect("get").is_none() }
    })
    .await;
    // Redis loses everything before any reaper ran.
    lose_redis_data(&ctx).await;
    let summary = recovery::replay(&ctx.store, &db.db, |_, _| {})
        .await
        .expect("replay");
    assert_eq!((summary.restored, summary.expired_meanwhile), (0, 1));
    let snap = snapshot_row(&db, &s.session_id).await;
    assert_eq!(
        snap.status,
        SnapshotStatus::Live,
        "the end is not in the log yet"
    );
    wait_past_deadline(&ctx, &snap).await;
    // The consumer re-creates its group and drains the (new, empty) stream.
    drain(&ctx, &db).await;
    let swept = sweeper(ctx.store.clone(), db.db.clone())
        .sweep()
        .await
        .expect("sweep");
    assert_eq!(swept.written_to_database, 1, "{swept:?}");
    assert_expired_once(&db, &s.session_id, 3, EventSource::Fallback).await;
    // Replay leaves it ended, and the session stays gone.
    let summary = recovery::replay(&ctx.store, &db.db, |_, _| {})
        .await
        .expect("replay");
    assert_eq!(summary.restored, 0);
    assert_eq!(ctx.store.get(&s.session_id).await.expect("get"), None);
    let report = recovery::verify(&ctx.store, &db.db).await.expect("verify");
    assert!(report.ok, "{report:?}");
}

/// A session past its deadline whose ledger is still live but which fell
/// out of the expiry index: the reaper never sees it. The sweep puts it back
/// and the `expired` event goes through Redis, the one script path.
async fn an_overdue_session_out_of_the_expiry_index_expires_through_redis(backend: Backend) {
    let ctx = TestContext::with(|c| c.with_session_timeout(Duration::from_secs(1))).await;
    let db = TestDb::new(backend).await;
    let s = ctx
        .store
        .create(NewSession::for_user(8, "lost"))
        .await
        .expect("create");
    drain(&ctx, &db).await;
    ctx.unindex(&ctx.expiry_key(&s.session_id), &s.session_id)
        .await;
    let store = ctx.store.clone();
    let id = s.session_id.clone();
    ctx.eventually("the key to expire", Duration::from_secs(10), || {
        let (store, id) = (store.clone(), id.clone());
        async move { store.get(&id).await.expect("get").is_none() }
    })
    .await;
    let reaper = Reaper::new(ctx.store.clone(), ReaperConfig::default());
    assert_eq!(
        reaper.sweep().await.expect("sweep"),
        0,
        "the reaper cannot see it"
    );
    let swept = sweeper(ctx.store.clone(), db.db.clone())
        .sweep()
        .await
        .expect("sweep");
    assert_eq!(swept.expired_in_redis, 1, "{swept:?}");
    let expired: Vec<_> = ctx
        .events_of(&s.session_id)
        .await
        .into_iter()
        .filter(|e| e["type"] == "expired")
        .collect();
    assert_eq!(expired.len(), 1);
    drain(&ctx, &db).await;
    assert_expired_once(&db, &s.session_id, 2, EventSource::Stream).await;
    assert_eq!(
        sweeper(ctx.store.clone(), db.db.clone())
            .sweep()
            .await
            .expect("sweep")
            .examined,
        0
    );
}

vedfolnir_tests::on_both_backends!(
    replay_restores_identical_sessions,
    point_in_time_and_verify,
    loads_during_recovery_come_from_the_database,
    synchronous_mode_commits_before_returning,
    an_expiry_the_reaper_learns_late_is_written_once,
    a_deadline_that_passed_before_a_redis_loss_gets_its_end,
    an_overdue_session_out_of_the_expiry_index_expires_through_redis,
);
