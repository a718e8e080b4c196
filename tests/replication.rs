//! `REDIS_WAIT_REPLICAS`: a mutation waits for a replica's acknowledgement,
//! and says so with a typed error when none comes, against a real primary
//! and a real replica started by the test.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vedfolnir_sessions::config::RedisTarget;
use vedfolnir_sessions::{Changes, Config, Error, NewSession, SessionStore};
use vedfolnir_tests::redis_server::RedisServer;

struct Replica(Child);

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn replicas_of(primary: &RedisServer) -> u64 {
    let mut conn = primary.connection().await;
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut conn)
        .await
        .expect("info");
    // Replicas past their initial sync.
    info.lines()
        .filter(|l| l.starts_with("slave") && l.contains("state=online"))
        .count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_wait_for_a_replica() {
    let primary = RedisServer::start().await;
    let primary_port: u16 = primary
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("port");
    let dir = std::env::temp_dir().join(format!("vtest-replica-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let replica = Replica(
        Command::new("redis-server")
            .args([
                "--port",
                &free_port().to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&dir)
            .args(["--replicaof", "127.0.0.1", &primary_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the replica"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while replicas_of(&primary).await < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replica never connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = Config::default()
        .with_redis(RedisTarget::parse("REDIS_URL", &primary.url()).expect("url"))
        .with_namespace("vtest:wait:")
        .with_wait_replicas(1, Duration::from_millis(300));
    // While the replica is there, WAIT returns as soon as it acknowledges;
    // the long timeout only keeps a loaded machine from failing the test.
    let store = SessionStore::connect(
        &config
            .clone()
            .with_wait_replicas(1, Duration::from_secs(10)),
    )
    .await
    .expect("connect");
    let c = store
        .create(NewSession::for_user(1, "admin"))
        .await
        .expect("replicated create");
    store
        .update(&c.session_id, Changes::new().with_set("a", 1))
        .await
        .expect("replicated update");

    // Without the replica, the write is applied but not confirmed.
    drop(replica);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while replicas_of(&primary).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replica never left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = SessionStore::connect(&config).await.expect("connect");
    let e = store
        .update(&c.session_id, Changes::new().with_set("b", 2))
        .await
        .expect_err("no replica acknowledges");
    assert!(
        matches!(
            e,
            Error::NotReplicated {
                wanted: 1,
                acknowledged: 0
            }
        ),
        "{e:?}"
    );
    let s = store.get(&c.session_id).await.expect("get").expect("live");
    assert_eq!(s.version(), 3, "applied on the primary");
    // With the setting off, writes do not wait.
    let plain = SessionStore::connect(&config.clone().with_wait_replicas(0, Duration::ZERO))
        .await
        .expect("connect");
    plain
        .update(&c.session_id, Changes::new().with_set("c", 3))
        .await
        .expect("unreplicated update");
    let _ = std::fs::remove_dir_all(&dir);
}
