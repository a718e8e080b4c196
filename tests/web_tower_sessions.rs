//! The tower-sessions adapter, driven by tower-sessions' own
//! `SessionManagerLayer` and through the trait directly, against the real
//! Redis.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::{Extension, Router};
use common::TestContext;
use redis::AsyncCommands as _;
use serde_json::{Value, json};
use tower_sessions::session::{Id, Record};
use tower_sessions::{Expiry, SessionManagerLayer, SessionStore as _};
use vedfolnir_sessions::web::TowerSessionsStore;
use vedfolnir_sessions::{DestroyReason, SessionId};

type TowerSession = tower_sessions::Session;

struct Served {
    ctx: TestContext,
    adapter: TowerSessionsStore,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Served {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn get(&self, client: &reqwest::Client, path: &str) -> (Option<String>, String) {
        let res = client.get(self.url(path)).send().await.expect("GET");
        assert!(res.status().is_success(), "{path}: {}", res.status());
        let cookie = res
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| cookie::Cookie::parse(v.to_str().ok()?.to_owned()).ok())
            .find(|c| c.name() == "id")
            .map(|c| c.value().to_owned());
        (cookie, res.text().await.expect("body"))
    }

    async fn session_of(&self, cookie: &str) -> Option<SessionId> {
        let id: Id = cookie.parse().expect("a tower-sessions id");
        self.adapter.resolve(&id).await.expect("resolve")
    }
}

/// A counter app as tower-sessions' own examples write it, with the one-line
/// switch to the event-sourced store.
async fn start() -> Served {
    let ctx = TestContext::new().await;
    let adapter = TowerSessionsStore::new(ctx.store.clone());
    let app = Router::new()
        .route(
            "/incr",
            get(|s: Extension<TowerSession>| async move {
                let n: u64 = s.get("counter").await.expect("get").unwrap_or(0) + 1;
                s.insert("counter", n).await.expect("insert");
                n.to_string()
            }),
        )
        .route(
            "/read",
            get(|s: Extension<TowerSession>| async move {
                let n: Option<u64> = s.get("counter").await.expect("get");
                format!("{n:?}")
            }),
        )
        .route(
            "/cycle",
            get(|s: Extension<TowerSession>| async move {
                s.cycle_id().await.expect("cycle");
                "cycled"
            }),
        )
        .route(
            "/flush",
            get(|s: Extension<TowerSession>| async move {
                s.flush().await.expect("flush");
                "flushed"
            }),
        )
        .layer(SessionManagerLayer::new(adapter.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Served {
        ctx,
        adapter,
        addr,
        server,
    }
}

fn jar() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .expect("client")
}

async fn events(ctx: &TestContext, id: &SessionId) -> Vec<(String, Value)> {
    ctx.events_of(id)
        .await
        .into_iter()
        .map(|e| {
            (
                e["type"].clone(),
                serde_json::from_str(&e["payload"]).expect("payload"),
            )
        })
        .collect()
}

#[tokio::test]
async fn saves_become_minimal_updated_events() {
    // Proves: under tower-sessions' own layer, the first save creates one
    // session (`created` with the record's data), each later save appends one
    // `updated` event with only the changed key, and a request that only
    // reads writes nothing.
    let s = start().await;
    let client = jar();
    let (cookie, body) = s.get(&client, "/incr").await;
    assert_eq!(body, "1");
    let cookie = cookie.expect("tower-sessions sets its cookie");
    assert_eq!(cookie.len(), 22, "tower-sessions' own 128-bit id");
    let id = s.session_of(&cookie).await.expect("an alias to a session");
    assert_eq!(s.get(&client, "/incr").await.1, "2");
    assert_eq!(s.get(&client, "/incr").await.1, "3");
    let before = s.ctx.stream_len().await;
    assert_eq!(s.get(&client, "/read").await.1, "Some(3)");
    assert_eq!(s.ctx.stream_len().await, before, "reads write nothing");
    let events = events(&s.ctx, &id).await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[0].0, "created");
    assert_eq!(events[0].1["fields"], json!({"counter": 1}));
    assert_eq!(
        events[1],
        (
            "updated".to_owned(),
            json!({"set": {"counter": 2}, "unset": []})
        )
    );
    let stored = s.ctx.store.get(&id).await.expect("get").expect("live");
    assert_eq!(stored.get("counter"), Some(&json!(3)));
}

