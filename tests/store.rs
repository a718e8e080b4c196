//! The store's contract against the real Redis: invariants 1, 2, 3, 5, 6, 10
//! of `docs/design.md`, the limits, and script recovery.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands as _;
use serde_json::{Value, json};
use vedfolnir_sessions::{
    Changes, DestroyReason, Error, NewSession, Platform, Record, SessionStore, Status,
};
use vedfolnir_tests::{TestContext, Topology};

vedfolnir_tests::on_both_topologies!(
    read_your_writes_across_two_stores,
    session_json_and_stream_fields_follow_the_design,
    fifty_concurrent_updates_lose_nothing,
    destroy_racing_updates_never_resurrects,
    ttl_is_set_on_create_and_refreshed_by_touch,
    missing_expired_and_destroyed_sessions_load_as_none,
    the_token_is_stored_nowhere,
    oversized_sessions_are_refused_and_nothing_is_written,
    the_per_user_limit_evicts_the_oldest,
    rotation_tombstones_the_old_id,
    platform_switch_and_logout_everywhere,
    the_store_survives_script_flush,
    update_from_a_stale_read_loses_nothing,
    a_remembered_state_another_store_moved_on_loses_nothing,
    a_remembered_state_never_outlives_an_end_elsewhere,
    a_remembered_state_is_not_the_judge_of_a_change,
);

fn admin() -> NewSession {
    NewSession::for_user(1, "admin")
        .with("email", "admin@example.com")
        .with("role", "admin")
}

async fn read_your_writes_across_two_stores(topology: Topology) {
    let ctx = TestContext::on(topology).await;
    let other = ctx.other_store().await;
    let c = ctx.store.create(admin()).await.expect("create");
    let seen = other
        .get(&c.session_id)
        .await
        .expect("get")
        .expect("visible");
    assert_eq!(seen, c.session);
    for i in 0..20 {
        ctx.store
            .update(&c.session_id, Changes::new().with_set("counter", i))
            .await
            .expect("update");
        let s = other.get(&c.session_id).await.expect("get").expect("live");
        assert_eq!(s.get("counter"), Some(&json!(i)), "write {i} not visible");
        assert_eq!(s.version(), 2 + i as u64);
    }
}

async fn session_json_and_stream_fields_follow_the_design(topology: Topology) {
    let ctx = TestContext::on(topology).await;
    let c = ctx.store.create(admin()).await.expect("create");
    let raw: String = ctx
        .conn()
        .get(ctx.session_key(&c.session_id))
        .await
        .expect("get");
    let v: Value = serde_json::from_str(&raw).expect("json");
    for k in [
        "user_id",
        "username",
        "email",
        "role",
        "created_at",
        "last_activity",
        "_last_updated",
    ] {
        assert!(v.get(k).is_some(), "missing {k} in {raw}");
    }
    assert_eq!(v["_version"], json!(1));
    assert_eq!(v["user_id"], json!(1));
    let ts = v["created_at"].as_str().expect("string");
    assert!(ts.ends_with("+00:00") && ts.len() == 32, "timestamp {ts}");
    let events = ctx.events_of(&c.session_id).await;
    assert_eq!(events.len(), 1);
    let e = &events[0];
    let mut names: Vec<_> = e.keys().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "event_id",
            "occurred_at",
            "payload",
            "schema",
            "seq",
            "session_id",
            "type",
            "user_id"
        ]
    );
    assert_eq!(e["type"], "created");
    assert_eq!(e["seq"], "1");
    assert_eq!(e["user_id"], "1");
    assert_eq!(e["schema"], "1");
    let id = uuid::Uuid::parse_str(&e["event_id"]).expect("uuid");
    assert_eq!(id.get_version_num(), 7);
    // The projection is exactly the fold of the log.
    let decoded: Vec<_> = events
        .iter()
        .map(|f| vedfolnir_sessions::Event::from_fields(f).expect("decodes"))
        .collect();
    assert_eq!(Record::fold(&decoded).expect("folds").to_json(), raw);
}

