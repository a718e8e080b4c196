//! The audit pipeline against the real Redis and both real databases:
//! exactly-once delivery, snapshots, dead letters, trimming, expiry events,
//! and a database outage behind a TCP proxy.

use std::time::Duration;

use redis::AsyncCommands as _;
use sea_orm::{
    ColumnTrait as _, EntityTrait as _, PaginatorTrait as _, QueryFilter as _, QueryOrder as _,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use vedfolnir_sessions::audit::entity::{dead_letters, session_events, session_snapshots};
use vedfolnir_sessions::audit::{AuditConsumer, AuditSink, ConsumerConfig};
use vedfolnir_sessions::reaper::{Reaper, ReaperConfig};
use vedfolnir_sessions::{Changes, DestroyReason, NewSession, Platform, SessionId};
use vedfolnir_tests::TestContext;
use vedfolnir_tests::db::{Backend, TestDb};

/// Keeps acknowledged entries (so tests can compare with the stream); the
/// trimming test sets the retention to zero.
fn consumer_config() -> ConsumerConfig {
    ConsumerConfig {
        block: Duration::from_millis(50),
        claim_idle: Duration::from_secs(60),
        retention: Duration::from_secs(600),
        batch: 200,
        retry_max: Duration::from_millis(200),
        ..ConsumerConfig::default()
    }
}

async fn consumer(ctx: &TestContext, db: &TestDb, cfg: ConsumerConfig) -> AuditConsumer {
    let sink = AuditSink::new(
        db.db.clone(),
        ctx.config.session_timeout,
        ctx.config.event_stream.clone(),
    );
    let mut c = AuditConsumer::new(&ctx.config, sink, cfg)
        .await
        .expect("consumer");
    c.ensure_group().await.expect("group");
    c
}

/// Steps the consumer until a read finds nothing new.
async fn drain(c: &mut AuditConsumer) {
    let token = CancellationToken::new();
    for _ in 0..1000 {
        if c.step(&token).await.expect("step") == 0 {
            return;
        }
    }
    panic!("the consumer never caught up");
}

async fn event_count(db: &TestDb) -> u64 {
    session_events::Entity::find()
        .count(&db.db)
        .await
        .expect("count")
}

async fn seqs_of(db: &TestDb, id: &SessionId) -> Vec<i64> {
    session_events::Entity::find()
        .filter(session_events::Column::SessionId.eq(id.as_str()))
        .order_by_asc(session_events::Column::Seq)
        .all(&db.db)
        .await
        .expect("events")
        .into_iter()
        .map(|r| r.seq)
        .collect()
}

async fn snapshot(db: &TestDb, id: &SessionId) -> Option<session_snapshots::Model> {
    session_snapshots::Entity::find_by_id(id.as_str().to_owned())
        .one(&db.db)
        .await
        .expect("snapshot")
}

async fn pending(ctx: &TestContext) -> usize {
    let p: redis::streams::StreamPendingReply = ctx
        .conn()
        .xpending(&ctx.config.event_stream, "audit")
        .await
        .expect("xpending");
    p.count()
}

async fn every_event_exactly_once(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let mut c = consumer(&ctx, &db, consumer_config()).await;
    let mut ids = Vec::new();
    for n in 0..12 {
        let s = ctx
            .store
            .create(NewSession::for_user(n % 4, format!("u{n}")))
            .await
            .expect("create");
        ids.push(s.session_id);
    }
    for (k, id) in ids.iter().enumerate() {
        for m in 0..8 {
            ctx.store
                .update(
                    id,
                    Changes::new().with_set(format!("k{m}"), json!({"n": m, "s": "é"})),
                )
                .await
                .expect("update");
        }
        if k % 3 == 0 {
            ctx.store
                .switch_platform(
                    id,
                    Platform {
                        platform_connection_id: 7,
                        platform_name: "P".to_owned(),
                        platform_type: "mastodon".to_owned(),
                        platform_instance_url: "https://m.example".to_owned(),
                    },
                )
                .await
                .expect("switch");
        }
        if k % 4 == 1 {
            ctx.store
                .destroy(id, DestroyReason::Logout)
                .await
                .expect("destroy");
        }
        if k == 2 {
            // Drain half way, so later events fold onto stored snapshots.
            drain(&mut c).await;
        }
    }
    drain(&mut c).await;
    let stream_events = ctx.stream().await.len() as u64;
    assert_eq!(event_count(&db).await, stream_events);
    for (k, id) in ids.iter().enumerate() {
        let seqs = seqs_of(&db, id).await;
        let n = seqs.len() as i64;
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "seq contiguous for {id}");
        let snap = snapshot(&db, id).await.expect("snapshot");
        assert_eq!(snap.seq, n);
        match ctx.store.get(id).await.expect("get") {
            Some(live) => {
                assert_eq!(snap.state, live.to_json(), "snapshot equals Redis for {id}");
                let raw: String = ctx.conn().get(ctx.session_key(id)).await.expect("raw");
                assert_eq!(snap.state, raw);
                assert_eq!(snap.status, session_snapshots::SnapshotStatus::Live);
                let pttl: i64 = ctx.conn().pttl(ctx.session_key(id)).await.expect("pttl");
                let expires = snap.expires_at.expect("deadline").timestamp_millis();
                let redis_deadline = chrono::Utc::now().timestamp_millis() + pttl;
                assert!(
                    (expires - redis_deadline).abs() < 1000,
                    "deadline off by {}",
                    expires - redis_deadline
                );
            }
            None => {
                assert_eq!(k % 4, 1);
                assert_eq!(snap.status, session_snapshots::SnapshotStatus::Destroyed);
            }
        }
    }
    // Redelivery of the whole stream (a second group from the start) adds nothing.
    let mut again = consumer_config();
    again.group = "audit-replay".to_owned();
    let mut c2 = consumer(&ctx, &db, again).await;
    drain(&mut c2).await;
    assert_eq!(event_count(&db).await, stream_events);
    assert_eq!(c2.totals().inserted, 0);
    assert_eq!(c2.totals().duplicates, stream_events);
    assert_eq!(pending(&ctx).await, 0, "everything acked");
}

async fn malformed_entries_become_dead_letters(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let mut c = consumer(&ctx, &db, consumer_config()).await;
    let a = ctx
        .store
        .create(NewSession::for_user(1, "admin"))
        .await
        .expect("create");
    let _: String = ctx
        .conn()
        .xadd(
            &ctx.config.event_stream,
            "*",
            &[("event_id", "not-a-uuid"), ("type", "created")],
        )
        .await
        .expect("raw xadd");
    let _: String = redis::cmd("XADD")
        .arg(&ctx.config.event_stream)
        .arg("*")
        .arg("payload")
        .arg(&b"\xff\xfe"[..])
        .query_async(&mut ctx.conn())
        .await
        .expect("raw xadd");
    ctx.store
        .update(&a.session_id, Changes::new().with_set("after", 1))
        .await
        .expect("update");
    drain(&mut c).await;
    let dead = dead_letters::Entity::find()
        .all(&db.db)
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(
        dead.iter().any(|d| d.reason.contains("event_id")),
        "{dead:?}"
    );
    assert!(dead.iter().any(|d| d.reason.contains("UTF-8")), "{dead:?}");
    assert_eq!(
        seqs_of(&db, &a.session_id).await,
        vec![1, 2],
        "events after it landed"
    );
    assert_eq!(pending(&ctx).await, 0);
    // A redelivered dead letter is not recorded twice.
    let mut again = consumer_config();
    again.group = "audit-replay".to_owned();
    drain(&mut consumer(&ctx, &db, again).await).await;
    assert_eq!(
        dead_letters::Entity::find()
            .count(&db.db)
            .await
            .expect("count"),
        2
    );
}