#[tokio::test]
async fn cycle_and_flush_end_sessions_with_tombstones() {
    // Proves: `cycle_id` ends the old session and moves the data to a new
    // one under a new cookie; `flush` destroys the session (`logout`), drops
    // the alias, and the old cookie then loads nothing.
    let s = start().await;
    let client = jar();
    let (first, _) = s.get(&client, "/incr").await;
    let first = first.expect("cookie");
    let old = s.session_of(&first).await.expect("session");
    let (second, _) = s.get(&client, "/cycle").await;
    let second = second.expect("a new cookie after cycle_id");
    assert_ne!(second, first);
    let new = s.session_of(&second).await.expect("session");
    assert_ne!(new, old);
    assert_eq!(
        events(&s.ctx, &old).await.last().map(|e| e.1.clone()),
        Some(json!({"reason": "logout"}))
    );
    assert_eq!(
        s.get(&client, "/read").await.1,
        "Some(1)",
        "data moved over"
    );

    s.get(&client, "/flush").await;
    assert_eq!(s.session_of(&second).await, None, "alias removed");
    assert_eq!(
        events(&s.ctx, &new).await.last().map(|e| e.0.clone()),
        Some("destroyed".to_owned())
    );
    let replay = reqwest::Client::new()
        .get(s.url("/read"))
        .header("cookie", format!("id={second}"))
        .send()
        .await
        .expect("GET");
    assert_eq!(replay.text().await.expect("body"), "None");
}

#[tokio::test]
async fn the_trait_directly_no_resurrection_no_reserved_keys() {
    // Proves: through the trait, a save after a delete fails instead of
    // bringing the session back; reserved keys are refused; an unknown id
    // loads as None; the delete reason is configurable; and Redis holds the
    // id only as a hash.
    let ctx = TestContext::new().await;
    let adapter =
        TowerSessionsStore::new(ctx.store.clone()).with_delete_reason(DestroyReason::Admin);
    let mut record = Record {
        id: Id::default(),
        data: HashMap::from([("theme".to_owned(), json!("dark"))]),
        expiry_date: cookie::time::OffsetDateTime::now_utc() + cookie::time::Duration::hours(1),
    };
    adapter.create(&mut record).await.expect("create");
    let loaded = adapter
        .load(&record.id)
        .await
        .expect("load")
        .expect("found");
    let mut data = loaded.data.clone();
    let base = data
        .remove(vedfolnir_sessions::web::BASE_KEY)
        .expect("a loaded record carries the state it was loaded with");
    assert_eq!(base["v"], json!(1));
    assert_eq!(data, record.data);
    assert!(loaded.expiry_date > cookie::time::OffsetDateTime::now_utc());
    let sid = adapter
        .resolve(&record.id)
        .await
        .expect("resolve")
        .expect("alias");
    let alias: String = ctx
        .conn()
        .get(adapter.alias_key(&record.id))
        .await
        .expect("GET alias");
    assert_eq!(
        alias.split(' ').next(),
        Some(sid.as_str()),
        "the session id, then the record's expiry"
    );
    assert!(
        !adapter
            .alias_key(&record.id)
            .contains(&record.id.to_string())
    );

    let mut changed = record.clone();
    changed.data.insert("lang".to_owned(), json!("fi"));
    changed.data.remove("theme");
    adapter.save(&changed).await.expect("save");
    let last = ctx.events_of(&sid).await.pop().expect("event");
    assert_eq!(
        serde_json::from_str::<Value>(&last["payload"]).expect("json"),
        json!({"set": {"lang": "fi"}, "unset": ["theme"]})
    );

    let mut reserved = changed.clone();
    reserved.data.insert("_version".to_owned(), json!(99));
    assert!(matches!(
        adapter.save(&reserved).await,
        Err(tower_sessions::session_store::Error::Encode(_))
    ));

    adapter.delete(&record.id).await.expect("delete");
    assert_eq!(adapter.load(&record.id).await.expect("load"), None);
    assert!(adapter.save(&changed).await.is_err(), "no resurrection");
    assert!(ctx.store.get(&sid).await.expect("get").is_none());
    let last = ctx.events_of(&sid).await.pop().expect("event");
    assert_eq!(last["type"], "destroyed");
    assert_eq!(last["payload"], r#"{"reason":"admin"}"#);
    assert_eq!(adapter.load(&Id::default()).await.expect("load"), None);

    let text = ctx
        .stream()
        .await
        .into_iter()
        .flat_map(|e| e.into_values())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        !text.contains(&record.id.to_string()),
        "the cookie value is never stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_counters_through_the_adapter_lose_nothing_silently() {
    // Proves: tower-sessions' counter example, hit by twenty concurrent
    // requests of one session, never loses an increment silently: the
    // counter ends at the number of requests that succeeded, each of which
    // was told a distinct value; a save whose key a concurrent request
    // changed first is refused (tower-sessions answers 500), not merged.
    // Before, 17 of 20 increments were lost behind 200 responses.
    let s = start().await;
    let client = jar();
    let (cookie, _) = s.get(&client, "/incr").await;
    let cookie = cookie.expect("the first request sets the cookie");
    let sends = (0..20).map(|_| {
        reqwest::Client::new()
            .get(s.url("/incr"))
            .header("cookie", format!("id={cookie}"))
            .send()
    });
    let mut told = Vec::new();
    let mut refused = 0;
    for res in futures::future::join_all(sends).await {
        let res = res.expect("request");
        if res.status().is_success() {
            told.push(res.text().await.expect("body").parse::<u64>().expect("n"));
        } else {
            assert_eq!(res.status(), 500);
            refused += 1;
        }
    }
    let mut distinct = told.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), told.len(), "told {told:?}");
    assert_eq!(told.len() + refused, 20);
    let sid = s.session_of(&cookie).await.expect("alias");
    let stored = s.ctx.store.get(&sid).await.expect("get").expect("live");
    assert_eq!(stored.get("counter"), Some(&json!(told.len() as u64 + 1)));
}