async fn fifty_concurrent_updates_lose_nothing(topology: Topology) {
    let ctx = TestContext::on(topology).await;
    let c = ctx.store.create(admin()).await.expect("create");
    let mut tasks = Vec::new();
    for i in 0..50 {
        let store = if i % 2 == 0 {
            ctx.store.clone()
        } else {
            ctx.other_store().await
        };
        let id = c.session_id.clone();
        tasks.push(tokio::spawn(async move {
            store
                .update(&id, Changes::new().with_set(format!("key{i}"), i))
                .await
        }));
    }
    for t in tasks {
        t.await.expect("join").expect("update");
    }
    let s = ctx
        .store
        .get(&c.session_id)
        .await
        .expect("get")
        .expect("live");
    for i in 0..50 {
        assert_eq!(s.get(&format!("key{i}")), Some(&json!(i)), "key{i} lost");
    }
    assert_eq!(s.version(), 51);
    let seqs: Vec<u64> = ctx
        .events_of(&c.session_id)
        .await
        .iter()
        .map(|e| e["seq"].parse().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=51).collect::<Vec<u64>>());
    // Replaying the log gives the stored JSON byte for byte.
    let events: Vec<_> = ctx
        .events_of(&c.session_id)
        .await
        .iter()
        .map(|f| vedfolnir_sessions::Event::from_fields(f).expect("decodes"))
        .collect();
    assert_eq!(Record::fold(&events).expect("fold"), s);
}

async fn destroy_racing_updates_never_resurrects(topology: Topology) {
    let ctx = TestContext::on(topology).await;
    let c = ctx.store.create(admin()).await.expect("create");
    let barrier = Arc::new(tokio::sync::Barrier::new(21));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = ctx.other_store().await;
        let id = c.session_id.clone();
        let b = barrier.clone();
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            store
                .update(&id, Changes::new().with_set(format!("k{i}"), i))
                .await
        }));
    }
    let store = ctx.store.clone();
    let id = c.session_id.clone();
    let b = barrier.clone();
    let destroyer = tokio::spawn(async move {
        b.wait().await;
        store.destroy(&id, DestroyReason::Logout).await
    });
    let mut ok_versions = Vec::new();
    for t in tasks {
        match t.await.expect("join") {
            Ok(s) => ok_versions.push(s.version()),
            Err(Error::Ended { status, .. }) => assert_eq!(status, Status::Destroyed),
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert!(destroyer.await.expect("join").expect("destroy"));
    let exists: bool = ctx
        .conn()
        .exists(ctx.session_key(&c.session_id))
        .await
        .expect("exists");
    assert!(!exists, "a live key was left behind");
    assert_eq!(ctx.store.load(&c.session_id).await.expect("load"), None);
    let events = ctx.events_of(&c.session_id).await;
    let last = events.last().expect("events");
    assert_eq!(last["type"], "destroyed");
    let destroyed_seq: u64 = last["seq"].parse().expect("seq");
    assert_eq!(destroyed_seq as usize, events.len(), "seq contiguous");
    assert!(ok_versions.iter().all(|v| *v < destroyed_seq));
    // Every update after the destroy fails with a typed error.
    for _ in 0..3 {
        let e = ctx
            .store
            .update(&c.session_id, Changes::new().with_set("late", true))
            .await
            .expect_err("must fail");
        assert!(
            matches!(
                e,
                Error::Ended {
                    status: Status::Destroyed,
                    ..
                }
            ),
            "{e:?}"
        );
    }
    assert!(matches!(
        ctx.store.touch(&c.session_id).await,
        Err(Error::Ended { .. })
    ));
    assert_eq!(ctx.events_of(&c.session_id).await.len(), events.len());
}

async fn ttl_is_set_on_create_and_refreshed_by_touch(topology: Topology) {
    let ctx = TestContext::on_with(topology, |c| {
        c.with_session_timeout(Duration::from_secs(60))
            .with_touch_interval(Duration::from_secs(1))
    })
    .await;
    let c = ctx.store.create(admin()).await.expect("create");
    let key = ctx.session_key(&c.session_id);
    let ttl: i64 = ctx.conn().pttl(&key).await.expect("pttl");
    assert!((58_000..=60_000).contains(&ttl), "ttl {ttl}");
    // Loads inside the touch interval write nothing.
    let before = ctx.stream_len().await;
    for _ in 0..2 {
        assert!(ctx.store.load(&c.session_id).await.expect("load").is_some());
    }
    assert_eq!(
        ctx.stream_len().await,
        before,
        "loads inside the interval wrote"
    );
    // Age the key, then let the interval pass: the next load touches once.
    let _: () = ctx.conn().pexpire(&key, 5_000).await.expect("pexpire");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let s = ctx
        .store
        .load(&c.session_id)
        .await
        .expect("load")
        .expect("live");
    assert_eq!(s.version(), 2);
    let ttl: i64 = ctx.conn().pttl(&key).await.expect("pttl");
    assert!(ttl > 50_000, "touch did not refresh the ttl: {ttl}");
    let events = ctx.events_of(&c.session_id).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["type"], "touched");
    assert!(s.last_activity() > c.session.last_activity());
    assert!(ctx.store.load(&c.session_id).await.expect("load").is_some());
    assert_eq!(
        ctx.events_of(&c.session_id).await.len(),
        2,
        "second load wrote"
    );
    // The expiry index holds a lower bound of the deadline on Redis's
    // clock: the touch left the entry of the create (the reaper files it
    // again from the key's TTL when it comes due).
    let score = ctx
        .expiry_score(&c.session_id)
        .await
        .expect("in the expiry index");
    let created_ms = c.session.created_at().expect("created_at").millis() as f64;
    let deadline_ms = chrono::Utc::now().timestamp_millis() as f64 + ttl as f64;
    assert!(
        (score - created_ms - 60_000.0).abs() < 2_000.0 && score <= deadline_ms,
        "entry {score}, created {created_ms}, deadline {deadline_ms}"
    );
}

