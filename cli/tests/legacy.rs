//! `vedfolnir-sessions import-legacy` against the real Redis: the seed
//! application's `vedfolnir:session:<uuid4>` keys become event-sourced
//! sessions whose old cookie keeps working, with their remaining TTL, and
//! the raw-UUID keys are gone. Idempotent, resumable, `--dry-run`.

use std::process::Command;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use axum::routing::get;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tower::ServiceExt as _;
use vedfolnir_sessions::web::{Session, SessionLayer};
use vedfolnir_sessions::{Config, SessionStore};

const BIN: &str = env!("CARGO_BIN_EXE_vedfolnir-sessions");

struct Ns {
    namespace: String,
    redis: redis::Connection,
}

impl Ns {
    fn new() -> Self {
        let client = redis::Client::open(vedfolnir_tests::redis_url()).expect("redis url");
        Ns {
            namespace: format!("vtest:{}:", uuid::Uuid::new_v4().simple()),
            redis: client.get_connection().expect("connect to redis"),
        }
    }

    fn run(&self, args: &[&str]) -> Value {
        let out = Command::new(BIN)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("REDIS_URL", vedfolnir_tests::redis_url())
            .env(
                "REDIS_SESSION_PREFIX",
                format!("{}session:", self.namespace),
            )
            .env("REDIS_EVENT_STREAM", format!("{}events", self.namespace))
            .output()
            .expect("run the CLI");
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON on stdout")
    }

    fn raw_key(&self, uuid: &str) -> String {
        format!("{}session:{uuid}", self.namespace)
    }

    fn cmd<T: redis::FromRedisValue>(&mut self, cmd: &mut redis::Cmd) -> T {
        cmd.query(&mut self.redis).expect("redis command")
    }

    /// The stream entries of one session.
    fn events_of(&mut self, id: &str) -> Vec<std::collections::HashMap<String, String>> {
        let stream = format!("{}events", self.namespace);
        let reply: redis::streams::StreamRangeReply =
            self.cmd(redis::cmd("XRANGE").arg(&stream).arg("-").arg("+"));
        reply
            .ids
            .into_iter()
            .map(|e| {
                e.map
                    .into_iter()
                    .map(|(k, v)| (k, redis::from_redis_value::<String>(v).unwrap_or_default()))
                    .collect::<std::collections::HashMap<_, _>>()
            })
            .filter(|e| e.get("session_id").map(String::as_str) == Some(id))
            .collect()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        vedfolnir_tests::delete_namespace(&self.namespace);
    }
}

fn id_of(uuid: &str) -> String {
    hex::encode(Sha256::digest(uuid.as_bytes()))
}

fn seed_json(user_id: i64, name: &str) -> String {
    json!({
        "user_id": user_id,
        "username": name,
        "email": format!("{name}@example.com"),
        "role": "admin",
        "platform_connection_id": 123,
        "platform_name": "My Platform",
        "platform_type": "mastodon",
        "platform_instance_url": "https://mastodon.example.com",
        "csrf_token": "abc123",
        "created_at": "2025-08-20T16:38:25.802836+00:00",
        "last_activity": "2025-08-20T16:38:25.802836+00:00",
        "_last_updated": "2025-08-20T16:38:25.802836+00:00"
    })
    .to_string()
}

