//! `vedfolnir-sessions migrate`, `history` and `replay --at` as subprocesses,
//! on a fresh SQLite file and a fresh PostgreSQL database, over events the
//! audit consumer recorded from the real Redis.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use vedfolnir_sessions::audit::{AuditConsumer, AuditSink, ConsumerConfig};
use vedfolnir_sessions::time::Timestamp;
use vedfolnir_sessions::{Changes, DestroyReason, NewSession, Platform};
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

fn cli_ok(ctx: &TestContext, db: &TestDb, args: &[&str]) -> String {
    let out = cli(ctx, db, args);
    assert!(
        out.status.success(),
        "{args:?} failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 on stdout")
}

fn cli_json(ctx: &TestContext, db: &TestDb, args: &[&str]) -> Value {
    serde_json::from_str(&cli_ok(ctx, db, args)).expect("JSON on stdout")
}

/// The rows of a `--json` history as (session_id, seq).
fn places(rows: &Value) -> Vec<(String, i64)> {
    rows.as_array()
        .expect("a JSON array")
        .iter()
        .map(|r| {
            (
                r["session_id"].as_str().expect("session_id").to_owned(),
                r["seq"].as_i64().expect("seq"),
            )
        })
        .collect()
}

/// An instant strictly after every event written so far (their times come
/// from this process's clock, in microseconds), and strictly before every
/// event written after it returns.
fn boundary() -> Timestamp {
    let last = Timestamp::now();
    loop {
        let t = Timestamp::now();
        if t > last {
            return t;
        }
        std::hint::spin_loop();
    }
}

/// Steps an in-process audit consumer until a read finds nothing new.
async fn audit(ctx: &TestContext, url: &str) {
    let db = vedfolnir_sessions::audit::db::connect(url)
        .await
        .expect("connect");
    let sink = AuditSink::new(
        db,
        ctx.config.session_timeout,
        ctx.config.event_stream.clone(),
    );
    let cfg = ConsumerConfig {
        block: Duration::from_millis(50),
        ..ConsumerConfig::default()
    };
    let mut c = AuditConsumer::new(&ctx.config, sink, cfg)
        .await
        .expect("consumer");
    c.ensure_group().await.expect("group");
    let token = CancellationToken::new();
    for _ in 0..100 {
        if c.step(&token).await.expect("step") == 0 {
            return;
        }
    }
    panic!("the consumer never caught up");
}