async fn missing_expired_and_destroyed_sessions_load_as_none(topology: Topology) {
    let ctx =
        TestContext::on_with(topology, |c| c.with_session_timeout(Duration::from_secs(1))).await;
    let unknown = vedfolnir_sessions::Token::generate().session_id();
    assert_eq!(ctx.store.load(&unknown).await.expect("load"), None);
    assert!(matches!(
        ctx.store
            .update(&unknown, Changes::new().with_set("a", 1))
            .await,
        Err(Error::NotFound(_))
    ));
    let c = ctx.store.create(admin()).await.expect("create");
    let store = ctx.store.clone();
    let id = c.session_id.clone();
    ctx.eventually("the session to expire", Duration::from_secs(5), || {
        let store = store.clone();
        let id = id.clone();
        async move { store.get(&id).await.expect("get").is_none() }
    })
    .await;
    assert_eq!(ctx.store.load(&c.session_id).await.expect("load"), None);
    // An expired (not yet reaped) session cannot be written either.
    assert!(matches!(
        ctx.store
            .update(&c.session_id, Changes::new().with_set("a", 1))
            .await,
        Err(Error::NotFound(_))
    ));
}

async fn the_token_is_stored_nowhere(topology: Topology) {
    let ctx = TestContext::on(topology).await;
    let c = ctx.store.create(admin()).await.expect("create");
    ctx.store
        .update(&c.session_id, Changes::new().with_set("theme", "dark"))
        .await
        .expect("update");
    let r = ctx
        .store
        .rotate(&c.session_id, Changes::new().with_set("csrf_token", "x"))
        .await
        .expect("rotate");
    let tokens = [c.token.expose().to_owned(), r.token.expose().to_owned()];
    assert_eq!(c.session_id, c.token.session_id());
    let mut conn = ctx.conn();
    let keys = ctx.keys().await;
    assert!(
        keys.len() >= 4,
        "expected session, tombstone, index keys: {keys:?}"
    );
    let mut seen = String::new();
    for k in &keys {
        seen.push_str(k);
        let t: String = redis::cmd("TYPE")
            .arg(k)
            .query_async(&mut conn)
            .await
            .expect("type");
        match t.as_str() {
            "string" => seen.push_str(&conn.get::<_, String>(k).await.expect("get")),
            "zset" => {
                // Members are ids, as hex or as their 32 bytes.
                let members: Vec<Vec<u8>> = conn.zrange(k, 0, -1).await.expect("zrange");
                for m in members {
                    seen.push_str(&String::from_utf8_lossy(&m));
                    seen.push_str(&hex::encode(&m));
                }
            }
            "stream" => {}
            other => panic!("unexpected key type {other} for {k}"),
        }
    }
    for e in ctx.stream().await {
        for (k, v) in e {
            seen.push_str(&k);
            seen.push_str(&v);
        }
    }
    assert!(
        seen.contains(c.session_id.as_str()),
        "sanity: the id is stored"
    );
    for t in &tokens {
        assert!(!seen.contains(t.as_str()), "token found in redis");
    }
}