#[tokio::test]
async fn legacy_sessions_are_imported_and_their_cookies_keep_working() {
    // Proves: --dry-run counts and writes nothing; the run creates one
    // `created` event per key marked as imported, with the seed's fields,
    // the remaining TTL, the id hex(SHA-256(uuid)); the raw keys are gone;
    // a second run does nothing; a key found again after a crash between
    // the import and the delete is only deleted; invalid values stay; the
    // old cookie value opens the session through the web layer.
    let mut ns = Ns::new();
    let uuids: Vec<String> = (0..5).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    for (i, u) in uuids.iter().enumerate() {
        let key = ns.raw_key(u);
        let _: () = ns.cmd(
            redis::cmd("SET")
                .arg(&key)
                .arg(seed_json(i as i64 + 1, &format!("user{i}")))
                .arg("PX")
                .arg(600_000),
        );
    }
    let no_ttl = uuid::Uuid::new_v4().to_string();
    let key = ns.raw_key(&no_ttl);
    let _: () = ns.cmd(redis::cmd("SET").arg(&key).arg(seed_json(9, "forever")));
    let broken = uuid::Uuid::new_v4().to_string();
    let key = ns.raw_key(&broken);
    let _: () = ns.cmd(redis::cmd("SET").arg(&key).arg("[not a session]"));
    // A session of the new format is not touched.
    let created = ns.run(&["session", "create", "--user-id", "77", "--username", "new"]);
    let new_id = created["session_id"].as_str().expect("id").to_owned();

    let dry = ns.run(&["import-legacy", "--dry-run"]);
    assert_eq!(dry["found"], 7, "{dry}");
    assert_eq!(dry["imported"], 6, "{dry}");
    assert_eq!(dry["invalid"], 1, "{dry}");
    assert_eq!(dry["dry_run"], true);
    for u in &uuids {
        let key = ns.raw_key(u);
        let exists: bool = ns.cmd(redis::cmd("EXISTS").arg(&key));
        assert!(exists, "dry run removed nothing");
        assert!(ns.events_of(&id_of(u)).is_empty(), "dry run wrote nothing");
    }

    let summary = ns.run(&["import-legacy"]);
    assert_eq!(summary["found"], 7, "{summary}");
    assert_eq!(summary["imported"], 6, "{summary}");
    assert_eq!(summary["invalid"], 1, "{summary}");
    assert_eq!(summary["already_imported"], 0, "{summary}");

    for (i, u) in uuids.iter().enumerate() {
        let key = ns.raw_key(u);
        let exists: bool = ns.cmd(redis::cmd("EXISTS").arg(&key));
        assert!(!exists, "the raw-UUID key is gone");
        let id = id_of(u);
        let show = ns.run(&["session", "show", &id]);
        assert_eq!(show["user_id"], i as i64 + 1);
        assert_eq!(show["username"], format!("user{i}"));
        assert_eq!(show["platform_type"], "mastodon");
        assert_eq!(show["csrf_token"], "abc123");
        assert_eq!(show["_version"], 1);
        let session_key = format!("{}session:{id}", ns.namespace);
        let pttl: i64 = ns.cmd(redis::cmd("PTTL").arg(&session_key));
        assert!(
            (540_000..=600_000).contains(&pttl),
            "the remaining TTL is kept: {pttl}"
        );
        let events = ns.events_of(&id);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["type"], "created");
        assert_eq!(events[0]["user_id"], (i + 1).to_string());
        let payload: Value = serde_json::from_str(&events[0]["payload"]).expect("payload");
        assert_eq!(
            payload["imported"],
            json!({"format": "legacy", "created_at": "2025-08-20T16:38:25.802836+00:00"})
        );
        assert!(payload["fields"].get("created_at").is_none());
        // No bearer secret at rest: the UUID appears in no key or value.
        let keys: Vec<String> = ns.cmd(redis::cmd("KEYS").arg(format!("{}*", ns.namespace)));
        assert!(keys.iter().all(|k| !k.contains(u.as_str())));
        assert!(!events[0].values().any(|v| v.contains(u.as_str())));
    }
    let forever = format!("{}session:{}", ns.namespace, id_of(&no_ttl));
    let pttl: i64 = ns.cmd(redis::cmd("PTTL").arg(&forever));
    assert!(
        (7_100_000..=7_200_000).contains(&pttl),
        "no TTL: the configured timeout, {pttl}"
    );
    let broken_key = ns.raw_key(&broken);
    let still: bool = ns.cmd(redis::cmd("EXISTS").arg(&broken_key));
    assert!(still, "an invalid value is left in place");
    assert_eq!(
        ns.run(&["session", "show", &new_id])["username"],
        "new",
        "sessions of the new format are untouched"
    );

    // Idempotent: nothing left to do.
    let again = ns.run(&["import-legacy"]);
    assert_eq!(
        (&again["found"], &again["imported"], &again["invalid"]),
        (&json!(1), &json!(0), &json!(1)),
        "{again}"
    );
    // Resumable: a run stopped between the import and the delete left the
    // raw key; the next run only deletes it.
    let key = ns.raw_key(&uuids[0]);
    let _: () = ns.cmd(
        redis::cmd("SET")
            .arg(&key)
            .arg(seed_json(1, "user0"))
            .arg("PX")
            .arg(600_000),
    );
    let resumed = ns.run(&["import-legacy"]);
    assert_eq!(resumed["already_imported"], 1, "{resumed}");
    assert_eq!(resumed["imported"], 0, "{resumed}");
    let exists: bool = ns.cmd(redis::cmd("EXISTS").arg(&key));
    assert!(!exists);
    assert_eq!(
        ns.events_of(&id_of(&uuids[0])).len(),
        1,
        "no second created event"
    );

    // The old cookie value is the session's token in the web layer.
    let config = Config::default()
        .with_redis(
            vedfolnir_sessions::config::RedisTarget::parse(
                "REDIS_URL",
                &vedfolnir_tests::redis_url(),
            )
            .expect("url"),
        )
        .with_namespace(&ns.namespace);
    let store = SessionStore::connect(&config).await.expect("connect");
    let app: Router = Router::new()
        .route(
            "/me",
            get(
                |s: Session| async move { s.get_value("username").unwrap_or_default().to_string() },
            ),
        )
        .layer(SessionLayer::new(store));
    let res = app
        .oneshot(
            Request::get("/me")
                .header(header::COOKIE, format!("session={}", uuids[2]))
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
    let body = axum::body::to_bytes(res.into_body(), 1 << 16)
        .await
        .expect("body");
    assert_eq!(body.as_ref(), b"\"user2\"");
}
