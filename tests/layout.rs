//! How live sessions are laid out in Redis, against the real Redis.
//!
//! - The lean layout: a live session far from its deadline is its key, an
//!   entry in the expiry index at the look-ahead before its deadline (a lower
//!   bound, under the id's first 30 bytes with the last two in the score)
//!   and an entry in its user's index under the id's 32 bytes; no ledger.
//!   An update writes the key and the stream and nothing else. Entries filed
//!   under the 32 bytes before are read, filed again under the 30, and
//!   removed with the session's end.
//! - The reaper files a due entry again from the key's real TTL; within the
//!   look-ahead it records the session's version and user (its ledger), a
//!   write keeps that record current, and the `expired` event carries the
//!   version and user of the last write. A session whose record the reaper
//!   never made (it was down through the look-ahead) gets nothing from it:
//!   its end is the database sweep's.
//! - A rolling upgrade: the previous release's script (kept as
//!   `tests/fixtures/previous/session.lua`) and this release in the ledger
//!   layout write, read, end and expire each other's sessions in one
//!   namespace; then the lean layout takes over sessions the ledger layout
//!   wrote, and ends each of a user's sessions once whichever member form
//!   indexes it.
//! - The script is a Redis Functions library: a Redis that does not have it
//!   (a restart without persistence, `FUNCTION FLUSH`) is given it by the
//!   next call, which then succeeds.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use redis::AsyncCommands as _;
use serde_json::{Map, Value, json};
use uuid::Uuid;
use vedfolnir_sessions::config::Layout;
use vedfolnir_sessions::event::{Event, EventKind, SCHEMA_VERSION};
use vedfolnir_sessions::keys::Keys;
use vedfolnir_sessions::reaper::{Reaper, ReaperConfig};
use vedfolnir_sessions::session::user_id_of;
use vedfolnir_sessions::time::Timestamp;
use vedfolnir_sessions::{Changes, DestroyReason, Error, NewSession, Record, SessionId, Token};
use vedfolnir_tests::TestContext;

const MS: i64 = 1;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The state an update must leave alone: every key of the namespace but
/// the session key and the stream, with the sorted sets' contents.
async fn side_state(ctx: &TestContext, id: &SessionId) -> BTreeMap<String, String> {
    let mut conn = ctx.conn();
    let mut out = BTreeMap::new();
    let skip = [
        ctx.session_key(id),
        ctx.store.keys().for_session(id).stream.clone(),
    ];
    for k in ctx.keys().await {
        if skip.contains(&k) {
            continue;
        }
        let t: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .expect("type");
        let v = match t.as_str() {
            "zset" => {
                let m: Vec<(Vec<u8>, f64)> =
                    conn.zrange_withscores(&k, 0, -1).await.expect("zrange");
                format!("{m:?}")
            }
            "string" => conn.get::<_, String>(&k).await.expect("get"),
            other => other.to_owned(),
        };
        out.insert(k, v);
    }
    out
}

fn ledger_key(ctx: &TestContext, id: &SessionId) -> String {
    ctx.store.keys().ledger(id)
}

async fn ledger(ctx: &TestContext, id: &SessionId) -> Option<String> {
    ctx.conn()
        .get(ledger_key(ctx, id))
        .await
        .expect("get ledger")
}

/// Makes a session's expiry entry due now, under whichever member form it
/// is filed: the reaper's visit, without waiting for it.
async fn make_due(ctx: &TestContext, id: &SessionId) {
    ctx.refile_expiry(id, 0).await;
}

/// Shortens a key's remaining life, as time passing would.
async fn age(ctx: &TestContext, id: &SessionId, remaining_ms: i64) {
    let ok: bool = ctx
        .conn()
        .pexpire(ctx.session_key(id), remaining_ms)
        .await
        .expect("pexpire");
    assert!(ok, "the key exists");
}

/// Lets a session's key run out now, as its deadline passing would, and
/// waits (bounded) until Redis has dropped it.
async fn run_out(ctx: &TestContext, id: &SessionId) {
    age(ctx, id, 1).await;
    let key = ctx.session_key(id);
    ctx.eventually("the key to go", Duration::from_secs(5), || {
        let (mut conn, key) = (ctx.conn(), key.clone());
        async move { !conn.exists::<_, bool>(&key).await.expect("exists") }
    })
    .await;
}