async fn oversized_sessions_are_refused_and_nothing_is_written(topology: Topology) {
    let ctx = TestContext::on_with(topology, |c| c.with_max_bytes(2048)).await;
    let c = ctx.store.create(admin()).await.expect("create");
    let before_len = ctx.stream_len().await;
    let before: String = ctx
        .conn()
        .get(ctx.session_key(&c.session_id))
        .await
        .expect("get");
    let e = ctx
        .store
        .update(
            &c.session_id,
            Changes::new().with_set("blob", "x".repeat(4096)),
        )
        .await
        .expect_err("too large");
    assert!(
        matches!(e, Error::TooLarge { max: 2048, size } if size > 4096),
        "{e:?}"
    );
    assert_eq!(ctx.stream_len().await, before_len);
    let after: String = ctx
        .conn()
        .get(ctx.session_key(&c.session_id))
        .await
        .expect("get");
    assert_eq!(after, before);
    let e = ctx
        .store
        .create(admin().with("blob", "y".repeat(4096)))
        .await
        .expect_err("too large");
    assert!(matches!(e, Error::TooLarge { .. }));
    assert_eq!(ctx.stream_len().await, before_len);
    // Deep and wide JSON below the limit is fine; reserved keys are refused.
    let mut deep = json!(1);
    for _ in 0..100 {
        deep = json!([deep]);
    }
    ctx.store
        .update(&c.session_id, Changes::new().with_set("deep", deep))
        .await
        .expect("deep json within the limit");
    assert!(matches!(
        ctx.store
            .update(&c.session_id, Changes::new().with_set("_version", 99))
            .await,
        Err(Error::InvalidInput(_))
    ));
}

async fn the_per_user_limit_evicts_the_oldest(topology: Topology) {
    let ctx = TestContext::on_with(topology, |c| c.with_max_per_user(2)).await;
    let first = ctx.store.create(admin()).await.expect("create");
    let second = ctx.store.create(admin()).await.expect("create");
    assert!(second.evicted.is_empty());
    let other_user = ctx
        .store
        .create(NewSession::for_user(2, "user"))
        .await
        .expect("create");
    let third = ctx.store.create(admin()).await.expect("create");
    assert_eq!(third.evicted, vec![first.session_id.clone()]);
    assert_eq!(ctx.store.get(&first.session_id).await.expect("get"), None);
    assert!(
        ctx.store
            .get(&second.session_id)
            .await
            .expect("get")
            .is_some()
    );
    assert!(
        ctx.store
            .get(&other_user.session_id)
            .await
            .expect("get")
            .is_some()
    );
    let ev = ctx.events_of(&first.session_id).await;
    let last = ev.last().expect("events");
    assert_eq!(last["type"], "destroyed");
    assert_eq!(last["payload"], r#"{"reason":"evicted"}"#);
    assert_eq!(last["seq"], "2");
    let mine: Vec<_> = ctx
        .store
        .user_sessions("1")
        .await
        .expect("list")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(mine, vec![second.session_id, third.session_id]);
}

async fn rotation_tombstones_the_old_id(topology: Topology) {
    let ctx = TestContext::on(topology).await;
    let anon = ctx
        .store
        .create(NewSession::anonymous().with("cart", json!([1, 2])))
        .await
        .expect("create");
    let r = ctx
        .store
        .rotate(
            &anon.session_id,
            Changes::new()
                .with_set("user_id", 1)
                .with_set("username", "admin"),
        )
        .await
        .expect("rotate");
    assert_ne!(r.session_id, anon.session_id);
    assert_eq!(r.session.get("cart"), Some(&json!([1, 2])));
    assert_eq!(r.session.user_id(), Some(json!(1)));
    assert_eq!(ctx.store.load(&anon.session_id).await.expect("load"), None);
    assert_eq!(
        ctx.store
            .tombstone(&anon.session_id)
            .await
            .expect("tombstone"),
        Some(Status::Destroyed)
    );
    let old = ctx.events_of(&anon.session_id).await;
    assert_eq!(
        old.last().expect("event")["payload"],
        r#"{"reason":"rotated"}"#
    );
    let new = ctx.events_of(&r.session_id).await;
    let payload: Value = serde_json::from_str(&new[0]["payload"]).expect("json");
    assert_eq!(payload["rotated_from"], json!(anon.session_id.as_str()));
    assert!(matches!(
        ctx.store
            .update(&anon.session_id, Changes::new().with_set("a", 1))
            .await,
        Err(Error::Ended { .. })
    ));
    assert!(matches!(
        ctx.store.rotate(&anon.session_id, Changes::new()).await,
        Err(Error::Ended { .. })
    ));
    let mine = ctx.store.user_sessions("1").await.expect("list");
    assert_eq!(mine.len(), 1);
}

async fn platform_switch_and_logout_everywhere(topology: Topology) {
    let ctx = TestContext::on(topology).await;
    let a = ctx.store.create(admin()).await.expect("create");
    let b = ctx.store.create(admin()).await.expect("create");
    let u = ctx
        .store
        .create(NewSession::for_user(2, "user"))
        .await
        .expect("create");
    let p = Platform {
        platform_connection_id: 123,
        platform_name: "My Platform".to_owned(),
        platform_type: "mastodon".to_owned(),
        platform_instance_url: "https://mastodon.example.com".to_owned(),
    };
    let s = ctx
        .store
        .switch_platform(&a.session_id, p.clone())
        .await
        .expect("switch");
    assert_eq!(s.platform(), Some(p));
    assert_eq!(
        ctx.events_of(&a.session_id).await[1]["type"],
        "platform_switched"
    );
    let mut ended = ctx
        .store
        .destroy_all_for_user("1", DestroyReason::LogoutAll)
        .await
        .expect("logout all");
    ended.sort();
    let mut expected = vec![a.session_id.clone(), b.session_id.clone()];
    expected.sort();
    assert_eq!(ended, expected);
    for id in [&a.session_id, &b.session_id] {
        assert_eq!(ctx.store.get(id).await.expect("get"), None);
        let ev = ctx.events_of(id).await;
        assert_eq!(
            ev.last().expect("event")["payload"],
            r#"{"reason":"logout_all"}"#
        );
    }
    assert!(ctx.store.get(&u.session_id).await.expect("get").is_some());
    assert!(ctx.store.user_sessions("1").await.expect("list").is_empty());
}

async fn the_store_survives_script_flush(topology: Topology) {
    let ctx = TestContext::on(topology).await;
    let c = ctx.store.create(admin()).await.expect("create");
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut ctx.conn())
        .await
        .expect("script flush");
    let s = ctx
        .store
        .update(&c.session_id, Changes::new().with_set("after_flush", true))
        .await
        .expect("update after SCRIPT FLUSH");
    assert_eq!(s.version(), 2);
    ctx.store
        .create(admin())
        .await
        .expect("create after SCRIPT FLUSH");
}