async fn migrate_then_history(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::blank(backend).await;
    let all = <migration::Migrator as migration::MigratorTrait>::migrations().len();

    // History refuses a database that was never migrated, and says why.
    let a_id = "a".repeat(64);
    let out = cli(&ctx, &db, &["history", &a_id, "--json"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vedfolnir-sessions migrate"), "{err}");

    // migrate applies everything once.
    let first = cli_json(&ctx, &db, &["migrate"]);
    assert_eq!(first["applied"], json!(all), "{first}");
    let again = cli_json(&ctx, &db, &["migrate"]);
    assert_eq!(again["applied"], json!(0), "{again}");
    let conn = vedfolnir_sessions::audit::db::connect(&db.url)
        .await
        .expect("connect");
    assert_eq!(migration::pending_count(&conn).await.expect("pending"), 0);
    conn.close().await.expect("close");

    // Two users; three phases separated by instants t1 and t2.
    let a = ctx
        .store
        .create(NewSession::for_user(7, "alice"))
        .await
        .expect("create")
        .session_id;
    let b = ctx
        .store
        .create(NewSession::for_user(8, "bob"))
        .await
        .expect("create")
        .session_id;
    ctx.store
        .update(&a, Changes::new().with_set("theme", "dark"))
        .await
        .expect("update");
    let t1 = boundary();
    ctx.store
        .update(
            &a,
            Changes::new().with_set("lang", "fr").with_unset("theme"),
        )
        .await
        .expect("update");
    ctx.store
        .switch_platform(
            &a,
            Platform {
                platform_connection_id: 123,
                platform_name: "My Platform".to_owned(),
                platform_type: "mastodon".to_owned(),
                platform_instance_url: "https://mastodon.example.com".to_owned(),
            },
        )
        .await
        .expect("switch");
    ctx.store
        .update(&b, Changes::new().with_set("n", 1))
        .await
        .expect("update");
    let t2 = boundary();
    ctx.store
        .update(&a, Changes::new().with_set("n", 2))
        .await
        .expect("update");
    ctx.store
        .destroy(&a, DestroyReason::Logout)
        .await
        .expect("destroy");
    ctx.store
        .update(&b, Changes::new().with_set("n", 3))
        .await
        .expect("update");
    audit(&ctx, &db.url).await;

    // A session's history: every event, in seq order, as the stream has it.
    let rows = cli_json(&ctx, &db, &["history", a.as_str(), "--json"]);
    let stream = ctx.events_of(&a).await;
    assert_eq!(stream.len(), 6);
    let rows = rows.as_array().expect("array").clone();
    assert_eq!(rows.len(), stream.len(), "{rows:?}");
    for (n, (row, entry)) in rows.iter().zip(&stream).enumerate() {
        assert_eq!(row["seq"], json!(n as i64 + 1), "{row}");
        assert_eq!(row["session_id"], json!(a.as_str()));
        assert_eq!(row["event_type"], json!(entry["type"]), "{row}");
        assert_eq!(row["occurred_at"], json!(entry["occurred_at"]), "{row}");
        let payload: Value = serde_json::from_str(&entry["payload"]).expect("payload");
        assert_eq!(row["payload"], payload, "{row}");
    }
    let types: Vec<&str> = rows
        .iter()
        .map(|r| r["event_type"].as_str().expect("event_type"))
        .collect();
    assert_eq!(
        types,
        [
            "created",
            "updated",
            "updated",
            "platform_switched",
            "updated",
            "destroyed"
        ]
    );
    assert_eq!(
        rows[2]["payload"],
        json!({"set": {"lang": "fr"}, "unset": ["theme"]})
    );
    assert_eq!(rows[5]["payload"], json!({"reason": "logout"}));

    // A user's history over [t1, t2): only that user's events of that window.
    let (since, until) = (t1.to_string(), t2.to_string());
    let window = cli_json(
        &ctx,
        &db,
        &[
            "history", "--user", "7", "--since", &since, "--until", &until, "--json",
        ],
    );
    assert_eq!(
        places(&window),
        [(a.to_string(), 3), (a.to_string(), 4)],
        "{window}"
    );
    let window_b = cli_json(
        &ctx,
        &db,
        &[
            "history", "--user", "8", "--since", &since, "--until", &until, "--json",
        ],
    );
    assert_eq!(places(&window_b), [(b.to_string(), 2)], "{window_b}");
    let since_t2 = cli_json(
        &ctx,
        &db,
        &["history", "--user", "8", "--since", &until, "--json"],
    );
    assert_eq!(places(&since_t2), [(b.to_string(), 3)], "{since_t2}");
    let until_t1 = cli_json(
        &ctx,
        &db,
        &["history", "--user", "8", "--until", &since, "--json"],
    );
    assert_eq!(places(&until_t1), [(b.to_string(), 1)], "{until_t1}");
    // Without bounds: all of the user's events, none of the other user's.
    let all_b = cli_json(&ctx, &db, &["history", "--user", "8", "--json"]);
    assert_eq!(
        places(&all_b),
        [(b.to_string(), 1), (b.to_string(), 2), (b.to_string(), 3)]
    );
    let expected_a: Vec<(String, i64)> = stream
        .iter()
        .filter(|e| e["user_id"] == "7")
        .map(|e| (a.to_string(), e["seq"].parse().expect("seq")))
        .collect();
    assert!(expected_a.len() >= 5, "{stream:?}");
    let all_a = cli_json(&ctx, &db, &["history", "--user", "7", "--json"]);
    assert_eq!(places(&all_a), expected_a);

    // The default output is a table naming each event type.
    let table = cli_ok(&ctx, &db, &["history", a.as_str()]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 7, "a header and six rows:\n{table}");
    assert!(
        lines[0].contains("SEQ") && lines[0].contains("TYPE"),
        "{table}"
    );
    for (line, ty) in lines[1..].iter().zip(types) {
        assert!(line.contains(ty), "{ty} missing from {line:?}");
    }
    assert!(serde_json::from_str::<Value>(&table).is_err(), "not JSON");

    // A bad bound is refused with the option's name.
    let out = cli(
        &ctx,
        &db,
        &["history", "--user", "7", "--since", "yesterday"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--since"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_then_history_on_sqlite() {
    migrate_then_history(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_then_history_on_postgres() {
    migrate_then_history(Backend::Postgres).await;
}

/// The CLI's convention: not found is exit 1. An id the audit trail has
/// never seen is not found for `history` and for `replay --at --session`; a
/// known session with nothing in the window is an empty answer.
async fn unknown_session_ids_exit_1(backend: Backend) {
    let ctx = TestContext::new().await;
    let db = TestDb::new(backend).await;
    let known = ctx
        .store
        .create(NewSession::for_user(9, "nine"))
        .await
        .expect("create")
        .session_id;
    audit(&ctx, &db.url).await;
    let unknown = vedfolnir_sessions::Token::generate().session_id();
    let now = Timestamp::now().to_string();

    for args in [
        vec!["history", unknown.as_str()],
        vec!["history", unknown.as_str(), "--json"],
        vec![
            "replay",
            "--at",
            now.as_str(),
            "--session",
            unknown.as_str(),
        ],
    ] {
        let out = cli(&ctx, &db, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line on stderr: {err}");
        assert!(
            err.contains("not found") && err.contains(unknown.as_str()),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }

    // The known session: found, and an empty window is an empty answer.
    let rows = cli_json(&ctx, &db, &["history", known.as_str(), "--json"]);
    assert_eq!(places(&rows), [(known.to_string(), 1)]);
    let later = boundary().to_string();
    let none = cli_json(
        &ctx,
        &db,
        &["history", known.as_str(), "--since", &later, "--json"],
    );
    assert_eq!(none, json!([]));
    let at = cli_json(
        &ctx,
        &db,
        &["replay", "--at", &now, "--session", known.as_str()],
    );
    assert_eq!(
        at["sessions"][0]["session_id"],
        json!(known.as_str()),
        "{at}"
    );
    assert_eq!(at["skipped"], json!([]), "{at}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_session_ids_exit_1_on_sqlite() {
    unknown_session_ids_exit_1(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_session_ids_exit_1_on_postgres() {
    unknown_session_ids_exit_1(Backend::Postgres).await;
}