async fn two_consumers_share_the_work(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let token = CancellationToken::new();
    let mut cfg = consumer_config();
    cfg.batch = 7;
    let a = consumer(&ctx, &db, cfg.clone()).await;
    cfg.consumer = format!("{}-b", cfg.consumer);
    let b = consumer(&ctx, &db, cfg).await;
    let ta = tokio::spawn(a.run(token.clone()));
    let tb = tokio::spawn(b.run(token.clone()));
    let mut writers = Vec::new();
    for w in 0..4 {
        let store = ctx.store.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..10 {
                let s = store
                    .create(NewSession::for_user(w, "w"))
                    .await
                    .expect("create");
                store
                    .update(&s.session_id, Changes::new().with_set("n", n))
                    .await
                    .expect("update");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let total = ctx.stream().await.len() as u64;
    let db2 = db.db.clone();
    ctx.eventually("all events audited", Duration::from_secs(30), || {
        let db2 = db2.clone();
        async move {
            session_events::Entity::find()
                .count(&db2)
                .await
                .unwrap_or(0)
                == total
        }
    })
    .await;
    token.cancel();
    let ra = ta.await.expect("join").expect("consumer a");
    let rb = tb.await.expect("join").expect("consumer b");
    assert_eq!(ra.inserted + rb.inserted, total, "each event inserted once");
    assert_eq!(ra.duplicates + rb.duplicates, 0);
    assert!(
        ra.acked > 0 && rb.acked > 0,
        "both consumers worked: {ra:?} {rb:?}"
    );
    assert_eq!(pending(&ctx).await, 0);
}

async fn the_stream_stays_bounded(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let token = CancellationToken::new();
    let cfg = ConsumerConfig {
        retention: Duration::ZERO,
        ..consumer_config()
    };
    let c = consumer(&ctx, &db, cfg).await;
    let task = tokio::spawn(c.run(token.clone()));
    let s = ctx
        .store
        .create(NewSession::for_user(1, "admin"))
        .await
        .expect("create");
    let mut max_len = 0;
    for n in 0..1500 {
        ctx.store
            .update(&s.session_id, Changes::new().with_set("n", n))
            .await
            .expect("update");
        if n % 100 == 99 {
            max_len = max_len.max(ctx.stream_len().await);
        }
    }
    let db2 = db.db.clone();
    ctx.eventually("all events audited", Duration::from_secs(60), || {
        let db2 = db2.clone();
        async move {
            session_events::Entity::find()
                .count(&db2)
                .await
                .unwrap_or(0)
                == 1501
        }
    })
    .await;
    // One more batch after the last one trims what it acknowledged.
    ctx.store
        .update(&s.session_id, Changes::new().with_set("last", true))
        .await
        .expect("update");
    let db2 = db.db.clone();
    ctx.eventually("the last event audited", Duration::from_secs(30), || {
        let db2 = db2.clone();
        async move {
            session_events::Entity::find()
                .count(&db2)
                .await
                .unwrap_or(0)
                == 1502
        }
    })
    .await;
    token.cancel();
    task.await.expect("join").expect("consumer");
    let final_len = ctx.stream_len().await;
    assert!(
        max_len < 1000,
        "the stream grew to {max_len} while the worker kept up"
    );
    assert!(final_len < 300, "{final_len} entries left after trimming");
    let snap = snapshot(&db, &s.session_id).await.expect("snapshot");
    assert_eq!(snap.seq, 1502);
}

async fn idle_sessions_expire_exactly_once(backend: Backend) {
    let ctx = TestContext::with(|c| c.with_session_timeout(Duration::from_secs(1))).await;
    let db = TestDb::new(backend).await;
    let s = ctx
        .store
        .create(NewSession::for_user(3, "idle"))
        .await
        .expect("create");
    let kept = ctx
        .store
        .create(NewSession::for_user(3, "kept"))
        .await
        .expect("create");
    // Touched after its deadline was read: the reaper must leave it alone.
    let old_score: f64 = ctx.expiry_score(&kept.session_id).await.expect("score");
    let store = ctx.store.clone();
    let id = s.session_id.clone();
    ctx.eventually("the key to expire", Duration::from_secs(5), || {
        let store = store.clone();
        let id = id.clone();
        async move { store.get(&id).await.expect("get").is_none() }
    })
    .await;
    // Two reapers at once.
    let r1 = Reaper::new(ctx.store.clone(), ReaperConfig::default());
    let r2 = Reaper::new(ctx.other_store().await, ReaperConfig::default());
    let (a, b) = tokio::join!(r1.sweep(), r2.sweep());
    let (a, b) = (a.expect("sweep"), b.expect("sweep"));
    assert!(a + b >= 1, "someone expired it");
    let (c, d) = tokio::join!(r1.sweep(), r2.sweep());
    assert_eq!(
        c.expect("sweep") + d.expect("sweep"),
        0,
        "nothing left to expire"
    );
    let events = ctx.events_of(&s.session_id).await;
    let expired: Vec<_> = events.iter().filter(|e| e["type"] == "expired").collect();
    assert_eq!(expired.len(), 1, "exactly one expired event: {events:?}");
    assert_eq!(expired[0]["seq"], "2");
    assert!(
        !ctx.store
            .expire(&kept.session_id, old_score - 5_000.0)
            .await
            .expect("expire")
    );
    // The audit trail records it.
    let mut c = consumer(&ctx, &db, consumer_config()).await;
    drain(&mut c).await;
    let snap = snapshot(&db, &s.session_id).await.expect("snapshot");
    assert_eq!(snap.status, session_snapshots::SnapshotStatus::Expired);
    assert_eq!(snap.expires_at, None);
    assert!(
        ctx.store
            .user_sessions("3")
            .await
            .expect("list")
            .iter()
            .all(|(id, _)| *id != s.session_id)
    );
}

/// Batches far larger than one PostgreSQL request (16 KiB) are split by
/// bytes, and a single event larger than that goes alone; every event still
/// lands once, a redelivered batch adds nothing, and an event that claims a
/// taken `(session_id, seq)` inside such a batch becomes a dead letter.
async fn large_batches_land_exactly_once(backend: Backend) {
    large_batches(backend, None).await;
}

/// The same over a PostgreSQL connection that may negotiate TLS: statements
/// stay under one TLS record (16 KiB), so a batch takes many of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_land_exactly_once_over_tls() {
    large_batches(Backend::Postgres, Some("sslmode=prefer")).await;
}

/// Large batches, one event over 16 KiB, a full redelivery with one seq
/// conflict; `query` is added to the database URL.
async fn large_batches(backend: Backend, query: Option<&str>) {
    let ctx = TestContext::new().await;
    let mut db = TestDb::new(backend).await;
    if let Some(q) = query {
        db.db = vedfolnir_sessions::audit::db::connect(&format!("{}?{q}", db.url))
            .await
            .expect("connect");
    }
    let sink = AuditSink::new(
        db.db.clone(),
        ctx.config.session_timeout,
        ctx.config.event_stream.clone(),
    );
    let bound = sink.statement_bytes();
    match (backend, query) {
        // The test server is on loopback: no TLS unless the URL asks.
        (Backend::Postgres, None) => assert!(bound > 1024 * 1024, "{bound}"),
        (Backend::Postgres, Some(_)) => assert_eq!(bound, 16 * 1024),
        (Backend::Sqlite, _) => {}
    }
    let mut c = consumer(&ctx, &db, consumer_config()).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        let s = ctx
            .store
            .create(NewSession::for_user(n, format!("u{n}")))
            .await
            .expect("create");
        for m in 0..5 {
            // 1.5 KiB per change: 100 events of 200 KiB, snapshots up to 8 KiB.
            let value = format!("{n}-{m}-{}", "x".repeat(1500));
            ctx.store
                .update(
                    &s.session_id,
                    Changes::new().with_set(format!("k{m}"), value),
                )
                .await
                .expect("update");
        }
        ids.push(s.session_id);
    }
    // One event alone over the bound.
    ctx.store
        .update(&ids[0], Changes::new().with_set("big", "y".repeat(40_000)))
        .await
        .expect("big update");
    drain(&mut c).await;
    let stream_events = ctx.stream().await.len() as u64;
    assert_eq!(stream_events, 20 * 6 + 1);
    assert_eq!(event_count(&db).await, stream_events);
    assert_eq!(c.totals().inserted, stream_events);
    for id in &ids {
        let seqs = seqs_of(&db, id).await;
        let n = seqs.len() as i64;
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "seq contiguous for {id}");
        let snap = snapshot(&db, id).await.expect("snapshot");
        assert_eq!(snap.seq, n);
        let live = ctx.store.get(id).await.expect("get").expect("live");
        assert_eq!(snap.state, live.to_json(), "snapshot equals Redis for {id}");
    }
    // The whole history again, with one impostor for a taken place.
    let rows = session_events::Entity::find()
        .order_by_asc(session_events::Column::Id)
        .all(&db.db)
        .await
        .expect("rows");
    let mut batch: Vec<_> = rows
        .iter()
        .map(|r| vedfolnir_sessions::audit::sink::incoming_from_row(r).expect("row"))
        .collect();
    let mut impostor = batch[3].clone();
    impostor.event.event_id = uuid::Uuid::now_v7();
    impostor.stream_id = Some("1-1".to_owned());
    batch.insert(50, impostor);
    let out = sink.write(&batch, &[]).await.expect("redelivery");
    assert_eq!(out.inserted, 0);
    assert_eq!(out.duplicates, stream_events);
    assert_eq!(out.seq_conflicts, 1);
    assert_eq!(out.dead_letters, 1);
    assert_eq!(out.snapshots, 0, "snapshots only move forward");
    assert_eq!(event_count(&db).await, stream_events);
    let dead = dead_letters::Entity::find()
        .all(&db.db)
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.contains("already held"),
        "{}",
        dead[0].reason
    );
}

