//! `vedfolnir-sessions verify` against the real Redis and both databases,
//! through the CLI binary.
//!
//! - Under four concurrent writers, with the audit consumer and the reaper
//!   running, `verify` exits 0 every time: a session is read again before it
//!   is reported, so a write in flight is not a divergence.
//! - Each kind of damage to the state derived from the log (a ledger at the
//!   wrong seq, an expiry entry after the time the reaper must look, a
//!   session missing from the expiry index or from its user's index, a key
//!   without TTL, a snapshot that is not the fold of its events; in the
//!   ledger layout also a deleted ledger) makes it exit 1 naming the session
//!   and the problem; `verify --repair` puts it right from the log and says
//!   what it did, and `verify` exits 0 afterwards.
//! - A gap in a session's audit trail older than the grace period is a
//!   divergence that `--repair` cannot fix.
//! - A row whose `seq` is outside the i64 range is reported as a divergence
//!   of its session instead of stopping the whole check, and `replay --at`
//!   leaves it out and says so.
//! - On a Redis Cluster with partitions, every read and repair of a session's
//!   derived state stays in its partition's slot.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng as _;
use redis::AsyncCommands as _;
use sea_orm::{ActiveModelTrait as _, ColumnTrait as _, EntityTrait as _, QueryFilter as _, Set};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use vedfolnir_sessions::audit::entity::{session_events, session_snapshots};
use vedfolnir_sessions::audit::{AuditConsumer, AuditSink, ConsumerConfig};
use vedfolnir_sessions::config::Layout;
use vedfolnir_sessions::reaper::{Reaper, ReaperConfig};
use vedfolnir_sessions::recovery::{self, VerifyOptions};
use vedfolnir_sessions::{Changes, DestroyReason, Error, NewSession, Platform, SessionId};
use vedfolnir_tests::db::{Backend, TestDb};
use vedfolnir_tests::{TestContext, Topology};

const BIN: &str = env!("CARGO_BIN_EXE_vedfolnir-sessions");

/// What one run of the CLI said.
#[derive(Debug)]
struct Run {
    code: i32,
    json: Value,
    stderr: String,
}

impl Run {
    /// session id → the kinds of divergence named for it.
    fn kinds(&self, list: &str) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for d in self.json[list].as_array().cloned().unwrap_or_default() {
            out.entry(d["session_id"].as_str().unwrap_or_default().to_owned())
                .or_default()
                .push(d["kind"].as_str().unwrap_or_default().to_owned());
        }
        out
    }
}

struct Fixture {
    ctx: TestContext,
    db: TestDb,
}

impl Fixture {
    async fn new(
        backend: Backend,
        tweak: impl FnOnce(vedfolnir_sessions::Config) -> vedfolnir_sessions::Config,
    ) -> Self {
        let ctx = TestContext::with(tweak).await;
        let db = TestDb::new(backend).await;
        Fixture { ctx, db }
    }

    fn sink(&self) -> AuditSink {
        AuditSink::new(
            self.db.db.clone(),
            self.ctx.config.session_timeout,
            self.ctx.config.event_stream.clone(),
        )
    }

    async fn consumer(&self, retention: Duration) -> AuditConsumer {
        let cfg = ConsumerConfig {
            block: Duration::from_millis(20),
            retention,
            ..ConsumerConfig::default()
        };
        let mut c = AuditConsumer::new(&self.ctx.config, self.sink(), cfg)
            .await
            .expect("consumer");
        c.ensure_group().await.expect("group");
        c
    }

    /// Steps an audit consumer until a read finds nothing new.
    async fn drain(&self) {
        let mut c = self.consumer(Duration::from_secs(600)).await;
        let token = CancellationToken::new();
        for _ in 0..1000 {
            if c.step(&token).await.expect("step") == 0 {
                return;
            }
        }
        panic!("the consumer never caught up");
    }

