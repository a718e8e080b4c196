//! The example app server as a process: the binary `app_server`, which
//! Cargo builds before this test, started on a free port with its own users,
//! Redis namespace and audit database, and stopped with SIGTERM.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use vedfolnir_tests::TestContext;

const BIN: &str = env!("CARGO_BIN_EXE_app_server");

fn command(ctx: &TestContext, db: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("REDIS_URL", vedfolnir_tests::redis_url())
        .env("REDIS_SESSION_PREFIX", &ctx.config.session_prefix)
        .env("REDIS_EVENT_STREAM", &ctx.config.event_stream)
        .env(
            "DATABASE_URL",
            format!("sqlite://{}?mode=rwc", db.display()),
        )
        .env("APP_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn remove_sqlite(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

#[tokio::test]
async fn the_example_binary_serves_its_users_and_stops_on_sigterm() {
    // Proves: the binary reads APP_USERS (a password may contain `:`),
    // prints the user names (never the passwords) and its address, serves
    // login and /healthz, commits events to the audit database at
    // DATABASE_URL, never logs the cookie token, and exits cleanly on SIGTERM.
    let ctx = TestContext::new().await;
    let db =
        std::env::temp_dir().join(format!("vedfolnir-example-{}.sqlite", uuid::Uuid::new_v4()));
    let mut child = command(&ctx, &db)
        .env("APP_USERS", "alice:pa:ss:word:editor, bob:hunter2:user")
        .spawn()
        .expect("start the example");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut banner = Vec::new();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let line = stdout
                .next_line()
                .await
                .expect("read stdout")
                .expect("the example exited early");
            banner.push(line.clone());
            if let Some(a) = line.strip_prefix("vedfolnir example app listening on http://") {
                break a.to_owned();
            }
        }
    })
    .await
    .expect("the example started within 60 s");
    let users = stdout
        .next_line()
        .await
        .expect("read stdout")
        .expect("users line");
    assert_eq!(users, "users: alice, bob");
    assert!(!banner.join("\n").contains("hunter2"));

    let base = format!("http://{addr}");
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .expect("client");
    let health = client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), reqwest::StatusCode::OK);
    let res = client
        .post(format!("{base}/login"))
        .json(&json!({"username": "alice", "password": "pa:ss:word"}))
        .send()
        .await
        .expect("login");
    assert_eq!(res.status(), reqwest::StatusCode::OK);
    let token = res
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| cookie::Cookie::parse(v.to_owned()).ok())
        .map(|c| c.value().to_owned())
        .expect("session cookie");
    let me: Value = res.json().await.expect("json");
    assert_eq!(me["username"], "alice");
    assert_eq!(me["role"], "editor");
    let res = client
        .post(format!("{base}/login"))
        .json(&json!({"username": "admin", "password": "admin123"}))
        .send()
        .await
        .expect("login");
    assert_eq!(
        res.status(),
        reqwest::StatusCode::UNAUTHORIZED,
        "APP_USERS replaces the built-in table"
    );

    {
        use sea_orm::{EntityTrait as _, PaginatorTrait as _};
        let audit =
            vedfolnir_sessions::audit::db::connect(&format!("sqlite://{}?mode=rwc", db.display()))
                .await
                .expect("open the audit database");
        let n = vedfolnir_sessions::audit::entity::session_events::Entity::find()
            .count(&audit)
            .await
            .expect("count");
        assert_eq!(
            n,
            ctx.stream_len().await,
            "DB_SESSION_SYNC committed every event"
        );
        audit.close().await.ok();
    }

    let pid = child.id().expect("pid");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("stopped within 20 s of SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        tokio::io::AsyncReadExt::read_to_string(&mut e, &mut stderr)
            .await
            .expect("stderr");
    }
    assert!(stderr.contains("shutting down"), "{stderr}");
    assert!(!stderr.contains(&token), "the token was logged");
    assert!(!stderr.contains("pa:ss:word"), "a password was logged");
    remove_sqlite(&db);
}

#[tokio::test]
async fn a_bad_app_users_names_the_variable_not_the_password() {
    // Proves: a malformed APP_USERS stops the binary with an error that
    // names the variable and the entry, and never echoes a password.
    let ctx = TestContext::new().await;
    let db =
        std::env::temp_dir().join(format!("vedfolnir-example-{}.sqlite", uuid::Uuid::new_v4()));
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        command(&ctx, &db)
            .env("APP_USERS", "carol:s3cretpass:admin,dave:0therpass")
            .output(),
    )
    .await
    .expect("finished")
    .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("APP_USERS"), "{stderr}");
    assert!(stderr.contains("entry 2"), "{stderr}");
    assert!(!stderr.contains("0therpass") && !stderr.contains("s3cretpass"));
    remove_sqlite(&db);
}