/// The consumer tells the database how current it is: `drained_at` once it
/// committed everything the stream had, and, when Redis goes away, since
/// when, so an app server can tell whether the database may serve in its
/// place.
async fn the_consumer_records_how_current_the_database_is(backend: Backend) {
    use vedfolnir_sessions::audit::partition;
    let mut server = vedfolnir_tests::redis_server::RedisServer::start().await;
    let db = TestDb::new(backend).await;
    let config = vedfolnir_sessions::Config::default()
        .with_redis(
            vedfolnir_sessions::config::RedisTarget::parse("REDIS_URL", &server.url())
                .expect("url"),
        )
        .with_namespace("vwatermark:");
    let store = vedfolnir_sessions::SessionStore::connect(&config)
        .await
        .expect("store");
    let sink = AuditSink::new(
        db.db.clone(),
        config.session_timeout,
        config.event_stream.clone(),
    );
    let cfg = ConsumerConfig {
        retry_max: Duration::from_millis(50),
        ..consumer_config()
    };
    let mut c = AuditConsumer::new(&config, sink, cfg)
        .await
        .expect("consumer");
    c.ensure_group().await.expect("group");
    assert!(
        partition::load(&db.db, &config.event_stream)
            .await
            .expect("load")
            .is_none(),
        "nothing is recorded before the consumer has drained"
    );
    for n in 0..5 {
        store
            .create(NewSession::for_user(n, "u"))
            .await
            .expect("create");
    }
    let before = chrono::Utc::now();
    drain(&mut c).await;
    let state = partition::load(&db.db, &config.event_stream)
        .await
        .expect("load")
        .expect("a row once drained");
    let drained = state.drained_at.expect("drained_at");
    assert!(
        drained >= before,
        "drained_at {drained} predates the last read {before}"
    );
    assert_eq!(state.redis_down_since, None);
    assert!(state.current_when_redis_left(chrono::Utc::now()));

    // Redis goes away under the running consumer.
    let token = CancellationToken::new();
    let running = tokio::spawn(c.run(token.clone()));
    let cut = chrono::Utc::now();
    server.shutdown_nosave().await;
    let mut down = None;
    for _ in 0..500 {
        let s = partition::load(&db.db, &config.event_stream)
            .await
            .expect("load")
            .expect("row");
        if s.redis_down_since.is_some() {
            down = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let down = down.expect("the consumer records that redis is unreachable");
    let since = down.redis_down_since.expect("since");
    assert!(
        since >= cut,
        "redis_down_since {since} predates the cut {cut}"
    );
    assert_eq!(down.drained_at, Some(drained), "no drain without redis");
    // Drained just before Redis left: the database may serve in its place.
    assert!(down.current_when_redis_left(chrono::Utc::now() + chrono::Duration::hours(1)));
    token.cancel();
    running.await.expect("join").expect("consumer");
}

vedfolnir_tests::on_both_backends!(
    the_consumer_records_how_current_the_database_is,
    every_event_exactly_once,
    malformed_entries_become_dead_letters,
    two_consumers_share_the_work,
    the_stream_stays_bounded,
    idle_sessions_expire_exactly_once,
    large_batches_land_exactly_once,
    a_huge_user_id_does_not_stop_auditing,
    nul_characters_in_refused_entries_are_stored,
    server_state_errors_dead_letter_nothing,
    a_seq_above_the_i64_range_is_a_dead_letter,
    duplicate_event_ids_with_other_content_are_dead_letters,
    a_corrupt_snapshot_is_rebuilt_from_the_events,
    entries_delivered_too_often_are_written_alone,
    dead_consumers_are_removed_from_the_group,
    dead_letters_are_retried_after_the_cause_is_fixed,
    a_stale_fence_commits_nothing,
    batches_are_bounded_in_bytes,
    text_the_database_cannot_store_is_a_dead_letter,
);

/// A database that is up but refuses for its own state (here: a lock it
/// cannot get within `lock_timeout`) is retried; no valid event becomes a
/// dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lock_timeouts_are_retried_not_dead_lettered() {
    use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
    let ctx = TestContext::new().await;
    let db = TestDb::new(Backend::Postgres).await;
    // The consumer's own connection gives up on locks after 100 ms.
    let impatient = vedfolnir_sessions::audit::db::connect(&format!(
        "{}?options=-c%20lock_timeout%3D100ms",
        db.url
    ))
    .await
    .expect("connect");
    let sink = AuditSink::new(
        impatient,
        ctx.config.session_timeout,
        ctx.config.event_stream.clone(),
    );
    let mut c = AuditConsumer::new(&ctx.config, sink, consumer_config())
        .await
        .expect("consumer");
    c.ensure_group().await.expect("group");
    let s = ctx
        .store
        .create(NewSession::for_user(1, "admin"))
        .await
        .expect("create");
    for n in 0..4 {
        ctx.store
            .update(&s.session_id, Changes::new().with_set("n", n))
            .await
            .expect("update");
    }
    let holder = db.db.begin().await.expect("begin");
    holder
        .execute_unprepared("LOCK TABLE session_events IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let token = CancellationToken::new();
    let task = tokio::spawn(c.run(token.clone()));
    // Long enough for several refused attempts (100 ms each plus backoff).
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        pending(&ctx).await,
        5,
        "nothing acknowledged while locked out"
    );
    holder.rollback().await.expect("unlock");
    let db2 = db.db.clone();
    ctx.eventually("the events to land", Duration::from_secs(20), || {
        let db2 = db2.clone();
        async move {
            session_events::Entity::find()
                .count(&db2)
                .await
                .unwrap_or(0)
                == 5
        }
    })
    .await;
    token.cancel();
    task.await.expect("join").expect("consumer");
    assert_eq!(
        dead_letters::Entity::find()
            .count(&db.db)
            .await
            .expect("count"),
        0
    );
    assert_eq!(seqs_of(&db, &s.session_id).await, vec![1, 2, 3, 4, 5]);
}

// ---------------------------------------------------------------------------
// An audit trail that never stalls and never lies.

/// Drains like [`drain`], but fails the test instead of hanging when the
/// consumer never catches up (a batch retried forever).
async fn drain_within(c: &mut AuditConsumer, limit: Duration) {
    tokio::time::timeout(limit, drain(c))
        .await
        .expect("the consumer caught up in time (a batch was retried forever)");
}

/// A session id nobody else uses.
fn fresh_session_id() -> SessionId {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
    .parse()
    .expect("64 hex")
}

/// A valid event of `session` at `seq`.
fn raw_event(
    session: &SessionId,
    seq: u64,
    kind: vedfolnir_sessions::EventKind,
    user: Option<&str>,
) -> vedfolnir_sessions::Event {
    vedfolnir_sessions::Event {
        event_id: uuid::Uuid::now_v7(),
        session_id: session.clone(),
        seq,
        occurred_at: vedfolnir_sessions::time::Timestamp::now(),
        user_id: user.map(str::to_owned),
        schema: vedfolnir_sessions::event::SCHEMA_VERSION,
        kind,
        traceparent: None,
    }
}

fn created_kind(user: &str) -> vedfolnir_sessions::EventKind {
    let mut fields = serde_json::Map::new();
    fields.insert("user_id".to_owned(), json!(user));
    fields.insert("username".to_owned(), json!("raw"));
    vedfolnir_sessions::EventKind::Created {
        fields,
        imported: None,
        rotated_from: None,
    }
}

fn set_kind(key: &str, value: serde_json::Value) -> vedfolnir_sessions::EventKind {
    let mut set = serde_json::Map::new();
    set.insert(key.to_owned(), value);
    vedfolnir_sessions::EventKind::Updated { set, unset: vec![] }
}

fn fields_of(e: &vedfolnir_sessions::Event) -> Vec<(String, String)> {
    e.to_fields()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// Appends raw fields to the test's stream, as a writer of another version
/// (or a hostile one) might; returns the entry id.
async fn xadd_fields(ctx: &TestContext, fields: &[(String, String)]) -> String {
    ctx.conn()
        .xadd(&ctx.config.event_stream, "*", fields)
        .await
        .expect("xadd")
}

async fn xadd_event(ctx: &TestContext, e: &vedfolnir_sessions::Event) -> String {
    xadd_fields(ctx, &fields_of(e)).await
}

async fn all_dead_letters(db: &TestDb) -> Vec<dead_letters::Model> {
    dead_letters::Entity::find()
        .order_by_asc(dead_letters::Column::Id)
        .all(&db.db)
        .await
        .expect("dead letters")
}

/// The session folded from every event the table holds for it, in `seq`
/// order, stopping at the first gap.
async fn fold_of_table(db: &TestDb, id: &SessionId) -> vedfolnir_sessions::Record {
    let rows = session_events::Entity::find()
        .filter(session_events::Column::SessionId.eq(id.as_str()))
        .order_by_asc(session_events::Column::Seq)
        .all(&db.db)
        .await
        .expect("events");
    let mut s = vedfolnir_sessions::Record::default();
    for r in rows {
        let i = vedfolnir_sessions::audit::sink::incoming_from_row(&r).expect("row");
        if i.event.seq != s.version() + 1 {
            break;
        }
        s = s.apply(&i.event);
    }
    s
}

/// A user id of about 3 KB that PostgreSQL cannot compress below its btree
/// limit (2704 bytes per index row): random hex.
fn huge_user_id() -> String {
    (0..100)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect::<String>()
}

/// PostgreSQL refuses an index row over 2704 bytes (SQLSTATE 54000): the
/// entry that carries it becomes a dead letter, every other entry lands, and
/// nothing stays pending. SQLite has no such limit: the event lands.
async fn a_huge_user_id_does_not_stop_auditing(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let mut c = consumer(&ctx, &db, consumer_config()).await;
    let huge = huge_user_id();
    let poisoned = fresh_session_id();
    let before = ctx
        .store
        .create(NewSession::for_user(1, "before"))
        .await
        .expect("create");
    let e = raw_event(&poisoned, 1, created_kind(&huge), Some(&huge));
    xadd_event(&ctx, &e).await;
    let after = ctx
        .store
        .create(NewSession::for_user(2, "after"))
        .await
        .expect("create");
    drain_within(&mut c, Duration::from_secs(30)).await;
    assert_eq!(seqs_of(&db, &before.session_id).await, vec![1]);
    assert_eq!(seqs_of(&db, &after.session_id).await, vec![1]);
    assert_eq!(pending(&ctx).await, 0, "everything acknowledged");
    let dead = all_dead_letters(&db).await;
    match backend {
        Backend::Postgres => {
            assert_eq!(dead.len(), 1, "{dead:?}");
            assert!(dead[0].reason.contains("54000"), "{}", dead[0].reason);
            assert!(dead[0].fields.contains(&e.event_id.to_string()));
            assert!(seqs_of(&db, &poisoned).await.is_empty());
        }
        Backend::Sqlite => {
            assert!(dead.is_empty(), "{dead:?}");
            assert_eq!(seqs_of(&db, &poisoned).await, vec![1]);
        }
    }
}

/// Entries whose refusal reason carries a NUL character (an `event_id` with
/// a NUL; a `destroyed` reason `log\u0000out`) are stored as dead letters on
/// both backends, also when they are found among the consumer's own pending
/// entries after a restart; the entries after them land.
async fn nul_characters_in_refused_entries_are_stored(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let cfg = consumer_config();
    let name = cfg.consumer.clone();
    let mut c = consumer(&ctx, &db, cfg).await;
    let sid = fresh_session_id();
    let mut nul_id = fields_of(&raw_event(&sid, 1, created_kind("1"), Some("1")));
    for (k, v) in &mut nul_id {
        if k == "event_id" {
            v.replace_range(1..2, "\0");
        }
    }
    let nul_id_entry = xadd_fields(&ctx, &nul_id).await;
    let mut nul_reason = fields_of(&raw_event(
        &sid,
        2,
        vedfolnir_sessions::EventKind::Destroyed {
            reason: DestroyReason::Logout,
        },
        Some("1"),
    ));
    for (k, v) in &mut nul_reason {
        if k == "payload" {
            *v = r#"{"reason":"log\u0000out"}"#.to_owned();
        }
    }
    let nul_reason_entry = xadd_fields(&ctx, &nul_reason).await;
    // A worker of the same name read them and died before committing: they
    // are its own pending entries when it starts again.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("audit")
        .arg(&name)
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(&ctx.config.event_stream)
        .arg(">")
        .query_async(&mut ctx.conn())
        .await
        .expect("xreadgroup");
    assert_eq!(pending(&ctx).await, 2);
    let later = ctx
        .store
        .create(NewSession::for_user(3, "later"))
        .await
        .expect("create");
    drain_within(&mut c, Duration::from_secs(30)).await;
    assert_eq!(
        seqs_of(&db, &later.session_id).await,
        vec![1],
        "new entries are read"
    );
    assert_eq!(pending(&ctx).await, 0, "nothing left pending");
    let dead = all_dead_letters(&db).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    let by_entry = |id: &str| {
        dead.iter()
            .find(|d| d.stream_id == id)
            .unwrap_or_else(|| panic!("no dead letter for {id}: {dead:?}"))
    };
    let a = by_entry(&nul_id_entry);
    assert!(a.reason.contains("event_id"), "{}", a.reason);
    let b = by_entry(&nul_reason_entry);
    assert!(b.reason.contains("payload"), "{}", b.reason);
    for d in &dead {
        assert!(
            !d.reason.contains('\0') && !d.fields.contains('\0'),
            "{d:?}"
        );
        // The raw fields are kept, NUL included (escaped in the JSON text).
        let fields: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&d.fields).expect("fields are a JSON object");
        assert!(
            fields
                .values()
                .any(|v| v.as_str().is_some_and(|s| s.contains('\0'))
                    || v.as_str().is_some_and(|s| s.contains("\\u0000"))),
            "{fields:?}"
        );
    }
}

/// A missing table is the server's state, not the entries': nothing becomes
/// a dead letter, nothing is acknowledged, and everything lands once the
/// table is back.
async fn server_state_errors_dead_letter_nothing(backend: Backend) {
    use sea_orm::ConnectionTrait as _;
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let s = ctx
            .store
            .create(NewSession::for_user(n, "u"))
            .await
            .expect("create");
        ids.push(s.session_id);
    }
    db.db
        .execute_unprepared("ALTER TABLE session_events RENAME TO session_events_away")
        .await
        .expect("rename");
    let c = consumer(&ctx, &db, consumer_config()).await;
    let token = CancellationToken::new();
    let task = tokio::spawn(c.run(token.clone()));
    ctx.eventually(
        "the entries to be delivered",
        Duration::from_secs(10),
        || async { pending(&ctx).await == 3 },
    )
    .await;
    // Several attempts (retry_max is 200 ms) while the table is missing.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(pending(&ctx).await, 3, "nothing acknowledged");
    assert!(all_dead_letters(&db).await.is_empty(), "no dead letter");
    db.db
        .execute_unprepared("ALTER TABLE session_events_away RENAME TO session_events")
        .await
        .expect("rename back");
    let db2 = db.db.clone();
    ctx.eventually("the events to land", Duration::from_secs(20), || {
        let db2 = db2.clone();
        async move {
            session_events::Entity::find()
                .count(&db2)
                .await
                .unwrap_or(0)
                == 3
        }
    })
    .await;
    token.cancel();
    task.await.expect("join").expect("consumer");
    assert!(all_dead_letters(&db).await.is_empty());
    for id in &ids {
        assert_eq!(seqs_of(&db, id).await, vec![1]);
    }
}