#[tokio::test]
async fn an_unreachable_redis_is_a_typed_error() {
    let cfg = vedfolnir_sessions::Config::default().with_redis(
        vedfolnir_sessions::config::RedisTarget::parse("REDIS_URL", "redis://127.0.0.1:1/0")
            .expect("url"),
    );
    let e = SessionStore::connect(&cfg)
        .await
        .expect_err("nothing listens on port 1");
    assert!(e.is_unavailable(), "{e:?}");
}

async fn update_from_a_stale_read_loses_nothing(topology: Topology) {
    let ctx = TestContext::on(topology).await;
    let c = ctx.store.create(admin()).await.expect("create");
    let read = ctx
        .store
        .get(&c.session_id)
        .await
        .expect("get")
        .expect("live");
    // Another request writes after this one read.
    ctx.store
        .update(&c.session_id, Changes::new().with_set("other", 1))
        .await
        .expect("update");
    let before = ctx.stream_len().await;
    let s = ctx
        .store
        .update_from(&c.session_id, read, Changes::new().with_set("mine", 2))
        .await
        .expect("update from a stale read");
    assert_eq!(s.version(), 3);
    assert_eq!(s.get("other"), Some(&json!(1)), "the other write survived");
    assert_eq!(s.get("mine"), Some(&json!(2)));
    assert_eq!(ctx.stream_len().await, before + 1, "one event");
}

/// `store`'s remembered state of `id` is now behind: another store
/// (another app server) writes after it.
async fn write_elsewhere(
    other: &SessionStore,
    id: &vedfolnir_sessions::SessionId,
    key: &str,
    v: Value,
) {
    other
        .update(id, Changes::new().with_set(key, v))
        .await
        .expect("the other store's update");
}