/// The deadline an `expired` stream entry carries, ms.
fn deadline_of(end: &HashMap<String, String>) -> i64 {
    let payload: Value = serde_json::from_str(&end["payload"]).expect("payload");
    let at: chrono::DateTime<chrono::Utc> = payload["deadline"]
        .as_str()
        .expect("deadline")
        .parse()
        .expect("a time");
    at.timestamp_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_writes_the_key_and_the_stream_only() {
    let ctx = TestContext::new().await;
    let c = ctx
        .store
        .create(NewSession::for_user(7, "lean"))
        .await
        .expect("create");
    let id = &c.session_id;
    assert_eq!(
        ledger(&ctx, id).await,
        None,
        "no ledger while the deadline is far"
    );
    // The expiry entry: the id's first 30 bytes, its last two in the
    // score, at the look-ahead before the deadline.
    let (member, score) = ctx.expiry_entry(id).await.expect("filed");
    assert_eq!(member, id.expiry_member(), "filed under the 30 bytes");
    let in_32: Option<f64> = ctx
        .conn()
        .zscore(ctx.expiry_key(id), &id.to_bytes()[..])
        .await
        .expect("zscore");
    assert_eq!(in_32, None, "one entry");
    let want = now_ms() + 7_200_000 - 300_000;
    assert_eq!(
        score,
        id.expiry_score(score.ceil() as i64),
        "the id's score"
    );
    let score = score as i64;
    assert!((score - want).abs() < 2_000 * MS, "{score} vs {want}");
    let in_user: Option<f64> = ctx
        .conn()
        .zscore(
            ctx.store.keys().for_session(id).user("7"),
            &id.to_bytes()[..],
        )
        .await
        .expect("zscore");
    assert!(in_user.is_some(), "in its user's index under the 32 bytes");

    let before = side_state(&ctx, id).await;
    let stream_before = ctx.stream_len().await;
    let s = ctx
        .store
        .update(id, Changes::new().with_set("theme", "dark"))
        .await
        .expect("update");
    assert_eq!(s.version(), 2);
    let touched = ctx.store.touch(id).await.expect("touch");
    assert_eq!(touched.version(), 3);
    assert_eq!(
        side_state(&ctx, id).await,
        before,
        "an update and a touch write nothing but the key and the stream"
    );
    assert_eq!(ctx.stream_len().await, stream_before + 2);
    let json: String = ctx.conn().get(ctx.session_key(id)).await.expect("get");
    assert!(json.ends_with(r#""_version":3}"#), "{json}");
    let ttl: i64 = ctx.conn().pttl(ctx.session_key(id)).await.expect("pttl");
    assert!(ttl > 7_190_000, "the TTL was refreshed: {ttl}");

    // A user change moves the session between user indexes.
    ctx.store
        .update(id, Changes::new().with_set("user_id", 8))
        .await
        .expect("new user");
    let keys = ctx.store.keys().for_session(id);
    let old: Vec<Vec<u8>> = ctx
        .conn()
        .zrange(keys.user("7"), 0, -1)
        .await
        .expect("zrange");
    let new: Vec<Vec<u8>> = ctx
        .conn()
        .zrange(keys.user("8"), 0, -1)
        .await
        .expect("zrange");
    assert!(old.is_empty(), "left the old user's index");
    assert_eq!(new, vec![id.to_bytes().to_vec()]);
    // An end without a ledger: the script answers with the JSON and the
    // store ends it knowing its version and user.
    assert!(
        ctx.store
            .destroy(id, DestroyReason::Logout)
            .await
            .expect("destroy")
    );
    let events = ctx.events_of(id).await;
    let last = events.last().expect("events");
    assert_eq!(last["type"], "destroyed");
    assert_eq!(last["seq"], "5");
    assert_eq!(last["user_id"], "8");
    assert_eq!(ledger(&ctx, id).await.as_deref(), Some("5|destroyed|8"));
    assert_eq!(ctx.expiry_score(id).await, None);
    let new: Vec<Vec<u8>> = ctx
        .conn()
        .zrange(keys.user("8"), 0, -1)
        .await
        .expect("zrange");
    assert!(new.is_empty(), "left its user's index");
}

/// A namespace of sessions that live 6 s with a look-ahead of 3 s, and its
/// reaper.
async fn short_lived() -> (TestContext, Reaper) {
    let ctx = TestContext::with(|c| {
        c.with_session_timeout(Duration::from_secs(6))
            .with_expiry_lookahead(Duration::from_secs(3))
    })
    .await;
    let reaper = Reaper::new(ctx.store.clone(), ReaperConfig::default());
    (ctx, reaper)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_records_the_version_near_the_deadline_and_ends_with_the_last_write() {
    let (ctx, reaper) = short_lived().await;
    let c = ctx
        .store
        .create(NewSession::for_user(4, "near"))
        .await
        .expect("create");
    let id = &c.session_id;
    assert_eq!(ledger(&ctx, id).await, None);
    // Not due: nothing happens.
    assert_eq!(reaper.sweep().await.expect("sweep"), 0);
    assert_eq!(ledger(&ctx, id).await, None);

    // Due while the key still has more than the look-ahead: filed again at
    // the look-ahead before the deadline, nothing recorded.
    make_due(&ctx, id).await;
    assert_eq!(reaper.sweep().await.expect("sweep"), 0);
    assert_eq!(ledger(&ctx, id).await, None);
    let score = ctx.expiry_score(id).await.expect("filed") as i64;
    let pttl: i64 = ctx.conn().pttl(ctx.session_key(id)).await.expect("pttl");
    let want = now_ms() + pttl - 3_000;
    assert!((score - want).abs() < 1_000, "{score} vs {want}");

    // Within the look-ahead: the version and user are recorded, the entry
    // moves to the deadline.
    age(&ctx, id, 2_000).await;
    make_due(&ctx, id).await;
    assert_eq!(reaper.sweep().await.expect("sweep"), 0);
    assert_eq!(ledger(&ctx, id).await.as_deref(), Some("1|live|4"));
    let score = ctx.expiry_score(id).await.expect("filed") as i64;
    assert!(
        (score - (now_ms() + 2_000)).abs() < 1_000,
        "at the deadline: {score}"
    );
    let ledger_ttl: i64 = ctx.conn().pttl(ledger_key(&ctx, id)).await.expect("pttl");
    let tomb = ctx.config.tombstone_ttl.as_millis() as i64;
    assert!((ledger_ttl - 2_000 - tomb).abs() < 1_000, "{ledger_ttl}");

    // A write in the window keeps the record current.
    ctx.store
        .update(id, Changes::new().with_set("cart", 1))
        .await
        .expect("update");
    assert_eq!(ledger(&ctx, id).await.as_deref(), Some("2|live|4"));

    // The write pushed the deadline out of the look-ahead: the next visit
    // drops the record and files the entry from the new TTL.
    make_due(&ctx, id).await;
    assert_eq!(reaper.sweep().await.expect("sweep"), 0);
    assert_eq!(ledger(&ctx, id).await, None);

    // Near the deadline again, then past it: one `expired` event, at the
    // version after the last write, for the session's user.
    ctx.store
        .update(id, Changes::new().with_set("cart", 2))
        .await
        .expect("update");
    age(&ctx, id, 300).await;
    make_due(&ctx, id).await;
    assert_eq!(reaper.sweep().await.expect("sweep"), 0);
    assert_eq!(ledger(&ctx, id).await.as_deref(), Some("3|live|4"));
    let deadline = now_ms() + 300;
    assert_eq!(sweep_until_one_expires(&reaper).await, 1);
    assert_eq!(reaper.sweep().await.expect("sweep"), 0, "only once");
    let events = ctx.events_of(id).await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str()).collect();
    assert_eq!(types, ["created", "updated", "updated", "expired"]);
    let end = events.last().expect("end");
    assert_eq!(end["seq"], "4");
    assert_eq!(end["user_id"], "4");
    let at = deadline_of(end);
    assert!(
        (at - deadline).abs() < 1_000,
        "the event carries the deadline: {at}"
    );
    assert_eq!(ledger(&ctx, id).await.as_deref(), Some("4|expired|4"));
    assert_eq!(ctx.expiry_score(id).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_record_was_never_made_is_left_to_the_database_sweep() {
    let ctx = TestContext::new().await;
    let reaper = Reaper::new(ctx.store.clone(), ReaperConfig::default());
    let c = ctx
        .store
        .create(NewSession::for_user(5, "missed"))
        .await
        .expect("create");
    let id = &c.session_id;
    // The reaper was down through the whole look-ahead: the key is gone
    // and nothing in Redis knows the version.
    run_out(&ctx, id).await;
    make_due(&ctx, id).await;
    assert_eq!(reaper.sweep().await.expect("sweep"), 0);
    assert!(
        ctx.events_of(id)
            .await
            .iter()
            .all(|e| e["type"] != "expired"),
        "no end with a version Redis does not know"
    );
    assert_eq!(ctx.expiry_score(id).await, None, "the entry is dropped");
    // The session is gone for the application all the same.
    assert_eq!(ctx.store.get(id).await.expect("get"), None);
    let err = ctx
        .store
        .update(id, Changes::new().with_set("x", 1))
        .await
        .expect_err("gone");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

/// The previous release's script, driven the way that release drove it.
struct Previous {
    script: redis::Script,
    keys: Keys,
    ctx_conn: vedfolnir_sessions::conn::RedisConn,
    ttl_ms: u64,
    tomb_ms: u64,
}

impl Previous {
    fn new(ctx: &TestContext) -> Self {
        Previous {
            script: redis::Script::new(include_str!("fixtures/previous/session.lua")),
            keys: ctx.store.keys().part(0).clone(),
            ctx_conn: ctx.conn(),
            ttl_ms: ctx.config.session_timeout.as_millis() as u64,
            tomb_ms: ctx.config.tombstone_ttl.as_millis() as u64,
        }
    }

    fn invocation(&self, op: &str) -> redis::ScriptInvocation<'_> {
        let mut inv = self.script.prepare_invoke();
        inv.key(&self.keys.stream)
            .key(&self.keys.expiry)
            .arg(op)
            .arg(&self.keys.session_prefix)
            .arg(&self.keys.ledger_prefix)
            .arg(&self.keys.user_prefix);
        inv
    }

    fn event(id: &SessionId, seq: u64, user: Option<String>, kind: EventKind) -> Event {
        Event {
            event_id: Uuid::now_v7(),
            session_id: id.clone(),
            seq,
            occurred_at: Timestamp::now(),
            user_id: user,
            schema: SCHEMA_VERSION,
            kind,
            traceparent: None,
        }
    }

    fn meta(inv: &mut redis::ScriptInvocation<'_>, e: &Event) {
        inv.arg(e.occurred_at.to_string())
            .arg(SCHEMA_VERSION)
            .arg("");
    }

    async fn create(&self, user: &str) -> (SessionId, Record) {
        let id = Token::generate().session_id();
        let mut fields = Map::new();
        fields.insert("user_id".to_owned(), json!(user));
        let e = Self::event(
            &id,
            1,
            Some(user.to_owned()),
            EventKind::Created {
                fields,
                imported: None,
                rotated_from: None,
            },
        );
        let s = Record::default().apply(&e);
        let mut inv = self.invocation("create");
        inv.arg(id.as_str())
            .arg(s.to_json())
            .arg(self.ttl_ms)
            .arg(self.tomb_ms)
            .arg(user)
            .arg(0)
            .arg(e.event_id.to_string())
            .arg(e.kind.payload_json());
        Self::meta(&mut inv, &e);
        let reply: Vec<String> = inv
            .invoke_async(&mut self.ctx_conn.clone())
            .await
            .expect("previous create");
        assert_eq!(reply[0], "ok", "{reply:?}");
        (id, s)
    }

    /// An update folded on `current`; the script's first reply word.
    async fn update(&self, id: &SessionId, current: &Record, key: &str, v: Value) -> String {
        let e = Self::event(
            id,
            current.version() + 1,
            user_id_of(current.data()),
            EventKind::Updated {
                set: Map::from_iter([(key.to_owned(), v)]),
                unset: Vec::new(),
            },
        );
        let next = current.apply(&e);
        let mut inv = self.invocation("write");
        inv.arg(id.as_str())
            .arg(current.version())
            .arg(next.to_json())
            .arg(self.ttl_ms)
            .arg(self.tomb_ms)
            .arg(user_id_of(next.data()).unwrap_or_default())
            .arg("updated")
            .arg(e.event_id.to_string())
            .arg(e.kind.payload_json());
        Self::meta(&mut inv, &e);
        let reply: Vec<String> = inv
            .invoke_async(&mut self.ctx_conn.clone())
            .await
            .expect("previous write");
        reply[0].clone()
    }

    async fn destroy(&self, id: &SessionId) -> String {
        let e = Self::event(
            id,
            0,
            None,
            EventKind::Destroyed {
                reason: DestroyReason::Logout,
            },
        );
        let mut inv = self.invocation("end");
        inv.arg(id.as_str())
            .arg(-1)
            .arg("destroyed")
            .arg("destroyed")
            .arg(self.tomb_ms)
            .arg(e.event_id.to_string())
            .arg(e.kind.payload_json());
        Self::meta(&mut inv, &e);
        let reply: Vec<String> = inv
            .invoke_async(&mut self.ctx_conn.clone())
            .await
            .expect("previous end");
        reply[0].clone()
    }
}

/// Sweeps until the reaper expires something (bounded: the session's key
/// runs out within seconds); how many that sweep expired.
async fn sweep_until_one_expires(reaper: &Reaper) -> usize {
    let limit = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = reaper.sweep().await.expect("sweep");
        if n > 0 {
            return n;
        }
        assert!(tokio::time::Instant::now() < limit, "nothing expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every event of a session in the stream, as (seq, type).
async fn history(ctx: &TestContext, id: &SessionId) -> Vec<(u64, String)> {
    ctx.events_of(id)
        .await
        .into_iter()
        .map(|e| (e["seq"].parse().expect("seq"), e["type"].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_layout_and_the_previous_release_share_a_namespace() {
    let ctx = TestContext::with(|c| {
        c.with_layout(Layout::Ledger)
            .with_session_timeout(Duration::from_secs(2))
    })
    .await;
    let prev = Previous::new(&ctx);
    let store = &ctx.store;

    // The previous release creates; this release reads, writes and ends.
    let (a, _) = prev.create("1").await;
    let s = store.get(&a).await.expect("get").expect("live");
    assert_eq!(s.user_id(), Some(json!("1")), "stored as the string it was");
    let s = store
        .update(&a, Changes::new().with_set("cart", 1))
        .await
        .expect("update");
    assert_eq!(s.version(), 2);
    assert_eq!(ledger(&ctx, &a).await.as_deref(), Some("2|live|1"));

    // This release creates; the previous one writes and ends.
    let b = store
        .create(NewSession::for_user(1, "b"))
        .await
        .expect("create")
        .session_id;
    assert_eq!(ledger(&ctx, &b).await.as_deref(), Some("1|live|1"));
    let json: String = ctx.conn().get(ctx.session_key(&b)).await.expect("get");
    let current = Record::from_json(&json).expect("json");
    assert_eq!(prev.update(&b, &current, "cart", json!(2)).await, "ok");
    let s = store.get(&b).await.expect("get").expect("live");
    assert_eq!((s.version(), s.get("cart")), (2, Some(&json!(2))));
    // Both index members are the hex the previous release reads.
    let members: Vec<String> = ctx
        .conn()
        .zrange(ctx.store.keys().part(0).user("1"), 0, -1)
        .await
        .expect("zrange");
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(members.contains(&a.to_string()) && members.contains(&b.to_string()));

    // Ends are absorbing across the two: neither brings the other's end back.
    assert_eq!(prev.destroy(&a).await, "ok");
    let err = store
        .update(&a, Changes::new().with_set("cart", 9))
        .await
        .expect_err("ended");
    assert!(matches!(err, Error::Ended { .. }), "{err}");
    assert!(
        store
            .destroy(&b, DestroyReason::Logout)
            .await
            .expect("destroy")
    );
    let current = Record::from_json(&json).expect("json");
    assert_eq!(prev.update(&b, &current, "cart", json!(3)).await, "ended");
    assert_eq!(
        history(&ctx, &a).await,
        [
            (1, "created".to_owned()),
            (2, "updated".to_owned()),
            (3, "destroyed".to_owned())
        ]
    );
    assert_eq!(
        history(&ctx, &b).await,
        [
            (1, "created".to_owned()),
            (2, "updated".to_owned()),
            (3, "destroyed".to_owned())
        ]
    );

    // A session the previous release created and wrote expires once through
    // this release's reaper, at the version of its last write.
    let (c, s) = prev.create("2").await;
    assert_eq!(prev.update(&c, &s, "cart", json!(1)).await, "ok");
    let reaper = Reaper::new(store.clone(), ReaperConfig::default());
    assert_eq!(sweep_until_one_expires(&reaper).await, 1);
    assert_eq!(
        history(&ctx, &c).await,
        [
            (1, "created".to_owned()),
            (2, "updated".to_owned()),
            (3, "expired".to_owned())
        ]
    );
    assert_eq!(ledger(&ctx, &c).await.as_deref(), Some("3|expired|2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lean_layout_takes_over_what_the_ledger_layout_wrote() {
    let ctx = TestContext::with(|c| {
        c.with_layout(Layout::Ledger)
            .with_session_timeout(Duration::from_secs(2))
    })
    .await;
    let lean_config = ctx
        .config
        .clone()
        .with_layout(Layout::Lean)
        .with_expiry_lookahead(Duration::from_millis(500));
    let lean = vedfolnir_sessions::SessionStore::connect(&lean_config)
        .await
        .expect("connect");
    let prev = Previous::new(&ctx);
    // Three sessions of user 3: by the previous release, by this release in
    // the ledger layout, by the lean layout.
    let (x, _) = prev.create("3").await;
    let y = ctx
        .store
        .create(NewSession::for_user(3, "y"))
        .await
        .expect("create")
        .session_id;
    let z = lean
        .create(NewSession::for_user(3, "z"))
        .await
        .expect("create")
        .session_id;
    assert_eq!(
        ledger(&ctx, &z).await,
        None,
        "the lean layout keeps no ledger"
    );
    // The lean layout writes the older sessions and keeps their ledgers
    // current.
    let s = lean
        .update(&x, Changes::new().with_set("cart", 1))
        .await
        .expect("update");
    assert_eq!(s.version(), 2);
    assert_eq!(ledger(&ctx, &x).await.as_deref(), Some("2|live|3"));
    // The ledger layout writes the lean session: it gets its ledger.
    ctx.store
        .update(&z, Changes::new().with_set("cart", 1))
        .await
        .expect("update");
    assert_eq!(ledger(&ctx, &z).await.as_deref(), Some("2|live|3"));
    // Logout everywhere finds each session once, whichever form indexes it.
    let mut ended = lean
        .destroy_all_for_user("3", DestroyReason::LogoutAll)
        .await
        .expect("logout everywhere");
    ended.sort();
    let mut want = vec![x.clone(), y.clone(), z.clone()];
    want.sort();
    assert_eq!(ended, want);
    for id in [&x, &y, &z] {
        let h = history(&ctx, id).await;
        let ends = h.iter().filter(|(_, t)| t == "destroyed").count();
        assert_eq!(ends, 1, "{id}: {h:?}");
        assert_eq!(lean.get(id).await.expect("get"), None);
    }
    let index: Vec<Vec<u8>> = ctx
        .conn()
        .zrange(ctx.store.keys().part(0).user("3"), 0, -1)
        .await
        .expect("zrange");
    assert!(index.is_empty(), "{index:?}");

    // A session of the ledger layout expires through the lean reaper.
    let w = ctx
        .store
        .create(NewSession::for_user(3, "w"))
        .await
        .expect("create")
        .session_id;
    let reaper = Reaper::new(lean.clone(), ReaperConfig::default());
    assert_eq!(sweep_until_one_expires(&reaper).await, 1);
    assert_eq!(
        history(&ctx, &w).await,
        [(1, "created".to_owned()), (2, "expired".to_owned())]
    );
}

/// A Redis without the library (flushed, or never given it) gets it from
/// the next call, and that call does what it was sent to do, once.
#[tokio::test]
async fn a_redis_without_the_library_is_given_it_by_the_next_call() {
    let server = vedfolnir_tests::redis_server::RedisServer::start().await;
    let mut admin = server.connection().await;
    let namespace = format!("vlib:{}:", Uuid::new_v4().simple());
    let config = vedfolnir_sessions::Config::default()
        .with_redis(
            vedfolnir_sessions::config::RedisTarget::parse("REDIS_URL", &server.url())
                .expect("url"),
        )
        .with_namespace(&namespace);
    let store = vedfolnir_sessions::SessionStore::connect(&config)
        .await
        .expect("store");
    let libraries = |mut c: redis::aio::MultiplexedConnection| async move {
        let list: Vec<redis::Value> = redis::cmd("FUNCTION")
            .arg("LIST")
            .query_async(&mut c)
            .await
            .expect("function list");
        list.len()
    };
    let c = store
        .create(NewSession::for_user(5, "five"))
        .await
        .expect("create on a Redis that never had the library");
    assert_eq!(libraries(admin.clone()).await, 1, "the call loaded it");
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await
        .expect("flush");
    assert_eq!(libraries(admin.clone()).await, 0);
    let s = store
        .update(&c.session_id, Changes::new().with_set("theme", "dark"))
        .await
        .expect("update after FUNCTION FLUSH");
    assert_eq!(s.version(), 2, "applied once");
    assert_eq!(libraries(admin.clone()).await, 1, "loaded again");
    let stream = store.keys().for_session(&c.session_id).stream.clone();
    let len: u64 = admin.xlen(&stream).await.expect("xlen");
    assert_eq!(len, 2, "one event per call");
    let now = store.get(&c.session_id).await.expect("get").expect("live");
    assert_eq!(now.get("theme"), Some(&json!("dark")));
}

/// Files a session's expiry entry as the lean layout filed it before its
/// entries took 30 bytes: under the id's 32 bytes, at a whole ms.
async fn file_as_before(ctx: &TestContext, id: &SessionId, at_ms: i64) {
    ctx.unindex(&ctx.expiry_key(id), id).await;
    let added: u64 = ctx
        .conn()
        .zadd(ctx.expiry_key(id), &id.to_bytes()[..], at_ms)
        .await
        .expect("zadd");
    assert_eq!(added, 1);
}

/// An upgrade: the entries the lean layout filed under the id's 32 bytes
/// (with whole-ms scores) are read by the reaper, filed again under the 30
/// bytes, expire once with the version of the last write, and go with the
/// session's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_entries_filed_under_the_32_bytes_are_read_and_filed_again() {
    let (ctx, reaper) = short_lived().await;
    let mut ids = Vec::new();
    for name in ["far", "near", "ended"] {
        let id = ctx
            .store
            .create(NewSession::for_user(9, name))
            .await
            .expect("create")
            .session_id;
        let score = ctx.expiry_score(&id).await.expect("filed");
        file_as_before(&ctx, &id, score.floor() as i64).await;
        ids.push(id);
    }
    let (far, near, ended) = (&ids[0], &ids[1], &ids[2]);
    let in_32 = |id: &SessionId| {
        let (mut conn, key, member) = (ctx.conn(), ctx.expiry_key(id), id.to_bytes());
        async move {
            let s: Option<f64> = conn.zscore(&key, &member[..]).await.expect("zscore");
            s
        }
    };

    // Due far from its deadline: filed again under the 30 bytes, at the
    // look-ahead before the deadline, and only there.
    file_as_before(&ctx, far, 0).await;
    assert_eq!(reaper.sweep().await.expect("sweep"), 0);
    let (member, score) = ctx.expiry_entry(far).await.expect("filed");
    assert_eq!(member, far.expiry_member());
    let pttl: i64 = ctx.conn().pttl(ctx.session_key(far)).await.expect("pttl");
    let want = now_ms() + pttl - 3_000;
    assert!((score as i64 - want).abs() < 1_000, "{score} vs {want}");
    assert_eq!(in_32(far).await, None, "one entry");
    // Filed under both forms (a server of the release before files it
    // again beside this release's entry): the due one is visited, and one
    // entry is left.
    let added: u64 = ctx
        .conn()
        .zadd(ctx.expiry_key(far), &far.to_bytes()[..], 0)
        .await
        .expect("zadd");
    assert_eq!(added, 1);
    assert_eq!(reaper.sweep().await.expect("sweep"), 0);
    assert_eq!(in_32(far).await, None, "the due entry was visited");
    let (member, again) = ctx.expiry_entry(far).await.expect("filed");
    assert_eq!(member, far.expiry_member());
    assert!((again - score).abs() < 1_000.0, "{again} vs {score}");

    // Near its deadline: the reaper records its version and user; then,
    // its key gone and its entry under the 32 bytes again, it expires once
    // with the version of its last write.
    ctx.store
        .update(near, Changes::new().with_set("cart", 2))
        .await
        .expect("update");
    age(&ctx, near, 2_000).await;
    file_as_before(&ctx, near, 0).await;
    assert_eq!(reaper.sweep().await.expect("sweep"), 0);
    assert_eq!(ledger(&ctx, near).await.as_deref(), Some("2|live|9"));
    let (member, _) = ctx.expiry_entry(near).await.expect("filed");
    assert_eq!(
        member,
        near.expiry_member(),
        "filed again under the 30 bytes"
    );
    // Its key gone early and its entry under the 32 bytes again, more than
    // a second away from the deadline its look tells (here: now, since the
    // key went before the look's deadline): filed again there under the 30
    // bytes, then expired once, carrying that deadline.
    run_out(&ctx, near).await;
    file_as_before(&ctx, near, 0).await;
    assert_eq!(reaper.sweep().await.expect("sweep"), 0);
    let (member, score) = ctx.expiry_entry(near).await.expect("filed");
    assert_eq!(
        member,
        near.expiry_member(),
        "filed again under the 30 bytes"
    );
    assert!(
        (score - now_ms() as f64).abs() < 2_000.0,
        "filed at the deadline: {score}"
    );
    assert_eq!(sweep_until_one_expires(&reaper).await, 1);
    assert_eq!(reaper.sweep().await.expect("sweep"), 0, "only once");
    let end = ctx.events_of(near).await.pop().expect("events");
    let at = deadline_of(&end);
    assert!(
        (at - now_ms()).abs() < 2_000,
        "the event carries the deadline: {at}"
    );
    assert_eq!(
        history(&ctx, near).await,
        [
            (1, "created".to_owned()),
            (2, "updated".to_owned()),
            (3, "expired".to_owned())
        ]
    );
    assert_eq!(ctx.expiry_entry(near).await, None);

    // An end removes the entry under the 32 bytes.
    assert!(in_32(ended).await.is_some());
    assert!(
        ctx.store
            .destroy(ended, DestroyReason::Logout)
            .await
            .expect("destroy")
    );
    assert_eq!(ctx.expiry_entry(ended).await, None, "no entry left");
}

/// Sweeps until every one of `ids` has an `expired` event (bounded); the
/// deadline each event carries, ms.
async fn reap_all(ctx: &TestContext, reaper: &Reaper, ids: &[&SessionId]) -> Vec<i64> {
    let limit = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        reaper.sweep().await.expect("sweep");
        let mut deadlines = Vec::new();
        for id in ids {
            let end = ctx
                .events_of(id)
                .await
                .into_iter()
                .find(|e| e["type"] == "expired");
            if let Some(end) = end {
                deadlines.push(deadline_of(&end));
            }
        }
        if deadlines.len() == ids.len() {
            return deadlines;
        }
        assert!(
            tokio::time::Instant::now() < limit,
            "not all expired: {deadlines:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A write with a time to live of its own, shorter than the timeout, is
/// reaped at its own deadline: an update (the lean layout lowers the
/// expiry entry it would otherwise leave alone), a touch and a create.
async fn a_short_ttl_is_reaped_at_its_own_deadline(layout: Layout) {
    let ctx = TestContext::with(|c| {
        c.with_layout(layout)
            .with_session_timeout(Duration::from_secs(120))
            .with_expiry_lookahead(Duration::from_secs(1))
    })
    .await;
    let reaper = Reaper::new(ctx.store.clone(), ReaperConfig::default());
    let updated = ctx
        .store
        .create(NewSession::for_user(5, "short"))
        .await
        .expect("create")
        .session_id;
    let touched = ctx
        .store
        .create(NewSession::for_user(6, "short"))
        .await
        .expect("create")
        .session_id;
    for id in [&updated, &touched] {
        let score = ctx.expiry_score(id).await.expect("filed") as i64;
        assert!(score > now_ms() + 60_000, "filed for the timeout: {score}");
    }
    // Longer than the look-ahead: the lean layout files it at the
    // look-ahead before the new deadline.
    let t_update = now_ms();
    ctx.store
        .update_with_ttl(
            &updated,
            Changes::new().with_set("x", 1),
            Duration::from_secs(3),
        )
        .await
        .expect("update");
    let score = ctx.expiry_score(&updated).await.expect("filed") as i64;
    assert!(score <= t_update + 3_100, "lowered: {score} vs {t_update}");
    // Shorter than the look-ahead: recorded and filed at the deadline.
    let t_touch = now_ms();
    ctx.store
        .touch_with_ttl(&touched, Duration::from_millis(800))
        .await
        .expect("touch");
    let score = ctx.expiry_score(&touched).await.expect("filed") as i64;
    assert!(score <= t_touch + 900, "lowered: {score} vs {t_touch}");
    let t_create = now_ms();
    let created = ctx
        .store
        .create_with_ttl(
            NewSession::for_user(7, "short"),
            Duration::from_millis(1_500),
        )
        .await
        .expect("create")
        .session_id;
    // A TTL past the timeout is the timeout.
    let long = ctx
        .store
        .create_with_ttl(NewSession::anonymous(), Duration::from_secs(86_400))
        .await
        .expect("create")
        .session_id;
    let left: i64 = ctx.conn().pttl(ctx.session_key(&long)).await.expect("pttl");
    assert!(left <= 120_000 && left > 110_000, "{left}");

    let deadlines = reap_all(&ctx, &reaper, &[&updated, &touched, &created]).await;
    for (deadline, want) in
        deadlines
            .into_iter()
            .zip([t_update + 3_000, t_touch + 800, t_create + 1_500])
    {
        assert!(
            (deadline - want).abs() < 1_000,
            "expired at {deadline}, its own deadline is {want}"
        );
    }
    let types: Vec<String> = ctx
        .events_of(&updated)
        .await
        .into_iter()
        .map(|e| e["type"].clone())
        .collect();
    assert_eq!(types, ["created", "updated", "expired"]);
    assert!(ctx.store.get(&long).await.expect("get").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_ttl_is_reaped_at_its_own_deadline_lean() {
    a_short_ttl_is_reaped_at_its_own_deadline(Layout::Lean).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_ttl_is_reaped_at_its_own_deadline_ledger() {
    a_short_ttl_is_reaped_at_its_own_deadline(Layout::Ledger).await;
}

/// The stream entry of each event of `id`, as Redis holds it: its fields in
/// order.
async fn entries_of(ctx: &TestContext, id: &SessionId) -> Vec<Vec<(String, String)>> {
    let stream = &ctx.store.keys().for_session(id).stream;
    let all: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut ctx.conn())
        .await
        .expect("xrange");
    all.into_iter()
        .map(|(_, fields)| fields)
        .filter(|f| f.iter().any(|(k, v)| k == "session_id" && v == id.as_str()))
        .collect()
}

/// The fields an entry of `a`'s history and the same entry of `b`'s may
/// differ in: its own id, the session's, its time and a touch's time.
fn comparable(entry: &[(String, String)]) -> Vec<(String, String)> {
    entry
        .iter()
        .map(|(k, v)| match k.as_str() {
            "event_id" | "session_id" | "occurred_at" => (k.clone(), String::new()),
            "payload" if v.contains("last_activity") => (k.clone(), String::new()),
            _ => (k.clone(), v.clone()),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hot_paths_write_what_the_whole_script_writes() {
    // `create`, and a write with the timeout and the user unchanged, take
    // the script's hot paths; a per-user limit and a time to live of the
    // call's own take `run`. Both histories must be the same entries, field
    // for field, and leave the same keys beside the session's.
    let ctx = TestContext::new().await;
    let quick = &ctx.store;
    let whole =
        vedfolnir_sessions::SessionStore::connect(&ctx.config.clone().with_max_per_user(50))
            .await
            .expect("store");
    let timeout = ctx.config.session_timeout;
    let own = timeout - Duration::from_secs(1);
    for new in [NewSession::for_user(7, "same"), NewSession::anonymous()] {
        let a = quick.create(new.clone()).await.expect("create").session_id;
        let b = whole.create(new).await.expect("create").session_id;
        let (sa, sb) = (ctx.expiry_score(&a).await, ctx.expiry_score(&b).await);
        let (sa, sb) = (sa.expect("filed") as i64, sb.expect("filed") as i64);
        assert!((sa - sb).abs() < 2_000, "filed alike: {sa} vs {sb}");
        for x in [&a, &b] {
            assert_eq!(ledger(&ctx, x).await, None, "no ledger at create");
        }
        quick
            .update(&a, Changes::new().with_set("cart", 3).with_unset("gone"))
            .await
            .expect("update");
        whole
            .update_with_ttl(
                &b,
                Changes::new().with_set("cart", 3).with_unset("gone"),
                own,
            )
            .await
            .expect("update");
        quick.touch(&a).await.expect("touch");
        whole.touch_with_ttl(&b, own).await.expect("touch");
        let ea: Vec<_> = entries_of(&ctx, &a)
            .await
            .iter()
            .map(|e| comparable(e))
            .collect();
        let eb: Vec<_> = entries_of(&ctx, &b)
            .await
            .iter()
            .map(|e| comparable(e))
            .collect();
        assert_eq!(ea.len(), 3, "{ea:?}");
        assert_eq!(ea, eb, "the same entries, field for field");
        let mut stored = Vec::new();
        for x in [&a, &b] {
            let json: String = ctx.conn().get(ctx.session_key(x)).await.expect("get");
            assert!(json.ends_with(r#""_version":3}"#), "{json}");
            assert_eq!(ledger(&ctx, x).await, None, "no ledger after writes");
            stored.push(serde_json::from_str::<Value>(&json).expect("json"));
        }
        let (ja, jb) = (&stored[0], &stored[1]);
        let keys = |j: &Value| {
            j.as_object()
                .expect("object")
                .keys()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(ja), keys(jb));
        assert_eq!(ja["cart"], jb["cart"]);

        // A look the reaper took is kept current by the hot path, with the
        // new deadline plus the tombstone time.
        let user = ja["user_id"]
            .as_i64()
            .map(|u| u.to_string())
            .unwrap_or_default();
        let _: () = ctx
            .conn()
            .set_ex(ledger_key(&ctx, &a), format!("3|live|{user}"), 5)
            .await
            .expect("set");
        quick
            .update(&a, Changes::new().with_set("cart", 4))
            .await
            .expect("update");
        assert_eq!(ledger(&ctx, &a).await, Some(format!("4|live|{user}")));
        let pttl: i64 = ctx.conn().pttl(ledger_key(&ctx, &a)).await.expect("pttl");
        let want = (timeout + ctx.config.tombstone_ttl).as_millis() as i64;
        assert!((pttl - want).abs() < 2_000, "{pttl} vs {want}");
        // An ended session refuses the hot path as it refuses `run`, also
        // to a writer holding the state from before the end.
        let before = quick.get(&a).await.expect("get").expect("live");
        assert!(
            quick
                .destroy(&a, DestroyReason::Logout)
                .await
                .expect("destroy")
        );
        let refused = quick
            .update_from(&a, before, Changes::new().with_set("cart", 5))
            .await;
        assert!(
            matches!(refused, Err(Error::Ended { .. } | Error::NotFound(_))),
            "{refused:?}"
        );
        assert_eq!(
            entries_of(&ctx, &a).await.len(),
            5,
            "nothing appended after the end"
        );
    }
}