/// A `seq` above the i64 range cannot be stored: it is refused when
/// decoding, with a reason that says so, and never reaches the table.
async fn a_seq_above_the_i64_range_is_a_dead_letter(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let mut c = consumer(&ctx, &db, consumer_config()).await;
    let sid = fresh_session_id();
    let mut fields = fields_of(&raw_event(&sid, 1, created_kind("1"), Some("1")));
    for (k, v) in &mut fields {
        if k == "seq" {
            *v = (i64::MAX as u64 + 1).to_string();
        }
    }
    xadd_fields(&ctx, &fields).await;
    drain_within(&mut c, Duration::from_secs(30)).await;
    assert!(seqs_of(&db, &sid).await.is_empty(), "nothing stored");
    let negative = session_events::Entity::find()
        .filter(session_events::Column::Seq.lt(1))
        .count(&db.db)
        .await
        .expect("count");
    assert_eq!(negative, 0);
    let dead = all_dead_letters(&db).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.contains("seq"), "{}", dead[0].reason);
    assert_eq!(pending(&ctx).await, 0);
}

/// Only a true redelivery (same id, same content) is skipped. The same
/// `event_id` with other content (another session's, the next seq's, twice
/// in one batch) becomes a dead letter whose reason names the id.
async fn duplicate_event_ids_with_other_content_are_dead_letters(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let mut c = consumer(&ctx, &db, consumer_config()).await;
    let a = ctx
        .store
        .create(NewSession::for_user(1, "a"))
        .await
        .expect("create");
    drain_within(&mut c, Duration::from_secs(30)).await;
    let first = ctx.stream().await.remove(0);
    let a_id: uuid::Uuid = first["event_id"].parse().expect("uuid");
    // A true redelivery: the same fields again.
    let same: Vec<(String, String)> = first.clone().into_iter().collect();
    xadd_fields(&ctx, &same).await;
    // Another session's event under a's id.
    let other = fresh_session_id();
    let mut e = raw_event(&other, 1, created_kind("2"), Some("2"));
    e.event_id = a_id;
    xadd_event(&ctx, &e).await;
    // The next seq of a session under the id of its first event.
    let b = fresh_session_id();
    let b1 = raw_event(&b, 1, created_kind("3"), Some("3"));
    xadd_event(&ctx, &b1).await;
    drain_within(&mut c, Duration::from_secs(30)).await;
    let mut b2 = raw_event(&b, 2, set_kind("k", json!(1)), Some("3"));
    b2.event_id = b1.event_id;
    xadd_event(&ctx, &b2).await;
    // Twice in one batch: same id, other content.
    let d = fresh_session_id();
    let d1 = raw_event(&d, 1, created_kind("4"), Some("4"));
    let mut d1_other = d1.clone();
    d1_other.user_id = Some("5".to_owned());
    xadd_event(&ctx, &d1).await;
    xadd_event(&ctx, &d1_other).await;
    drain_within(&mut c, Duration::from_secs(30)).await;

    assert_eq!(seqs_of(&db, &a.session_id).await, vec![1]);
    assert!(seqs_of(&db, &other).await.is_empty());
    assert_eq!(seqs_of(&db, &b).await, vec![1]);
    assert_eq!(seqs_of(&db, &d).await, vec![1]);
    let stored_d = session_events::Entity::find()
        .filter(session_events::Column::EventId.eq(d1.event_id))
        .one(&db.db)
        .await
        .expect("row")
        .expect("d1 stored");
    assert_eq!(stored_d.user_id.as_deref(), Some("4"), "the first one wins");
    let dead = all_dead_letters(&db).await;
    assert_eq!(dead.len(), 3, "{dead:?}");
    for (id, what) in [
        (a_id, "another session's"),
        (b1.event_id, "the next seq's"),
        (d1.event_id, "twice in a batch"),
    ] {
        assert!(
            dead.iter().any(|x| x.reason.contains(&id.to_string())),
            "{what}: no dead letter names {id}: {dead:?}"
        );
    }
    assert_eq!(pending(&ctx).await, 0);
}