async fn a_remembered_state_another_store_moved_on_loses_nothing(topology: Topology) {
    let ctx = TestContext::on(topology).await;
    let other = ctx.other_store().await;
    let c = ctx.store.create(admin()).await.expect("create");
    let id = &c.session_id;
    // `ctx.store` remembers version 2; the other store writes version 3.
    write_elsewhere(&ctx.store, id, "warm", json!(true)).await;
    write_elsewhere(&other, id, "theirs", json!(1)).await;
    let before = ctx.stream_len().await;
    let s = ctx
        .store
        .update(id, Changes::new().with_set("mine", 2))
        .await
        .expect("update on a remembered state that is behind");
    assert_eq!(s.version(), 4);
    assert_eq!(s.get("theirs"), Some(&json!(1)), "the other write survived");
    assert_eq!(s.get("mine"), Some(&json!(2)));
    // A touch on a state that is behind refreshes the session, not a conflict.
    write_elsewhere(&other, id, "theirs", json!(3)).await;
    let t = ctx
        .store
        .touch(id)
        .await
        .expect("touch on a stale remembered state");
    assert_eq!(t.version(), 6);
    assert_eq!(t.get("theirs"), Some(&json!(3)));
    // A counter both stores change without reading loses no step.
    let mut tasks = Vec::new();
    for store in [ctx.store.clone(), other.clone()] {
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                store.increment(&id, "n", 1).await.expect("increment");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let stored = other.get(id).await.expect("get").expect("live");
    assert_eq!(stored.get("n"), Some(&json!(50)));
    assert_eq!(stored.version(), 56);
    assert_eq!(
        ctx.stream_len().await,
        before + 53,
        "one event a write, no more"
    );
}

async fn a_remembered_state_never_outlives_an_end_elsewhere(topology: Topology) {
    let ctx = TestContext::on(topology).await;
    let other = ctx.other_store().await;
    let ops = ["update", "touch", "switch_platform", "increment"];
    for op in ops {
        let c = ctx.store.create(admin()).await.expect("create");
        let id = &c.session_id;
        // Remembered by `ctx.store`, then ended by the other store.
        write_elsewhere(&ctx.store, id, "step", json!(1)).await;
        assert!(
            other
                .destroy(id, DestroyReason::Logout)
                .await
                .expect("logout"),
            "the other store ended it"
        );
        let result = match op {
            "update" => ctx
                .store
                .update(id, Changes::new().with_set("step", 2))
                .await
                .map(|_| ()),
            "touch" => ctx.store.touch(id).await.map(|_| ()),
            "switch_platform" => ctx
                .store
                .switch_platform(
                    id,
                    Platform {
                        platform_connection_id: 9,
                        platform_name: "Other".into(),
                        platform_type: "pixelfed".into(),
                        platform_instance_url: "https://pixelfed.example.com".into(),
                    },
                )
                .await
                .map(|_| ()),
            _ => ctx.store.increment(id, "n", 1).await.map(|_| ()),
        };
        match result {
            Err(Error::Ended { status, .. }) => assert_eq!(status, Status::Destroyed, "{op}"),
            other => panic!("{op} after a logout elsewhere: {other:?}"),
        }
        assert_eq!(ctx.store.get(id).await.expect("get"), None, "{op}");
        let key: Option<String> = ctx.conn().get(ctx.session_key(id)).await.expect("GET");
        assert_eq!(key, None, "{op}: the session key stays deleted");
        let events = ctx.events_of(id).await;
        assert_eq!(
            events.last().map(|e| e["type"].as_str()),
            Some("destroyed"),
            "{op}: nothing was appended after the end"
        );
    }
}

async fn a_remembered_state_is_not_the_judge_of_a_change(topology: Topology) {
    let ctx = TestContext::on(topology).await;
    let other = ctx.other_store().await;
    let c = ctx
        .store
        .create(admin().with("cart", "old").with("n", "not a number"))
        .await
        .expect("create");
    let id = &c.session_id;
    write_elsewhere(&ctx.store, id, "warm", json!(true)).await;
    // Remembered: `n` is no integer. It is one now.
    write_elsewhere(&other, id, "n", json!(5)).await;
    assert_eq!(ctx.store.increment(id, "n", 1).await.expect("increment"), 6);
    // Remembered: `cart` is "old". The precondition holds on the session as
    // it is.
    write_elsewhere(&other, id, "cart", json!("new")).await;
    let s = ctx
        .store
        .update(
            id,
            Changes::new()
                .with_expect("cart", Some(json!("new")))
                .with_set("checked_out", true),
        )
        .await
        .expect("a precondition that holds now");
    assert_eq!(s.get("checked_out"), Some(&json!(true)));
    // Remembered: `cart` is "new", which it no longer is: refused.
    write_elsewhere(&other, id, "cart", json!("newer")).await;
    let stale = ctx
        .store
        .update(
            id,
            Changes::new()
                .with_expect("cart", Some(json!("new")))
                .with_set("checked_out", false),
        )
        .await;
    assert!(
        matches!(&stale, Err(Error::StaleRead { key, .. }) if key == "cart"),
        "{stale:?}"
    );
    let stored = other.get(id).await.expect("get").expect("live");
    assert_eq!(stored.get("checked_out"), Some(&json!(true)));
    assert_eq!(stored.get("n"), Some(&json!(6)));
}

/// A user that may run everything, until `deny_get`: from then on a store
/// connected as it can write only what it does not read first.
struct NoGet {
    name: String,
    url: String,
}

impl NoGet {
    async fn create(ctx: &TestContext) -> NoGet {
        let name = format!("vtest-noget-{}", uuid::Uuid::new_v4().simple());
        let password = uuid::Uuid::new_v4().simple().to_string();
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&name)
            .arg("on")
            .arg(format!(">{password}"))
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .query_async(&mut ctx.conn())
            .await
            .expect("ACL SETUSER");
        let mut url = url::Url::parse(&vedfolnir_tests::redis_url()).expect("redis url");
        url.set_username(&name).expect("username");
        url.set_password(Some(&password)).expect("password");
        NoGet {
            name,
            url: url.to_string(),
        }
    }

    /// Takes `GET` away, from the connections already open too.
    async fn deny_get(&self, ctx: &TestContext) {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&self.name)
            .arg("-get")
            .query_async(&mut ctx.conn())
            .await
            .expect("ACL SETUSER -get");
    }

    async fn store(&self, ctx: &TestContext, state_cache: usize) -> SessionStore {
        let target =
            vedfolnir_sessions::config::RedisTarget::parse("REDIS_URL", &self.url).expect("url");
        let config = ctx
            .config
            .clone()
            .with_redis(target)
            .with_state_cache_bytes(state_cache);
        SessionStore::connect(&config)
            .await
            .expect("connect as the user")
    }

    async fn delete(self, ctx: &TestContext) {
        let _: u64 = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&self.name)
            .query_async(&mut ctx.conn())
            .await
            .expect("ACL DELUSER");
    }
}

