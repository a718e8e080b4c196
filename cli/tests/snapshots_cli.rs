//! `vedfolnir-sessions snapshots rebuild` as a subprocess, on both real
//! databases: the log is the truth, so every snapshot that was damaged or
//! lost comes back as the fold of its events; the command is idempotent;
//! `session destroy` during a recovery reaches a session Redis lost.

use std::process::{Command, Output};
use std::time::Duration;

use redis::AsyncCommands as _;
use sea_orm::{ConnectionTrait as _, EntityTrait as _};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use vedfolnir_sessions::audit::entity::session_snapshots;
use vedfolnir_sessions::audit::{AuditConsumer, AuditSink, ConsumerConfig};
use vedfolnir_sessions::{Changes, DestroyReason, NewSession};
use vedfolnir_tests::TestContext;
use vedfolnir_tests::db::{Backend, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_vedfolnir-sessions");

fn cli(ctx: &TestContext, db: &TestDb, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("REDIS_URL", vedfolnir_tests::redis_url())
        .env("REDIS_SESSION_PREFIX", &ctx.config.session_prefix)
        .env("REDIS_EVENT_STREAM", &ctx.config.event_stream)
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("run vedfolnir-sessions")
}

fn cli_json(ctx: &TestContext, db: &TestDb, args: &[&str]) -> Value {
    let out = cli(ctx, db, args);
    assert!(
        out.status.success(),
        "{args:?} failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

async fn drain(ctx: &TestContext, db: &TestDb) {
    let sink = AuditSink::new(
        db.db.clone(),
        ctx.config.session_timeout,
        ctx.config.event_stream.clone(),
    );
    let cfg = ConsumerConfig {
        block: Duration::from_millis(20),
        retention: Duration::from_secs(600),
        ..ConsumerConfig::default()
    };
    let mut c = AuditConsumer::new(&ctx.config, sink, cfg)
        .await
        .expect("consumer");
    c.ensure_group().await.expect("group");
    let token = CancellationToken::new();
    while c.step(&token).await.expect("step") > 0 {}
}

async fn snapshots(db: &TestDb) -> Vec<session_snapshots::Model> {
    let mut rows = session_snapshots::Entity::find()
        .all(&db.db)
        .await
        .expect("snapshots");
    rows.sort_by(|a, b| a.session_id.cmp(&b.session_id));
    rows
}

/// Everything but the time the row was written.
fn essence(rows: &[session_snapshots::Model]) -> Vec<Value> {
    rows.iter()
        .map(|r| {
            json!([
                r.session_id,
                r.user_id,
                r.state,
                r.seq,
                format!("{:?}", r.status),
                r.expires_at.map(|t| t.timestamp_millis())
            ])
        })
        .collect()
}

async fn rebuild_restores_every_damaged_or_lost_snapshot(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let mut ids = Vec::new();
    for n in 0..6 {
        let c = ctx
            .store
            .create(NewSession::for_user(n, format!("u{n}")))
            .await
            .expect("create");
        for k in 0..3 {
            ctx.store
                .update(&c.session_id, Changes::new().with_set(format!("k{k}"), k))
                .await
                .expect("update");
        }
        ids.push(c.session_id);
    }
    ctx.store
        .destroy(&ids[5], DestroyReason::Logout)
        .await
        .expect("destroy");
    drain(&ctx, &db).await;
    let truth = essence(&snapshots(&db).await);
    assert_eq!(truth.len(), 6);

    // Damage: a lost row, a corrupt state, a wrong seq, an ended session
    // marked live.
    let sql = |s: &str| s.to_owned();
    db.db
        .execute_unprepared(&sql(&format!(
            "DELETE FROM session_snapshots WHERE session_id = '{}'",
            ids[0]
        )))
        .await
        .expect("delete");
    db.db
        .execute_unprepared(&format!(
            "UPDATE session_snapshots SET state = '{{not json' WHERE session_id = '{}'",
            ids[1]
        ))
        .await
        .expect("corrupt");
    db.db
        .execute_unprepared(&format!(
            "UPDATE session_snapshots SET seq = 99 WHERE session_id = '{}'",
            ids[2]
        ))
        .await
        .expect("seq");
    db.db
        .execute_unprepared(&format!(
            "UPDATE session_snapshots SET status = 'live' WHERE session_id = '{}'",
            ids[5]
        ))
        .await
        .expect("status");
    assert_ne!(essence(&snapshots(&db).await), truth);

    let summary = cli_json(&ctx, &db, &["snapshots", "rebuild"]);
    assert_eq!(summary["sessions"], 6);
    assert_eq!(summary["events"], 25);
    assert_eq!(summary["rebuilt"], 4, "{summary}");
    assert_eq!(summary["unchanged"], 2);
    assert_eq!(summary["gapped"], 0);
    assert_eq!(essence(&snapshots(&db).await), truth);
    // Idempotent.
    let again = cli_json(&ctx, &db, &["snapshots", "rebuild"]);
    assert_eq!(again["rebuilt"], 0);
    assert_eq!(again["unchanged"], 6);
    // One session alone, and an unknown one (exit 1).
    let one = cli_json(
        &ctx,
        &db,
        &["snapshots", "rebuild", "--session", ids[3].as_str()],
    );
    assert_eq!(one["sessions"], 1);
    let unknown = vedfolnir_sessions::Token::generate().session_id();
    let out = cli(
        &ctx,
        &db,
        &["snapshots", "rebuild", "--session", unknown.as_str()],
    );
    assert_eq!(out.status.code(), Some(1));
    // Then verify works as before.
    let out = cli(&ctx, &db, &["verify"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A gap in one history: folded up to the gap, and reported.
    db.db
        .execute_unprepared(&format!(
            "DELETE FROM session_events WHERE session_id = '{}' AND seq = 3",
            ids[4]
        ))
        .await
        .expect("gap");
    let gapped = cli_json(&ctx, &db, &["snapshots", "rebuild"]);
    assert_eq!(gapped["gapped"], 1);
    assert_eq!(gapped["gapped_sessions"], json!([ids[4].as_str()]));
    let row = session_snapshots::Entity::find_by_id(ids[4].as_str().to_owned())
        .one(&db.db)
        .await
        .expect("row")
        .expect("exists");
    assert_eq!(row.seq, 2, "folded up to the gap");
}

/// `session destroy` through the CLI, with `DATABASE_URL` set, while Redis
/// recovers: the session Redis lost is ended, the replay does not bring it
/// back, and the command leaves no healing lock behind.
async fn session_destroy_reaches_a_session_redis_lost(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let store = ctx.store.clone().with_audit(AuditSink::new(
        db.db.clone(),
        ctx.config.session_timeout,
        ctx.config.event_stream.clone(),
    ));
    let c = store
        .create(NewSession::for_user(7, "seven"))
        .await
        .expect("create");
    let keys = ctx.keys().await;
    let _: () = ctx.conn().del(keys).await.expect("lose redis data");
    let out = cli_json(
        &ctx,
        &db,
        &[
            "session",
            "destroy",
            c.session_id.as_str(),
            "--reason",
            "admin",
        ],
    );
    assert_eq!(out["destroyed"], true);
    // The command found the partition recovering and left the replay to the
    // processes that stay: no healing lock of a process that has exited
    // holds them up (before, the command started a replay in the background
    // and exited, and its lock held every healer up for 15 s).
    let healing = store.keys().part(0).healing.clone();
    let left: bool = ctx.conn().exists(&healing).await.expect("exists");
    assert!(!left, "no healing lock left behind by the command");
    assert!(
        store.heal().await.expect("heal").is_some(),
        "the next healer replays at once"
    );
    assert_eq!(store.get(&c.session_id).await.expect("get"), None);
    let exists: bool = ctx
        .conn()
        .exists(ctx.session_key(&c.session_id))
        .await
        .expect("exists");
    assert!(!exists);
}

vedfolnir_tests::on_both_backends!(
    rebuild_restores_every_damaged_or_lost_snapshot,
    session_destroy_reaches_a_session_redis_lost,
);