/// A snapshot row that cannot be read (a broken JSON state, an unknown
/// status) is rebuilt from the session's events; the incoming events are
/// not blamed for it.
async fn a_corrupt_snapshot_is_rebuilt_from_the_events(backend: Backend) {
    use sea_orm::ConnectionTrait as _;
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let mut c = consumer(&ctx, &db, consumer_config()).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let s = ctx
            .store
            .create(NewSession::for_user(n, "u"))
            .await
            .expect("create");
        ctx.store
            .update(&s.session_id, Changes::new().with_set("k", n))
            .await
            .expect("update");
        ids.push(s.session_id);
    }
    drain_within(&mut c, Duration::from_secs(30)).await;
    let backend_of = db.db.get_database_backend();
    for (id, set) in [
        (&ids[0], "state = '{broken'"),
        (&ids[1], "status = 'bogus'"),
    ] {
        db.db
            .execute_raw(sea_orm::Statement::from_string(
                backend_of,
                format!(
                    "UPDATE session_snapshots SET {set} WHERE session_id = '{}'",
                    id.as_str()
                ),
            ))
            .await
            .expect("corrupt the snapshot");
    }
    for (n, id) in ids.iter().enumerate() {
        for m in 0..3 {
            ctx.store
                .update(id, Changes::new().with_set(format!("after{m}"), n))
                .await
                .expect("update");
        }
    }
    drain_within(&mut c, Duration::from_secs(30)).await;
    let dead = all_dead_letters(&db).await;
    assert!(dead.is_empty(), "{dead:?}");
    for id in &ids {
        assert_eq!(seqs_of(&db, id).await, vec![1, 2, 3, 4, 5]);
        let snap = snapshot(&db, id).await.expect("snapshot");
        let live = ctx.store.get(id).await.expect("get").expect("live");
        assert_eq!(snap.seq, 5);
        assert_eq!(snap.state, live.to_json(), "snapshot of {id} rebuilt");
        assert_eq!(snap.state, fold_of_table(&db, id).await.to_json());
        assert_eq!(snap.status, session_snapshots::SnapshotStatus::Live);
    }
}