/// The remaining life of a session's key, ms.
async fn pttl(ctx: &TestContext, id: &SessionId) -> i64 {
    ctx.conn().pttl(ctx.session_key(id)).await.expect("PTTL")
}

fn in_ms(from: OffsetDateTime, ms: i64) -> OffsetDateTime {
    from + cookie::time::Duration::milliseconds(ms)
}

fn record(expiry_date: OffsetDateTime) -> Record {
    Record {
        id: Id::default(),
        data: HashMap::from([("a".to_owned(), json!(1))]),
        expiry_date,
    }
}

async fn kinds(ctx: &TestContext, id: &SessionId) -> Vec<String> {
    events(ctx, id).await.into_iter().map(|e| e.0).collect()
}

fn near(actual: i64, want: i64, slack: i64) -> bool {
    (actual - want).abs() <= slack
}

use cookie::time::OffsetDateTime;

#[tokio::test]
async fn the_redis_ttl_follows_the_record_expiry() {
    // Proves: the TTL in Redis is the record's `expiry_date` (as
    // OnInactivity and AtDateTime set it), at most REDIS_SESSION_TIMEOUT
    // (OnSessionEnd's two weeks); a save that moves the expiry earlier,
    // with or without a change of data, brings the TTL and the expiry
    // index entry down with it; an expiry in the past ends the session.
    let ctx = TestContext::new().await;
    let adapter = TowerSessionsStore::new(ctx.store.clone());
    let timeout = ctx.config.session_timeout.as_millis() as i64;
    let now = OffsetDateTime::now_utc();

    let mut ten = record(in_ms(now, 600_000));
    adapter.create(&mut ten).await.expect("create");
    let sid = adapter
        .resolve(&ten.id)
        .await
        .expect("resolve")
        .expect("alias");
    assert!(near(pttl(&ctx, &sid).await, 600_000, 2_000));
    let loaded = adapter.load(&ten.id).await.expect("load").expect("found");
    assert!(
        (loaded.expiry_date - in_ms(now, 600_000))
            .whole_milliseconds()
            .abs()
            < 2_000,
        "a loaded record carries the store's deadline: {}",
        loaded.expiry_date
    );

    let mut weeks = record(now + cookie::time::Duration::weeks(2));
    adapter.create(&mut weeks).await.expect("create");
    let long = adapter
        .resolve(&weeks.id)
        .await
        .expect("resolve")
        .expect("alias");
    assert!(
        near(pttl(&ctx, &long).await, timeout, 2_000),
        "clamped to the store's timeout"
    );

    // set_expiry to five minutes, no data changed: one `touched` event.
    let mut shorter = loaded.clone();
    shorter.expiry_date = in_ms(OffsetDateTime::now_utc(), 300_000);
    adapter.save(&shorter).await.expect("save");
    assert!(near(pttl(&ctx, &sid).await, 300_000, 2_000));
    assert_eq!(
        events(&ctx, &sid)
            .await
            .last()
            .map(|e| e.0.clone())
            .as_deref(),
        Some("touched")
    );
    // A change with an expiry two minutes ahead: `updated`, and the expiry
    // entry (a lower bound of the deadline in the lean layout) comes down.
    let mut changed = adapter.load(&ten.id).await.expect("load").expect("found");
    changed.data.insert("b".to_owned(), json!(2));
    changed.expiry_date = in_ms(OffsetDateTime::now_utc(), 120_000);
    adapter.save(&changed).await.expect("save");
    let left = pttl(&ctx, &sid).await;
    assert!(near(left, 120_000, 2_000), "{left}");
    assert_eq!(
        events(&ctx, &sid)
            .await
            .last()
            .map(|e| e.0.clone())
            .as_deref(),
        Some("updated")
    );
    let score = ctx.expiry_score(&sid).await.expect("filed") as i64;
    let deadline = chrono::Utc::now().timestamp_millis() + left;
    assert!(
        score <= deadline + 50,
        "entry {score} after the deadline {deadline}"
    );
    // A save that moves the expiry later by less than a touch interval
    // writes nothing.
    let before = ctx.stream_len().await;
    let mut same = adapter.load(&ten.id).await.expect("load").expect("found");
    same.expiry_date = in_ms(OffsetDateTime::now_utc(), 121_000);
    adapter.save(&same).await.expect("save");
    assert_eq!(ctx.stream_len().await, before);

    // An expiry in the past: the session is over.
    let mut past = adapter.load(&ten.id).await.expect("load").expect("found");
    past.expiry_date = in_ms(OffsetDateTime::now_utc(), -1_000);
    adapter.save(&past).await.expect("save");
    assert_eq!(adapter.load(&ten.id).await.expect("load"), None);
    ctx.eventually(
        "the session key to run out",
        Duration::from_secs(2),
        || async { ctx.store.get(&sid).await.expect("get").is_none() },
    )
    .await;
}