#[tokio::test]
async fn a_write_given_no_state_does_not_read_a_session_its_store_wrote() {
    let ctx = TestContext::new().await;
    let user = NoGet::create(&ctx).await;
    let store = user.store(&ctx, 1 << 20).await;
    let forgetful = user.store(&ctx, 0).await;
    let other = ctx.other_store().await;
    let c = store.create(admin()).await.expect("create");
    let id = &c.session_id;
    // The first write given no state reads the session; `store` remembers
    // version 2, `forgetful` nothing.
    store
        .update(id, Changes::new().with_set("a", 0))
        .await
        .expect("the first update");
    user.deny_get(&ctx).await;
    let denied = forgetful.get(id).await;
    assert!(denied.is_err(), "GET is denied: {denied:?}");
    store.touch(id).await.expect("touch without a GET");
    assert_eq!(store.increment(id, "n", 2).await.expect("increment"), 2);
    store
        .update(id, Changes::new().with_set("a", 1))
        .await
        .expect("update without a GET");
    // Behind: the script's answer stands in for the read.
    write_elsewhere(&other, id, "b", json!(2)).await;
    let s = store
        .update(id, Changes::new().with_set("a", 3))
        .await
        .expect("update on a state that is behind, without a GET");
    assert_eq!((s.get("a"), s.get("b")), (Some(&json!(3)), Some(&json!(2))));
    assert_eq!(s.version(), 7);
    // A store that remembers nothing reads first, which this user may not.
    let read_first = forgetful.update(id, Changes::new().with_set("a", 4)).await;
    user.delete(&ctx).await;
    assert!(
        read_first.is_err(),
        "the read-first path ran: {read_first:?}"
    );
    let stored = other.get(id).await.expect("get").expect("live");
    assert_eq!(stored.version(), 7, "the refused update wrote nothing");
}