/// A valid entry delivered more than `AUDIT_MAX_DELIVERIES` times (its
/// consumers kept dying while a lock was held) is written on its own, not
/// set aside; it lands and its session's snapshot moves on.
async fn entries_delivered_too_often_are_written_alone(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let s = ctx
        .store
        .create(NewSession::for_user(1, "u"))
        .await
        .expect("create");
    for n in 0..3 {
        ctx.store
            .update(&s.session_id, Changes::new().with_set("n", n))
            .await
            .expect("update");
    }
    let cfg = ConsumerConfig {
        claim_idle: Duration::ZERO,
        ..consumer_config()
    };
    let mut c = consumer(&ctx, &db, cfg).await;
    // A consumer that died six times holding them: delivered 9 times.
    let read: redis::streams::StreamReadReply = ctx
        .conn()
        .xread_options(
            &[&ctx.config.event_stream],
            &[">"],
            &redis::streams::StreamReadOptions::default()
                .group("audit", "crashed")
                .count(10),
        )
        .await
        .expect("xreadgroup");
    let ids: Vec<String> = read.keys[0].ids.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), 4);
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&ctx.config.event_stream)
        .arg("audit")
        .arg("crashed")
        .arg(0)
        .arg(&ids)
        .arg("RETRYCOUNT")
        .arg(9)
        .query_async(&mut ctx.conn())
        .await
        .expect("xclaim");
    drain_within(&mut c, Duration::from_secs(30)).await;
    let dead = all_dead_letters(&db).await;
    assert!(dead.is_empty(), "{dead:?}");
    assert_eq!(seqs_of(&db, &s.session_id).await, vec![1, 2, 3, 4]);
    let snap = snapshot(&db, &s.session_id).await.expect("snapshot");
    let live = ctx
        .store
        .get(&s.session_id)
        .await
        .expect("get")
        .expect("live");
    assert_eq!(snap.state, live.to_json());
    assert_eq!(pending(&ctx).await, 0);
}

async fn consumer_names(ctx: &TestContext) -> Vec<String> {
    let reply: redis::streams::StreamInfoConsumersReply = ctx
        .conn()
        .xinfo_consumers(&ctx.config.event_stream, "audit")
        .await
        .expect("xinfo consumers");
    reply.consumers.into_iter().map(|c| c.name).collect()
}

/// Consumers that are idle and own no pending entries (workers that died
/// or were replaced) are removed from the group; one that still owns
/// entries stays until they are taken over.
async fn dead_consumers_are_removed_from_the_group(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let cfg = ConsumerConfig {
        claim_idle: Duration::from_millis(300),
        ..consumer_config()
    };
    let me = cfg.consumer.clone();
    let mut c = consumer(&ctx, &db, cfg).await;
    for n in 0..5 {
        let _: redis::Value = redis::cmd("XGROUP")
            .arg("CREATECONSUMER")
            .arg(&ctx.config.event_stream)
            .arg("audit")
            .arg(format!("ghost-{n}"))
            .query_async(&mut ctx.conn())
            .await
            .expect("createconsumer");
    }
    let s = ctx
        .store
        .create(NewSession::for_user(1, "u"))
        .await
        .expect("create");
    // One dead worker still holds an entry.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("audit")
        .arg("holder")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&ctx.config.event_stream)
        .arg(">")
        .query_async(&mut ctx.conn())
        .await
        .expect("xreadgroup");
    assert_eq!(consumer_names(&ctx).await.len(), 6);
    let token = CancellationToken::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        c.step(&token).await.expect("step");
        let names = consumer_names(&ctx).await;
        if names == vec![me.clone()] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dead consumers were not removed: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seqs_of(&db, &s.session_id).await,
        vec![1],
        "the held entry was taken over"
    );
    assert_eq!(pending(&ctx).await, 0);
}

