//! The operator CLI end to end, as a subprocess against the real Redis.

use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vedfolnir-sessions");

struct Cli {
    namespace: String,
    url: String,
}

impl Cli {
    fn new() -> Self {
        Cli {
            namespace: format!("vtest:{}:", uuid::Uuid::new_v4().simple()),
            url: vedfolnir_tests::redis_url(),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("REDIS_URL", &self.url)
            .env(
                "REDIS_SESSION_PREFIX",
                format!("{}session:", self.namespace),
            )
            .env("REDIS_EVENT_STREAM", format!("{}events", self.namespace));
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run the CLI")
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON on stdout")
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        vedfolnir_tests::delete_namespace(&self.namespace);
    }
}

#[test]
fn create_set_show_destroy() {
    let cli = Cli::new();
    let created = cli.json(&[
        "session",
        "create",
        "--user-id",
        "1",
        "--username",
        "admin",
        "--email",
        "admin@example.com",
        "--role",
        "admin",
    ]);
    let id = created["session_id"]
        .as_str()
        .expect("session_id")
        .to_owned();
    let token = created["token"].as_str().expect("token").to_owned();
    assert_eq!(id.len(), 64);
    assert!(token.len() >= 22);
    assert_eq!(created["session"]["user_id"], Value::from(1));
    assert_eq!(created["session"]["_version"], Value::from(1));

    let s = cli.json(&[
        "session",
        "set",
        &id,
        "theme=\"dark\"",
        "n=25",
        "plain=word",
    ]);
    assert_eq!(s["theme"], "dark");
    assert_eq!(s["n"], 25);
    assert_eq!(s["plain"], "word");
    let s = cli.json(&["session", "unset", &id, "n"]);
    assert!(s.get("n").is_none());
    let s = cli.json(&[
        "session",
        "switch-platform",
        &id,
        "--platform-connection-id",
        "123",
        "--platform-name",
        "My Platform",
        "--platform-type",
        "mastodon",
        "--platform-instance-url",
        "https://mastodon.example.com",
    ]);
    assert_eq!(s["platform_connection_id"], 123);

    let shown = cli.json(&["session", "show", &id]);
    assert_eq!(shown["_version"], 4);
    assert_eq!(shown["theme"], "dark");

    let list = cli.json(&["user", "sessions", "1"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    let stats = cli.json(&["stats"]);
    assert_eq!(stats["active_sessions"], 1);
    assert_eq!(stats["stream_length"], 4);
    assert_eq!(stats["top_users"][0]["user_id"], "1");

    let d = cli.json(&["session", "destroy", &id]);
    assert_eq!(d["destroyed"], true);
    assert_eq!(d["reason"], "admin");
    let out = cli.run(&["session", "show", &id]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err}");
    assert!(err.contains("destroyed"), "{err}");
    // The token was printed once and is stored nowhere.
    let client = redis::Client::open(cli.url.as_str()).expect("client");
    let mut conn = client.get_connection().expect("conn");
    let dump: Vec<Vec<String>> = redis::cmd("XRANGE")
        .arg(format!("{}events", cli.namespace))
        .arg("-")
        .arg("+")
        .query::<Vec<(String, Vec<String>)>>(&mut conn)
        .expect("xrange")
        .into_iter()
        .map(|(_, f)| f)
        .collect();
    assert_eq!(dump.len(), 5);
    assert!(!format!("{dump:?}").contains(&token));

    let ended = cli.json(&["user", "logout-all", "1"]);
    assert_eq!(ended["destroyed"].as_array().map(Vec::len), Some(0));
}

#[test]
fn bad_configuration_names_the_variable() {
    let cli = Cli::new();
    let out = cli
        .cmd(&["stats"])
        .env("REDIS_SESSION_TIMEOUT", "two hours")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("REDIS_SESSION_TIMEOUT") && err.contains("two hours"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);
    assert!(out.stdout.is_empty());

    let out = cli.run(&["session", "show", "not-an-id"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("64 lowercase hex"));
}

#[test]
fn a_password_in_redis_url_works_and_never_shows() {
    let cli = Cli::new();
    let user = format!("vtest_{}", uuid::Uuid::new_v4().simple());
    let password = format!("pw{}", uuid::Uuid::new_v4().simple());
    let client = redis::Client::open(cli.url.as_str()).expect("client");
    let mut conn = client.get_connection().expect("conn");
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(format!(">{password}"))
        .arg(format!("~{}*", cli.namespace))
        .arg("+@all")
        .query(&mut conn)
        .expect("acl setuser");
    let base = cli.url.trim_start_matches("redis://");
    let good = format!("redis://{user}:{password}@{base}");
    let out = cli
        .cmd(&["session", "create", "--user-id", "7", "--username", "u"])
        .env("REDIS_URL", &good)
        .env("RUST_LOG", "trace")
        .output()
        .expect("run");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    assert!(
        !all.contains(&password),
        "password leaked with RUST_LOG=trace"
    );

    let bad = format!("redis://{user}:wrong{password}@{base}");
    let out = cli
        .cmd(&["stats"])
        .env("REDIS_URL", &bad)
        .env("RUST_LOG", "trace")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !all.contains(&password),
        "password leaked on failure: {all}"
    );
    let _: redis::RedisResult<()> = redis::cmd("ACL").arg("DELUSER").arg(&user).query(&mut conn);
}

#[test]
fn health_reports_an_unreachable_redis() {
    let cli = Cli::new();
    let h = cli.json(&["health"]);
    assert_eq!(h["healthy"], true);
    assert!(h["latency_ms"].as_f64().expect("latency") >= 0.0);
    let out = cli
        .cmd(&["health"])
        .env("REDIS_URL", "redis://127.0.0.1:1/0")
        .env("REDIS_TIMEOUT_MS", "300")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let h: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(h["healthy"], false);
}
