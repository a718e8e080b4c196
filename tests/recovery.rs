//! Recovery against the real Redis and both databases: replay after a loss,
//! point-in-time state, verify, and reads while recovering.

#[macro_use]
mod common;

use std::time::Duration;

use common::TestContext;
use common::db::{Backend, TestDb};
use redis::AsyncCommands as _;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use vedfolnir_sessions::audit::{AuditConsumer, AuditSink, ConsumerConfig};
use vedfolnir_sessions::recovery::{self, Healer, Selection};
use vedfolnir_sessions::{Changes, DestroyReason, NewSession};

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

on_both_backends!(
    replay_restores_identical_sessions,
    point_in_time_and_verify,
    loads_during_recovery_come_from_the_database,
    synchronous_mode_commits_before_returning,
);