/// A valid event whose text PostgreSQL cannot store (a NUL character in its
/// user id: SQLSTATE 22021) is isolated and becomes a dead letter that names
/// the code; the events around it land. SQLite stores it.
async fn text_the_database_cannot_store_is_a_dead_letter(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let mut c = consumer(&ctx, &db, consumer_config()).await;
    let before = ctx
        .store
        .create(NewSession::for_user(1, "before"))
        .await
        .expect("create");
    let sid = fresh_session_id();
    let e = raw_event(&sid, 1, created_kind("nul"), Some("a\0b"));
    xadd_event(&ctx, &e).await;
    let after = ctx
        .store
        .create(NewSession::for_user(2, "after"))
        .await
        .expect("create");
    drain_within(&mut c, Duration::from_secs(30)).await;
    assert_eq!(seqs_of(&db, &before.session_id).await, vec![1]);
    assert_eq!(seqs_of(&db, &after.session_id).await, vec![1]);
    assert_eq!(pending(&ctx).await, 0);
    let dead = all_dead_letters(&db).await;
    match backend {
        Backend::Postgres => {
            assert_eq!(dead.len(), 1, "{dead:?}");
            assert!(dead[0].reason.contains("22021"), "{}", dead[0].reason);
            assert_eq!(dead[0].session_id.as_deref(), Some(sid.as_str()));
            assert_eq!(dead[0].seq, Some(1));
        }
        Backend::Sqlite => {
            assert!(dead.is_empty(), "{dead:?}");
            assert_eq!(seqs_of(&db, &sid).await, vec![1]);
        }
    }
}