    /// Runs the CLI binary on this test's Redis namespace and database.
    async fn cli(&self, args: &[&str]) -> Run {
        let c = &self.ctx.config;
        let out = tokio::process::Command::new(BIN)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("REDIS_URL", vedfolnir_tests::redis_url())
            .env("REDIS_SESSION_PREFIX", &c.session_prefix)
            .env("REDIS_EVENT_STREAM", &c.event_stream)
            .env(
                "REDIS_SESSION_TIMEOUT",
                c.session_timeout.as_secs().to_string(),
            )
            .env(
                "SESSION_TOMBSTONE_TTL",
                c.tombstone_ttl.as_secs().to_string(),
            )
            .env("SESSION_LAYOUT", c.layout.as_str())
            .env(
                "SESSION_EXPIRY_LOOKAHEAD_MS",
                c.expiry_lookahead.as_millis().to_string(),
            )
            .env("DATABASE_URL", &self.db.url)
            .output()
            .await
            .expect("run vedfolnir-sessions");
        let stdout = String::from_utf8_lossy(&out.stdout);
        Run {
            code: out.status.code().unwrap_or(-1),
            json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn verify(&self, args: &[&str]) -> Run {
        let mut all = vec!["verify"];
        all.extend_from_slice(args);
        self.cli(&all).await
    }

    fn ledger_key(&self, id: &SessionId) -> String {
        self.ctx.store.keys().ledger(id)
    }

    fn user_key(&self, id: &SessionId, user: &str) -> String {
        self.ctx.store.keys().for_session(id).user(user)
    }
}

// ---------------------------------------------------------------------------
// Under load

/// One app server: creates, changes and ends sessions as fast as it can
/// until `stop`, and leaves a few to idle out.
async fn writer(
    store: vedfolnir_sessions::SessionStore,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    seed: u64,
) {
    let mut own: Vec<SessionId> = Vec::new();
    let mut n = seed;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let roll = rand::rng().random_range(0..100);
        if own.len() < 4 || roll < 8 {
            let user = rand::rng().random_range(1..6);
            let c = store
                .create(NewSession::for_user(user, "writer"))
                .await
                .unwrap_or_else(|e| panic!("writer {seed}: create: {e}"));
            own.push(c.session_id);
            done.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let pick = rand::rng().random_range(0..own.len());
        let id = own[pick].clone();
        let result: Result<(), Error> = match roll {
            8..=11 => store.destroy(&id, DestroyReason::Logout).await.map(|_| {
                own.swap_remove(pick);
            }),
            12..=15 => store
                .rotate(&id, Changes::new().with_set("csrf_token", n))
                .await
                .map(|r| own[pick] = r.session_id),
            16..=19 => {
                // Left alone from now on: it idles out and the reaper ends it.
                own.swap_remove(pick);
                Ok(())
            }
            20..=29 => store.touch(&id).await.map(|_| ()),
            30..=34 => store
                .switch_platform(
                    &id,
                    Platform {
                        platform_connection_id: (n % 7) as i64,
                        platform_name: "p".to_owned(),
                        platform_type: "mastodon".to_owned(),
                        platform_instance_url: "https://example.com".to_owned(),
                    },
                )
                .await
                .map(|_| ()),
            _ => store
                .update(&id, Changes::new().with_set("n", n).with_set("w", seed))
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => {
                done.fetch_add(1, Ordering::Relaxed);
            }
            // It idled out between two writes: gone, as it should be.
            Err(Error::NotFound(_) | Error::Ended { .. }) => {
                own.retain(|o| *o != id);
            }
            Err(e) => panic!("writer {seed}: {e}"),
        }
    }
}

async fn verify_under_load_exits_0_every_time(backend: Backend) {
    // A short timeout, so that sessions idle out and the reaper ends them
    // while verify runs.
    let f = Fixture::new(backend, |c| c.with_session_timeout(Duration::from_secs(2))).await;
    let stop_worker = CancellationToken::new();
    // The worker: the audit consumer (trimming everything it acknowledged,
    // so entries leave the stream as soon as they are audited) and the reaper.
    let consumer = f.consumer(Duration::ZERO).await;
    let consumer = tokio::spawn(consumer.run(stop_worker.clone()));
    let reaper = Reaper::new(
        f.ctx.other_store().await,
        ReaperConfig {
            interval: Duration::from_millis(100),
            batch: 500,
        },
    );
    let reaper = tokio::spawn(reaper.run(stop_worker.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let store = f.ctx.other_store().await;
        writers.push(tokio::spawn(writer(
            store,
            stop.clone(),
            done.clone(),
            w * 1_000_000,
        )));
    }
    // Let some history build up first.
    f.ctx
        .eventually("the writers to start", Duration::from_secs(20), || {
            let done = done.clone();
            async move { done.load(Ordering::Relaxed) >= 200 }
        })
        .await;
    let mut failures = Vec::new();
    for round in 0..6 {
        let before = done.load(Ordering::Relaxed);
        let run = f.verify(&[]).await;
        let during = done.load(Ordering::Relaxed) - before;
        println!(
            "round {round}: exit {} while {during} mutations ran; checked {}, agree {}, lag {}",
            run.code,
            run.json["checked"],
            run.json["agree"],
            run.json["lag"].as_array().map_or(0, Vec::len)
        );
        assert!(during > 0, "the writers kept writing during verify");
        if run.code != 0 {
            failures.push(format!("round {round}: {:#} {}", run.json, run.stderr));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    assert!(
        failures.is_empty(),
        "verify failed under load:\n{}",
        failures.join("\n")
    );
    // At rest, once the audit trail has caught up: no lag either.
    let settled = f.ctx.store.clone();
    let db = f.db.db.clone();
    f.ctx
        .eventually(
            "the audit trail to catch up",
            Duration::from_secs(30),
            || {
                let (store, db) = (settled.clone(), db.clone());
                async move {
                    vedfolnir_sessions::recovery::verify(&store, &db)
                        .await
                        .is_ok_and(|r| r.ok && r.lag.is_empty())
                }
            },
        )
        .await;
    let run = f.verify(&[]).await;
    assert_eq!(run.code, 0, "{:#} {}", run.json, run.stderr);
    stop_worker.cancel();
    consumer.await.expect("consumer task").expect("consumer");
    reaper.await.expect("reaper task").expect("reaper");
}

// ---------------------------------------------------------------------------
// Damage

/// Seven sessions of seven users, each updated once, audited; `verify`
/// exits 0.
async fn seven_sessions(f: &Fixture) -> Vec<SessionId> {
    let store = &f.ctx.store;
    let mut ids = Vec::new();
    for u in 0..7 {
        let c = store
            .create(NewSession::for_user(u, format!("user{u}")))
            .await
            .expect("create");
        store
            .update(&c.session_id, Changes::new().with_set("n", u))
            .await
            .expect("update");
        ids.push(c.session_id);
    }
    f.drain().await;
    let run = f.verify(&[]).await;
    assert_eq!(
        run.code, 0,
        "healthy before the damage: {:#} {}",
        run.json, run.stderr
    );
    assert_eq!(run.json["agree"], 7, "{:#}", run.json);
    ids
}

/// Forges session `id`'s snapshot: it is no longer the fold of its events.
async fn forge_snapshot(f: &Fixture, id: &SessionId) {
    let snap = session_snapshots::Entity::find_by_id(id.to_string())
        .one(&f.db.db)
        .await
        .expect("read snapshot")
        .expect("snapshot");
    let forged = snap.state.replace("\"n\":5", "\"n\":55");
    assert_ne!(forged, snap.state);
    let mut row: session_snapshots::ActiveModel = snap.into();
    row.state = Set(forged);
    row.update(&f.db.db).await.expect("forge snapshot");
}

/// `verify` names each damage (`expected`: session index, kind) and no
/// healthy session; `--repair` puts each right from the log, after which
/// `verify` exits 0 and every session takes a write at version 3.
async fn named_then_repaired(f: &Fixture, ids: &[SessionId], expected: &[(usize, &str)]) {
    let run = f.verify(&[]).await;
    assert_eq!(
        run.code, 1,
        "verify must fail: {:#} {}",
        run.json, run.stderr
    );
    assert_eq!(run.json["ok"], false);
    let named = run.kinds("divergences");
    for &(i, kind) in expected {
        assert!(
            named
                .get(ids[i].as_str())
                .is_some_and(|k| k.iter().any(|k| k == kind)),
            "session {i} should be named with {kind}: {:#}",
            run.json
        );
    }
    assert!(
        !named.contains_key(ids[6].as_str()),
        "the healthy session is not named: {:#}",
        run.json
    );
    assert!(run.stderr.contains("divergence"), "{}", run.stderr);

    // Repair from the log, and say what was done.
    let run = f.verify(&["--repair"]).await;
    assert_eq!(
        run.code, 0,
        "everything here derives from the log: {:#} {}",
        run.json, run.stderr
    );
    let repaired = run.kinds("repaired");
    for &(i, kind) in expected {
        assert!(
            repaired
                .get(ids[i].as_str())
                .is_some_and(|k| k.iter().any(|k| k == kind)),
            "session {i} should be repaired ({kind}): {:#}",
            run.json
        );
    }
    let run = f.verify(&[]).await;
    assert_eq!(
        run.code, 0,
        "after the repair: {:#} {}",
        run.json, run.stderr
    );
    assert_eq!(run.json["agree"], 7, "{:#}", run.json);

    // The application works, and versions continue (the key's version is
    // the truth; a ledger follows it).
    for id in ids {
        let s = f
            .ctx
            .store
            .update(id, Changes::new().with_set("after", true))
            .await
            .expect("write after the repair");
        assert_eq!(s.version(), 3, "{id}");
    }
    f.drain().await;
    let run = f.verify(&[]).await;
    assert_eq!(run.code, 0, "{:#} {}", run.json, run.stderr);
}

/// The lean layout (the default): a live session is its key, a lower bound
/// of its deadline in the expiry index and an entry in its user's index.
async fn each_kind_of_damage_is_named_and_repaired(backend: Backend) {
    let f = Fixture::new(backend, |c| c).await;
    let ids = seven_sessions(&f).await;
    let mut conn = f.ctx.conn();
    // Nothing but the key and the index entries: no ledger while the
    // deadline is far.
    for id in &ids {
        let ledger: bool = conn.exists(f.ledger_key(id)).await.expect("exists");
        assert!(
            !ledger,
            "a live session far from its deadline has no ledger"
        );
    }
    // 0: a ledger at the wrong seq (it would give the reaper a wrong
    // version for the `expired` event).
    let _: () = conn
        .set_ex(f.ledger_key(&ids[0]), "9|live|0", 7_200)
        .await
        .expect("set ledger");
    // 1: the expiry entry after the look-ahead before the deadline: the key
    // could expire before the reaper records its version and user.
    let late = chrono::Utc::now().timestamp_millis() + 7_300_000;
    f.ctx.refile_expiry(&ids[1], late).await;
    // 2: missing from the expiry index.
    f.ctx.unindex(&f.ctx.expiry_key(&ids[2]), &ids[2]).await;
    // 3: the key made persistent.
    let _: () = conn
        .persist(f.ctx.session_key(&ids[3]))
        .await
        .expect("persist");
    // 4: missing from its user's index.
    f.ctx.unindex(&f.user_key(&ids[4], "4"), &ids[4]).await;
    // 5: the snapshot is not the fold of its events.
    forge_snapshot(&f, &ids[5]).await;
    // 6 stays healthy.
    named_then_repaired(
        &f,
        &ids,
        &[
            (0, "ledger_seq"),
            (1, "expiry_index_wrong"),
            (2, "expiry_index_missing"),
            (3, "ttl_missing"),
            (4, "user_index_missing"),
            (5, "snapshot"),
        ],
    )
    .await;
    let ttl: i64 = conn.pttl(f.ctx.session_key(&ids[3])).await.expect("pttl");
    assert!(ttl > 0, "the TTL is back");
}

/// The ledger layout (a rolling upgrade from the release before the lean
/// one): every live session has a ledger, which writes need.
async fn each_kind_of_damage_is_named_and_repaired_in_the_ledger_layout(backend: Backend) {
    let f = Fixture::new(backend, |c| c.with_layout(Layout::Ledger)).await;
    let ids = seven_sessions(&f).await;
    let store = &f.ctx.store;
    let mut conn = f.ctx.conn();
    // 0: the ledger deleted.
    let _: () = conn.del(f.ledger_key(&ids[0])).await.expect("del ledger");
    // 1: the ledger at the wrong seq.
    let _: () = conn
        .set_options(
            f.ledger_key(&ids[1]),
            "9|live|1",
            redis::SetOptions::default().with_expiration(redis::SetExpiry::KEEPTTL),
        )
        .await
        .expect("set ledger");
    // 2: missing from the expiry index.
    f.ctx.unindex(&f.ctx.expiry_key(&ids[2]), &ids[2]).await;
    // 3: the key made persistent.
    let _: () = conn
        .persist(f.ctx.session_key(&ids[3]))
        .await
        .expect("persist");
    // 4: missing from its user's index.
    f.ctx.unindex(&f.user_key(&ids[4], "4"), &ids[4]).await;
    // 5: the snapshot is not the fold of its events.
    forge_snapshot(&f, &ids[5]).await;
    // 6 stays healthy.
    named_then_repaired(
        &f,
        &ids,
        &[
            (0, "ledger_missing"),
            (1, "ledger_seq"),
            (2, "expiry_index_missing"),
            (3, "ttl_missing"),
            (4, "user_index_missing"),
            (5, "snapshot"),
        ],
    )
    .await;
    for id in &ids {
        let ledger: String = conn.get(f.ledger_key(id)).await.expect("ledger");
        let s = store.get(id).await.expect("get").expect("live");
        assert!(
            ledger.starts_with(&format!("{}|live|", s.version())),
            "{ledger}"
        );
    }
}

/// A Redis key whose JSON was changed behind the store's back, at the
/// version the log has: `--repair` writes the fold of the log back.
async fn a_tampered_key_is_rewritten_from_the_log(backend: Backend) {
    let f = Fixture::new(backend, |c| c).await;
    let c = f
        .ctx
        .store
        .create(NewSession::for_user(1, "admin").with("role", "viewer"))
        .await
        .expect("create");
    f.drain().await;
    let key = f.ctx.session_key(&c.session_id);
    let mut conn = f.ctx.conn();
    let raw: String = conn.get(&key).await.expect("get");
    let forged = raw.replace("viewer", "admin");
    let _: () = conn
        .set_options(
            &key,
            &forged,
            redis::SetOptions::default().with_expiration(redis::SetExpiry::KEEPTTL),
        )
        .await
        .expect("tamper");
    let run = f.verify(&[]).await;
    assert_eq!(run.code, 1, "{:#}", run.json);
    assert_eq!(
        run.kinds("divergences").get(c.session_id.as_str()),
        Some(&vec!["different".to_owned()]),
        "{:#}",
        run.json
    );
    let run = f.verify(&["--repair"]).await;
    assert_eq!(run.code, 0, "{:#} {}", run.json, run.stderr);
    let back: String = conn.get(&key).await.expect("get");
    assert_eq!(back, raw, "the key holds the fold of the log again");
}

/// A live session whose key is gone while its deadline is ahead: `missing`,
/// and `--repair` puts the key back from the snapshot with its remaining TTL.
async fn a_missing_key_is_restored(backend: Backend) {
    let f = Fixture::new(backend, |c| c).await;
    let c = f
        .ctx
        .store
        .create(NewSession::for_user(2, "two"))
        .await
        .expect("create");
    f.drain().await;
    let key = f.ctx.session_key(&c.session_id);
    let mut conn = f.ctx.conn();
    let raw: String = conn.get(&key).await.expect("get");
    let ttl_before: i64 = conn.pttl(&key).await.expect("pttl");
    let _: () = conn.del(&key).await.expect("del");
    let run = f.verify(&[]).await;
    assert_eq!(run.code, 1, "{:#}", run.json);
    assert!(
        run.kinds("divergences")[c.session_id.as_str()].contains(&"missing".to_owned()),
        "{:#}",
        run.json
    );
    let run = f.verify(&["--repair"]).await;
    assert_eq!(run.code, 0, "{:#} {}", run.json, run.stderr);
    let back: String = conn.get(&key).await.expect("get");
    assert_eq!(back, raw);
    let ttl: i64 = conn.pttl(&key).await.expect("pttl");
    assert!(
        ttl > 0 && (ttl_before - ttl).abs() < 5_000,
        "remaining TTL {ttl} vs {ttl_before}"
    );
}

async fn an_old_seq_gap_is_a_divergence(backend: Backend) {
    let f = Fixture::new(backend, |c| c).await;
    let c = f
        .ctx
        .store
        .create(NewSession::for_user(3, "three"))
        .await
        .expect("create");
    for n in 0..3 {
        f.ctx
            .store
            .update(&c.session_id, Changes::new().with_set("n", n))
            .await
            .expect("update");
    }
    f.drain().await;
    // seq 2 of 4 disappears from the audit trail.
    let deleted = session_events::Entity::delete_many()
        .filter(session_events::Column::SessionId.eq(c.session_id.as_str()))
        .filter(session_events::Column::Seq.eq(2))
        .exec(&f.db.db)
        .await
        .expect("delete");
    assert_eq!(deleted.rows_affected, 1);
    // Younger than the grace period it may still be filling in: lag.
    let run = f.verify(&[]).await;
    assert_eq!(run.code, 0, "{:#} {}", run.json, run.stderr);
    assert_eq!(
        run.kinds("lag").get(c.session_id.as_str()),
        Some(&vec!["seq_gap".to_owned()]),
        "{:#}",
        run.json
    );
    // Older than the grace period: a divergence, which the log cannot repair.
    for args in [&["--grace", "0"][..], &["--grace", "0", "--repair"][..]] {
        let run = f.verify(args).await;
        assert_eq!(run.code, 1, "{args:?}: {:#} {}", run.json, run.stderr);
        assert!(
            run.kinds("divergences")[c.session_id.as_str()].contains(&"seq_gap".to_owned()),
            "{args:?}: {:#}",
            run.json
        );
        let d = run.json["divergences"]
            .as_array()
            .expect("divergences")
            .iter()
            .find(|d| d["kind"] == "seq_gap")
            .expect("the gap")
            .clone();
        assert!(
            d["detail"].as_str().is_some_and(|t| t.contains("seq 2")),
            "the gap is named: {d}"
        );
    }
}

/// A session past its deadline whose end is not in the log, and which
/// Redis no longer knows (its ledger expired before any reaper ran): older
/// than the grace period it is `end_missing`, and `--repair` writes its end
/// the way the database sweep does.
async fn a_missing_end_is_named_and_written(backend: Backend) {
    let f = Fixture::new(backend, |c| {
        let mut c = c.with_session_timeout(Duration::from_secs(1));
        c.tombstone_ttl = Duration::from_secs(1);
        c
    })
    .await;
    let c = f
        .ctx
        .store
        .create(NewSession::for_user(6, "six"))
        .await
        .expect("create");
    f.drain().await;
    let ledger = f.ledger_key(&c.session_id);
    f.ctx
        .eventually("the ledger to expire", Duration::from_secs(10), || {
            let (mut conn, ledger) = (f.ctx.conn(), ledger.clone());
            async move { !conn.exists::<_, bool>(&ledger).await.expect("exists") }
        })
        .await;
    let deadline = session_snapshots::Entity::find_by_id(c.session_id.to_string())
        .one(&f.db.db)
        .await
        .expect("read")
        .and_then(|s| s.expires_at)
        .expect("a deadline");
    f.ctx
        .eventually(
            "the drain to prove the database current",
            Duration::from_secs(20),
            || async move {
                chrono::Utc::now() > deadline + vedfolnir_sessions::audit::partition::DRAIN_SLACK
            },
        )
        .await;
    f.drain().await;
    // Within the grace period: an end still to come, not a divergence.
    let run = f.verify(&[]).await;
    assert_eq!(run.code, 0, "{:#} {}", run.json, run.stderr);
    let run = f.verify(&["--grace", "0"]).await;
    assert_eq!(run.code, 1, "{:#} {}", run.json, run.stderr);
    assert_eq!(
        run.kinds("divergences").get(c.session_id.as_str()),
        Some(&vec!["end_missing".to_owned()]),
        "{:#}",
        run.json
    );
    let run = f.verify(&["--grace", "0", "--repair"]).await;
    assert_eq!(run.code, 0, "{:#} {}", run.json, run.stderr);
    assert_eq!(
        run.json["repaired"][0]["kind"], "end_missing",
        "{:#}",
        run.json
    );
    assert!(
        run.json["repaired"][0]["action"]
            .as_str()
            .is_some_and(|a| a.contains("audit database")),
        "{:#}",
        run.json
    );
    let events = session_events::Entity::find()
        .filter(session_events::Column::SessionId.eq(c.session_id.as_str()))
        .all(&f.db.db)
        .await
        .expect("events");
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["created", "expired"]);
    let run = f.verify(&["--grace", "0"]).await;
    assert_eq!(run.code, 0, "{:#} {}", run.json, run.stderr);
}

/// A row whose seq was written outside the i64 range (a u64 above it wraps
/// to a negative number): one divergence of that session, and the rest of
/// the database is still checked.
async fn a_row_with_a_seq_out_of_range_is_one_divergence(backend: Backend) {
    let f = Fixture::new(backend, |c| c).await;
    let bad = f
        .ctx
        .store
        .create(NewSession::for_user(4, "four"))
        .await
        .expect("create");
    let good = f
        .ctx
        .store
        .create(NewSession::for_user(5, "five"))
        .await
        .expect("create");
    f.drain().await;
    insert_out_of_range_row(&f.db, &bad.session_id).await;
    let run = f.verify(&[]).await;
    assert_eq!(run.code, 1, "{:#} {}", run.json, run.stderr);
    let named = run.kinds("divergences");
    assert_eq!(
        named.get(bad.session_id.as_str()),
        Some(&vec!["unreadable_event".to_owned()]),
        "{:#}",
        run.json
    );
    assert!(
        !named.contains_key(good.session_id.as_str()),
        "{:#}",
        run.json
    );
    assert_eq!(run.json["agree"], 1, "the other session is still checked");
}

/// The row an older build wrote for a stream entry whose seq was above the
/// i64 range: `seq as i64` made it negative.
async fn insert_out_of_range_row(db: &TestDb, id: &SessionId) {
    let seq = (u64::MAX / 2 + 2) as i64;
    assert!(seq < 0);
    session_events::ActiveModel {
        id: Default::default(),
        event_id: Set(uuid::Uuid::now_v7()),
        session_id: Set(id.to_string()),
        seq: Set(seq),
        event_type: Set("updated".to_owned()),
        user_id: Set(None),
        occurred_at: Set(chrono::Utc::now() - chrono::Duration::seconds(1)),
        recorded_at: Set(chrono::Utc::now()),
        stream_id: Set(Some("1-0".to_owned())),
        schema_version: Set(1),
        payload: Set(r#"{"set":{"x":1},"unset":[]}"#.to_owned()),
        traceparent: Set(None),
        source: Set(session_events::EventSource::Stream),
    }
    .insert(&db.db)
    .await
    .expect("insert the bad row");
}

/// `replay --at` skips the bad row, says so, and writes every session.
async fn replay_at_skips_a_row_out_of_range(backend: Backend) {
    let f = Fixture::new(backend, |c| c).await;
    let bad = f
        .ctx
        .store
        .create(NewSession::for_user(4, "four"))
        .await
        .expect("create");
    let good = f
        .ctx
        .store
        .create(NewSession::for_user(5, "five"))
        .await
        .expect("create");
    f.drain().await;
    insert_out_of_range_row(&f.db, &bad.session_id).await;
    let at = vedfolnir_sessions::time::Timestamp::now().to_string();
    let run = f.cli(&["replay", "--at", &at]).await;
    assert_eq!(run.code, 0, "{:#} {}", run.json, run.stderr);
    let sessions: Vec<&str> = run.json["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| s["session_id"].as_str().expect("id"))
        .collect();
    assert!(
        sessions.contains(&good.session_id.as_str()),
        "{:#}",
        run.json
    );
    assert!(
        sessions.contains(&bad.session_id.as_str()),
        "{:#}",
        run.json
    );
    let skipped = run.json["skipped"]
        .as_array()
        .expect("skipped rows are listed");
    assert_eq!(skipped.len(), 1, "{:#}", run.json);
    assert_eq!(skipped[0]["session_id"], bad.session_id.as_str());
    assert!(
        run.stderr.contains("skipped"),
        "and says so on stderr: {}",
        run.stderr
    );
    // One session only, through --session and --output.
    let out = std::env::temp_dir().join(format!("vtest-{}.json", uuid::Uuid::new_v4().simple()));
    let run = f
        .cli(&[
            "replay",
            "--at",
            &at,
            "--session",
            bad.session_id.as_str(),
            "--output",
            out.to_str().expect("utf-8 path"),
        ])
        .await;
    assert_eq!(run.code, 0, "{:#} {}", run.json, run.stderr);
    assert_eq!(run.json["sessions"], 1, "{:#}", run.json);
    assert_eq!(run.json["skipped"], 1, "{:#}", run.json);
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("output file")).expect("JSON");
    let _ = std::fs::remove_file(&out);
    assert_eq!(written["sessions"][0]["seq"], 1);
    assert_eq!(written["skipped"][0]["session_id"], bad.session_id.as_str());
}

vedfolnir_tests::on_both_backends!(
    verify_under_load_exits_0_every_time,
    each_kind_of_damage_is_named_and_repaired,
    each_kind_of_damage_is_named_and_repaired_in_the_ledger_layout,
    a_tampered_key_is_rewritten_from_the_log,
    a_missing_key_is_restored,
    a_missing_end_is_named_and_written,
    an_old_seq_gap_is_a_divergence,
    a_row_with_a_seq_out_of_range_is_one_divergence,
    replay_at_skips_a_row_out_of_range,
);

/// On a Redis Cluster with 16 partitions: the atomic read and the repair of
/// a session's derived state each stay in one slot, and damage in several
/// partitions is named and put right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_is_named_and_repaired_on_a_cluster() {
    let ctx = TestContext::on(Topology::Cluster).await;
    let db = TestDb::new(Backend::Sqlite).await;
    let f = Fixture { ctx, db };
    let mut ids = Vec::new();
    for u in 0..12 {
        let c = f
            .ctx
            .store
            .create(NewSession::for_user(u, "clustered"))
            .await
            .expect("create");
        ids.push(c.session_id);
    }
    // The audit consumer runs per partition: drain each.
    for p in 0..f.ctx.store.keys().partitions() {
        let keys = f.ctx.store.keys().part(p).clone();
        let sink = AuditSink::new(
            f.db.db.clone(),
            f.ctx.config.session_timeout,
            keys.stream.clone(),
        );
        let cfg = ConsumerConfig {
            block: Duration::from_millis(20),
            ..ConsumerConfig::default()
        };
        let mut c = AuditConsumer::for_partition(&f.ctx.config, &keys, sink, cfg)
            .await
            .expect("consumer");
        c.ensure_group().await.expect("group");
        let token = CancellationToken::new();
        while c.step(&token).await.expect("step") > 0 {}
    }
    let report = recovery::verify(&f.ctx.store, &f.db.db)
        .await
        .expect("verify");
    assert!(report.ok && report.agree == 12, "{report:?}");
    let mut conn = f.ctx.conn();
    // A ledger at the wrong seq, with the TTL a ledger has.
    let pttl: i64 = conn.pttl(f.ctx.session_key(&ids[0])).await.expect("pttl");
    let px = pttl as u64 + f.ctx.config.tombstone_ttl.as_millis() as u64;
    let _: () = conn
        .pset_ex(f.ledger_key(&ids[0]), "9|live|0", px)
        .await
        .expect("set ledger");
    let _: () = conn
        .persist(f.ctx.session_key(&ids[1]))
        .await
        .expect("persist");
    f.ctx.unindex(&f.ctx.expiry_key(&ids[2]), &ids[2]).await;
    let partitions: std::collections::BTreeSet<u32> = ids[..3]
        .iter()
        .map(|id| f.ctx.store.keys().partition_of(id))
        .collect();
    let report = recovery::verify(&f.ctx.store, &f.db.db)
        .await
        .expect("verify");
    let named: BTreeMap<&str, &str> = report
        .divergences
        .iter()
        .map(|d| (d.session_id.as_str(), d.kind.as_str()))
        .collect();
    assert_eq!(
        named,
        BTreeMap::from([
            (ids[0].as_str(), "ledger_seq"),
            (ids[1].as_str(), "ttl_missing"),
            (ids[2].as_str(), "expiry_index_missing"),
        ]),
        "in partitions {partitions:?}: {report:?}"
    );
    let opts = VerifyOptions {
        repair: true,
        ..VerifyOptions::default()
    };
    let repaired = recovery::verify_with(&f.ctx.store, &f.db.db, &opts)
        .await
        .expect("verify --repair");
    assert!(repaired.ok, "{repaired:?}");
    assert_eq!(repaired.repaired.len(), 3, "{repaired:?}");
    let report = recovery::verify(&f.ctx.store, &f.db.db)
        .await
        .expect("verify");
    assert!(report.ok && report.agree == 12, "{report:?}");
    f.ctx
        .store
        .update(&ids[0], Changes::new().with_set("after", true))
        .await
        .expect("a write after the repair");
}
