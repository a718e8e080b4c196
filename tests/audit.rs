//! The audit pipeline against the real Redis and both real databases:
//! exactly-once delivery, snapshots, dead letters, trimming, expiry events,
//! and a database outage behind a TCP proxy.

#[macro_use]
mod common;
#[path = "common/redis_server.rs"]
mod redis_server;

use std::time::Duration;

use common::TestContext;
use common::db::{Backend, TestDb};
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
    let old_score: f64 = ctx
        .conn()
        .zscore(format!("{}expiry", ctx.namespace), kept.session_id.as_str())
        .await
        .expect("score");
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
            .expire(&kept.session_id, old_score as i64 - 5_000)
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
    let mut server = redis_server::RedisServer::start().await;
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

on_both_backends!(
    the_consumer_records_how_current_the_database_is,
    every_event_exactly_once,
    malformed_entries_become_dead_letters,
    two_consumers_share_the_work,
    the_stream_stays_bounded,
    idle_sessions_expire_exactly_once,
    large_batches_land_exactly_once,
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