/// Runs `vedfolnir-sessions` with the test's Redis and database; returns its
/// exit code and stdout.
fn cli(ctx: &TestContext, db: &TestDb, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(vedfolnir_tests::binary("vedfolnir-sessions"))
        .args(args)
        .env("REDIS_URL", vedfolnir_tests::redis_url())
        .env("REDIS_SESSION_PREFIX", &ctx.config.session_prefix)
        .env("REDIS_EVENT_STREAM", &ctx.config.event_stream)
        .env("DATABASE_URL", &db.url)
        .env_remove("RUST_LOG")
        .output()
        .expect("run vedfolnir-sessions");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli_json(ctx: &TestContext, db: &TestDb, args: &[&str]) -> serde_json::Value {
    let (code, out, err) = cli(ctx, db, args);
    assert_eq!(code, 0, "{args:?} failed: {err}\n{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}

/// Installs a rule that refuses every event of the user `poison`
/// (SQLSTATE 23514 on PostgreSQL, a constraint trigger on SQLite).
async fn poison_rule(db: &TestDb, on: bool) {
    use sea_orm::ConnectionTrait as _;
    let sql = match (db.backend(), on) {
        (Backend::Postgres, true) => {
            "ALTER TABLE session_events ADD CONSTRAINT vtest_poison \
             CHECK (user_id IS DISTINCT FROM 'poison')"
        }
        (Backend::Postgres, false) => "ALTER TABLE session_events DROP CONSTRAINT vtest_poison",
        (Backend::Sqlite, true) => {
            "CREATE TRIGGER vtest_poison BEFORE INSERT ON session_events \
             WHEN NEW.user_id = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned user'); END"
        }
        (Backend::Sqlite, false) => "DROP TRIGGER vtest_poison",
    };
    db.db.execute_unprepared(sql).await.expect("poison rule");
}

/// `dead-letters list | retry | discard`: an event refused for a cause that
/// is later fixed is written by `retry` with its original id and seq, and
/// its session's snapshot moves past the gap; an entry that still cannot be
/// decoded is kept with the new reason; `discard` needs `--yes`.
async fn dead_letters_are_retried_after_the_cause_is_fixed(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let mut c = consumer(&ctx, &db, consumer_config()).await;
    poison_rule(&db, true).await;
    let p = ctx
        .store
        .create(NewSession::for_user("poison", "p"))
        .await
        .expect("create");
    for n in 0..2 {
        ctx.store
            .update(&p.session_id, Changes::new().with_set("n", n))
            .await
            .expect("update");
    }
    let good = ctx
        .store
        .create(NewSession::for_user(7, "good"))
        .await
        .expect("create");
    // From a newer version of the product.
    let future = fresh_session_id();
    let mut newer = fields_of(&raw_event(&future, 1, created_kind("8"), Some("8")));
    for (k, v) in &mut newer {
        if k == "schema" {
            *v = "99".to_owned();
        }
    }
    xadd_fields(&ctx, &newer).await;
    drain_within(&mut c, Duration::from_secs(30)).await;
    assert_eq!(seqs_of(&db, &good.session_id).await, vec![1]);
    assert!(seqs_of(&db, &p.session_id).await.is_empty());

    let list = cli_json(&ctx, &db, &["dead-letters", "list"]);
    let list = list.as_array().expect("a JSON array");
    assert_eq!(list.len(), 4, "{list:?}");
    let of_p: Vec<&serde_json::Value> = list
        .iter()
        .filter(|d| d["session_id"] == p.session_id.as_str())
        .collect();
    assert_eq!(
        of_p.iter().map(|d| d["seq"].as_i64()).collect::<Vec<_>>(),
        vec![Some(1), Some(2), Some(3)],
        "the gap is visible: {list:?}"
    );

    // The cause is still there: every one is kept, with its new reason.
    let kept = cli_json(&ctx, &db, &["dead-letters", "retry", "--all"]);
    assert_eq!(kept["written"], 0, "{kept}");
    assert_eq!(kept["kept"], 4, "{kept}");
    assert_eq!(all_dead_letters(&db).await.len(), 4);

    // Fixed: the three events go in with their ids and seqs, the snapshot
    // catches up; the entry from the future stays.
    poison_rule(&db, false).await;
    let done = cli_json(&ctx, &db, &["dead-letters", "retry", "--all"]);
    assert_eq!(done["written"], 3, "{done}");
    assert_eq!(done["kept"], 1, "{done}");
    assert_eq!(seqs_of(&db, &p.session_id).await, vec![1, 2, 3]);
    let stream_ids: Vec<String> = ctx
        .events_of(&p.session_id)
        .await
        .into_iter()
        .map(|e| e["event_id"].clone())
        .collect();
    let row_ids: Vec<String> = session_events::Entity::find()
        .filter(session_events::Column::SessionId.eq(p.session_id.as_str()))
        .order_by_asc(session_events::Column::Seq)
        .all(&db.db)
        .await
        .expect("rows")
        .into_iter()
        .map(|r| r.event_id.to_string())
        .collect();
    assert_eq!(row_ids, stream_ids, "original event ids");
    let snap = snapshot(&db, &p.session_id).await.expect("snapshot");
    let live = ctx
        .store
        .get(&p.session_id)
        .await
        .expect("get")
        .expect("live");
    assert_eq!(snap.seq, 3);
    assert_eq!(snap.state, live.to_json());
    let left = all_dead_letters(&db).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].reason.contains("schema 99"), "{}", left[0].reason);

    // Discarding needs a confirmation.
    let (code, _, err) = cli(&ctx, &db, &["dead-letters", "discard", "--all"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(all_dead_letters(&db).await.len(), 1);
    let discarded = cli_json(&ctx, &db, &["dead-letters", "discard", "--all", "--yes"]);
    assert_eq!(discarded["discarded"], 1, "{discarded}");
    let list = cli_json(&ctx, &db, &["dead-letters", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    let list = cli_json(&ctx, &db, &["dead-letters", "list", "--discarded"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    // An id that does not exist: exit 1.
    let (code, _, err) = cli(&ctx, &db, &["dead-letters", "retry", "--id", "999999"]);
    assert_eq!(code, 1, "{err}");
}

/// The events of `e` as the consumer would write them, with a stream id.
fn incoming(e: &vedfolnir_sessions::Event, ms: u64) -> vedfolnir_sessions::audit::Incoming {
    vedfolnir_sessions::audit::Incoming {
        stream_id: Some(format!("{ms}-0")),
        event: e.clone(),
    }
}

async fn lock_waiters(db: &TestDb) -> i64 {
    use sea_orm::ConnectionTrait as _;
    let row = db
        .db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        ))
        .await
        .expect("pg_stat_activity")
        .expect("a row");
    row.try_get::<i64>("", "n").expect("n")
}

/// An app server writing synchronously (`DB_SESSION_SYNC`, unfenced) and
/// the consumer fold the same session one after the other: a writer that
/// is slow between its insert and its snapshot (here: held up by a lock)
/// cannot leave a snapshot that misses the other's committed event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writers_of_one_session_take_turns() {
    use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
    let ctx = TestContext::new().await;
    let db = TestDb::new(Backend::Postgres).await;
    let sink = |db: &TestDb| {
        AuditSink::new(
            db.db.clone(),
            ctx.config.session_timeout,
            ctx.config.event_stream.clone(),
        )
    };
    let (consumer_sink, app_server) = (sink(&db), sink(&db));
    let sid = fresh_session_id();
    let now = chrono::Utc::now().timestamp_millis() as u64;
    let e1 = raw_event(&sid, 1, created_kind("1"), Some("1"));
    let e2 = raw_event(&sid, 2, set_kind("k", json!(2)), Some("1"));
    let e3 = raw_event(&sid, 3, set_kind("k", json!(3)), Some("1"));
    let e4 = raw_event(
        &sid,
        4,
        vedfolnir_sessions::EventKind::Destroyed {
            reason: DestroyReason::Logout,
        },
        Some("1"),
    );
    consumer_sink
        .write(&[incoming(&e1, now), incoming(&e2, now + 1)], &[])
        .await
        .expect("seq 1 and 2");
    // Writers of snapshots wait while this is held.
    let holder = db.db.begin().await.expect("begin");
    holder
        .execute_unprepared("LOCK TABLE session_snapshots IN SHARE ROW EXCLUSIVE MODE")
        .await
        .expect("lock");
    let a = tokio::spawn({
        let batch = vec![incoming(&e3, now + 2)];
        async move { consumer_sink.write(&batch, &[]).await }
    });
    ctx.eventually(
        "the consumer to wait for the lock",
        Duration::from_secs(10),
        || async { lock_waiters(&db).await >= 1 },
    )
    .await;
    let b = tokio::spawn({
        let batch = vec![incoming(&e4, now + 3)];
        async move { app_server.write(&batch, &[]).await }
    });
    // Either the app server's write went through without waiting, or it
    // waits its turn too.
    ctx.eventually(
        "the app server to commit or wait",
        Duration::from_secs(10),
        || async { b.is_finished() || lock_waiters(&db).await >= 2 },
    )
    .await;
    holder.rollback().await.expect("unlock");
    a.await.expect("join").expect("seq 3");
    b.await.expect("join").expect("seq 4");
    assert_eq!(seqs_of(&db, &sid).await, vec![1, 2, 3, 4]);
    let snap = snapshot(&db, &sid).await.expect("snapshot");
    let fold = fold_of_table(&db, &sid).await;
    assert_eq!(snap.seq, 4, "the snapshot is the fold of all four events");
    assert_eq!(snap.state, fold.to_json());
    assert_eq!(snap.status, session_snapshots::SnapshotStatus::Destroyed);
}

/// A worker whose fencing token was bumped by a successor commits nothing,
/// on both backends; its successor's writes go through.
async fn a_stale_fence_commits_nothing(backend: Backend) {
    use vedfolnir_sessions::audit::sink::Commit;
    use vedfolnir_sessions::lease::{Fence, Role};
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let stream = ctx.config.event_stream.clone();
    let sink = AuditSink::new(db.db.clone(), ctx.config.session_timeout, stream.clone());
    let ttl = Duration::from_secs(1);
    let old = Fence::acquire(&db.db, &stream, Role::Audit, "worker-a", ttl)
        .await
        .expect("fence");
    let sid = fresh_session_id();
    let e1 = raw_event(&sid, 1, created_kind("1"), Some("1"));
    let done = sink
        .write_fenced(&old, &[incoming(&e1, 1)], &[])
        .await
        .expect("write");
    assert!(
        matches!(done, Commit::Done(ref o) if o.inserted == 1),
        "{done:?}"
    );
    let new = Fence::acquire(&db.db, &stream, Role::Audit, "worker-b", ttl)
        .await
        .expect("fence");
    assert!(new.token > old.token, "tokens only grow");
    let e2 = raw_event(&sid, 2, set_kind("k", json!(1)), Some("1"));
    let refused = sink
        .write_fenced(&old, &[incoming(&e2, 2)], &[])
        .await
        .expect("write");
    assert_eq!(
        refused,
        Commit::Fenced {
            current: Some(new.token)
        }
    );
    assert_eq!(seqs_of(&db, &sid).await, vec![1], "nothing committed");
    assert_eq!(snapshot(&db, &sid).await.expect("snapshot").seq, 1);
    // Another role's fence is another token.
    let reaper = Fence::acquire(&db.db, &stream, Role::Reaper, "worker-a", ttl)
        .await
        .expect("fence");
    assert_eq!(reaper.token, 1);
    let ok = sink
        .write_fenced(&new, &[incoming(&e2, 2)], &[])
        .await
        .expect("write");
    assert!(
        matches!(ok, Commit::Done(ref o) if o.inserted == 1),
        "{ok:?}"
    );
    assert_eq!(snapshot(&db, &sid).await.expect("snapshot").seq, 2);
}

/// Entries far larger than usual: a batch holds at most `AUDIT_BATCH_BYTES`
/// of them, and every one lands; an entry larger than the bound still
/// lands (it cannot be split).
async fn batches_are_bounded_in_bytes(backend: Backend) {
    const BUDGET: u64 = 256 * 1024;
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let cfg = ConsumerConfig {
        batch_bytes: BUDGET as usize,
        ..consumer_config()
    };
    let mut c = consumer(&ctx, &db, cfg).await;
    let sid = fresh_session_id();
    xadd_event(&ctx, &raw_event(&sid, 1, created_kind("1"), Some("1"))).await;
    for seq in 2..=30 {
        let blob = format!("{seq}{}", "b".repeat(60 * 1024));
        xadd_event(
            &ctx,
            &raw_event(&sid, seq, set_kind("blob", json!(blob)), Some("1")),
        )
        .await;
    }
    drain_within(&mut c, Duration::from_secs(60)).await;
    assert_eq!(seqs_of(&db, &sid).await, (1..=30).collect::<Vec<i64>>());
    let t = c.totals().clone();
    // 30 entries of 60 KiB in batches of at most 256 KiB (4 entries).
    assert!(t.batches >= 8, "{t:?}");
    assert!(
        t.largest_batch_bytes <= BUDGET,
        "a batch held {} bytes, over {BUDGET}: {t:?}",
        t.largest_batch_bytes
    );
    // One entry over the bound on its own still lands.
    let huge = "h".repeat(300 * 1024);
    xadd_event(
        &ctx,
        &raw_event(&sid, 31, set_kind("blob", json!(huge)), Some("1")),
    )
    .await;
    drain_within(&mut c, Duration::from_secs(60)).await;
    assert_eq!(seqs_of(&db, &sid).await, (1..=31).collect::<Vec<i64>>());
    assert_eq!(pending(&ctx).await, 0);
}