#[tokio::test]
async fn reads_slide_only_as_far_as_the_record_allows() {
    // Proves: loads slide the deadline like the store's own reads (one
    // `touched` event once a touch interval passed) for a record whose
    // expiry is past the timeout (OnSessionEnd), never past the record's
    // expiry (AtDateTime), and not at all for OnInactivity, whose deadline
    // moves only when tower-sessions saves.
    let ctx = TestContext::with(|c| {
        c.with_session_timeout(Duration::from_secs(60))
            .with_touch_interval(Duration::from_millis(200))
    })
    .await;
    let adapter = TowerSessionsStore::new(ctx.store.clone());
    let now = OffsetDateTime::now_utc();
    let mut session_end = record(now + cookie::time::Duration::weeks(2));
    let mut inactivity = record(in_ms(now, 30_000));
    let at = in_ms(now, 61_200);
    let mut at_date = record(at);
    for r in [&mut session_end, &mut inactivity, &mut at_date] {
        adapter.create(r).await.expect("create");
    }
    let ids = [
        adapter
            .resolve(&session_end.id)
            .await
            .expect("resolve")
            .expect("alias"),
        adapter
            .resolve(&inactivity.id)
            .await
            .expect("resolve")
            .expect("alias"),
        adapter
            .resolve(&at_date.id)
            .await
            .expect("resolve")
            .expect("alias"),
    ];
    // Longer than the touch interval, and than the 1 s that separates the
    // AtDateTime record's expiry from its first deadline.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let before: Vec<i64> = futures::future::join_all(ids.iter().map(|id| pttl(&ctx, id))).await;
    for r in [&session_end, &inactivity, &at_date] {
        adapter.load(&r.id).await.expect("load").expect("found");
    }
    assert_eq!(kinds(&ctx, &ids[0]).await, ["created", "touched"]);
    assert!(pttl(&ctx, &ids[0]).await > before[0] + 1_000, "slid");
    assert_eq!(
        kinds(&ctx, &ids[1]).await,
        ["created"],
        "OnInactivity: not on reads"
    );
    assert!(pttl(&ctx, &ids[1]).await <= before[1]);
    assert_eq!(kinds(&ctx, &ids[2]).await, ["created", "touched"]);
    let cap = (at - OffsetDateTime::now_utc()).whole_milliseconds() as i64;
    let left = pttl(&ctx, &ids[2]).await;
    assert!(left > before[2], "slid: {left} vs {}", before[2]);
    assert!(
        left <= cap + 100,
        "not past the record's expiry: {left} vs {cap}"
    );
}

#[tokio::test]
async fn on_inactivity_under_the_layer_sets_the_ttl() {
    // Proves: with tower-sessions' own layer and `Expiry::OnInactivity`,
    // the session in Redis lives as long as the cookie's Max-Age says.
    let ctx = TestContext::new().await;
    let adapter = TowerSessionsStore::new(ctx.store.clone());
    let app = Router::new()
        .route(
            "/set",
            get(|s: Extension<TowerSession>| async move {
                s.insert("k", 1).await.expect("insert");
                "ok"
            }),
        )
        .layer(
            SessionManagerLayer::new(adapter.clone())
                .with_secure(false)
                .with_expiry(Expiry::OnInactivity(cookie::time::Duration::minutes(10))),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let res = reqwest::get(format!("http://{addr}/set"))
        .await
        .expect("GET");
    server.abort();
    let set_cookie = res
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .expect("a cookie");
    let cookie = cookie::Cookie::parse(set_cookie).expect("cookie");
    assert_eq!(cookie.max_age(), Some(cookie::time::Duration::minutes(10)));
    let id: Id = cookie.value().parse().expect("id");
    let sid = adapter.resolve(&id).await.expect("resolve").expect("alias");
    assert!(near(pttl(&ctx, &sid).await, 600_000, 2_000));
}
