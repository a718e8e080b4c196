//! TLS to Redis (feature `tls`), against real `redis-server` processes that
//! serve TLS only (`--port 0 --tls-port …`) with a CA and a server
//! certificate made at test time:
//! - `rediss://` with `REDIS_SSL_CA_CERTS` naming the private CA, and
//!   `REDIS_SSL=true` with host, port and password, serve sessions through
//!   every operation;
//! - a CA that did not sign the server's certificate is refused with an
//!   error that names the address and what to set, never the password;
//! - `REDIS_SSL_CERT_REQS=none` connects without the CA and says so in the
//!   log once, without the URL;
//! - a three-primary cluster with TLS on the client, bus and replication
//!   links serves sessions through `REDIS_CLUSTER_NODES`.
#![cfg(feature = "tls")]

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use redis::AsyncCommands as _;
use serde_json::json;
use vedfolnir_sessions::{Changes, Config, DestroyReason, Error, NewSession, SessionStore};

const PASSWORD: &str = "tls-test-Qm8Zr2Lw";
const STARTUP: Duration = Duration::from_secs(30);

/// A directory of the test's own, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(what: &str) -> Dir {
        let dir =
            std::env::temp_dir().join(format!("vtest-{what}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create a test directory");
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA, a server certificate it signed (for 127.0.0.1 and localhost,
/// usable on both ends of the cluster bus), and a second CA that signed
/// nothing here.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    stranger: PathBuf,
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("self-signed CA");
    (cert.pem(), Issuer::new(params, key))
}

fn pki(dir: &Path) -> Pki {
    let (ca_pem, issuer) = ca("vedfolnir test CA");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("server params");
    params
        .distinguished_name
        .push(DnType::CommonName, "redis test server");
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    let (stranger_pem, _) = ca("a CA that signed nothing here");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write a PEM file");
        path
    };
    Pki {
        ca: write("ca.pem", &ca_pem),
        cert: write("server.pem", &cert.pem()),
        key: write("server.key", &key.serialize_pem()),
        stranger: write("stranger.pem", &stranger_pem),
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a probe socket");
    l.local_addr().expect("probe address").port()
}

/// A `redis-server` that speaks TLS only, killed on drop.
struct TlsNode {
    port: u16,
    child: Child,
}

impl Drop for TlsNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsNode {
    /// Starts a node on free ports (`cluster`: cluster-enabled, TLS on the
    /// bus and replication links) and waits until it answers over TLS.
    async fn start(pki: &Pki, dir: &Path, cluster: bool) -> TlsNode {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("node directory");
            let mut cmd = Command::new("redis-server");
            cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .arg("--tls-cert-file")
                .arg(&pki.cert)
                .arg("--tls-key-file")
                .arg(&pki.key)
                .arg("--tls-ca-cert-file")
                .arg(&pki.ca)
                .args(["--tls-auth-clients", "no"])
                .args(["--requirepass", PASSWORD, "--masterauth", PASSWORD])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .arg("--logfile")
                .arg(node_dir.join("redis.log"));
            if cluster {
                cmd.args(["--cluster-enabled", "yes"])
                    .args(["--cluster-port", &free_port().to_string()])
                    .args(["--cluster-node-timeout", "2000"])
                    .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                    .arg("--cluster-config-file")
                    .arg(node_dir.join("nodes.conf"));
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            let mut node = TlsNode { port, child };
            match node.wait_ready(&pki.ca).await {
                Ok(()) => return node,
                Err(e) => last = e,
            }
        }
        panic!("could not start a TLS redis-server: {last}");
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A connection of the test's own to this node, trusting `ca`.
    async fn connection(&self, ca: &Path) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let client = redis::Client::build_with_tls(
            format!("rediss://:{PASSWORD}@{}/0", self.address()).as_str(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(ca).expect("read the CA")),
            },
        )?;
        match tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        {
            Ok(c) => c,
            Err(_) => Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out"))),
        }
    }

    async fn wait_ready(&mut self, ca: &Path) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + STARTUP;
        loop {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return Err(format!(
                    "redis-server exited at start on {}",
                    self.address()
                ));
            }
            if let Ok(mut c) = self.connection(ca).await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("{} did not answer over TLS", self.address()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn config(vars: &[(&str, String)]) -> Config {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    Config::from_map(&map)
        .expect("valid configuration")
        .with_namespace(&format!("vtest:{}:", uuid::Uuid::new_v4().simple()))
}

/// Create, load, update, touch and destroy one session; every step is
/// checked against what Redis then holds.
async fn round_trip(store: &SessionStore) {
    let c = store
        .create(NewSession::for_user(42, "tls").with("theme", "dark"))
        .await
        .expect("create over TLS");
    let s = store
        .load(&c.session_id)
        .await
        .expect("load")
        .expect("live");
    assert_eq!(s.get("theme"), Some(&json!("dark")));
    assert_eq!(s.user_id(), Some(json!(42)));
    let s = store
        .update(&c.session_id, Changes::new().with_set("lang", "fi"))
        .await
        .expect("update");
    assert_eq!(s.version(), 2);
    store.touch(&c.session_id).await.expect("touch");
    let s = store.get(&c.session_id).await.expect("get").expect("live");
    assert_eq!(s.get("lang"), Some(&json!("fi")));
    assert_eq!(s.version(), 3);
    assert!(
        store
            .destroy(&c.session_id, DestroyReason::Logout)
            .await
            .expect("destroy")
    );
    assert_eq!(store.get(&c.session_id).await.expect("get"), None);
    let mut conn = store.connection();
    let part = store.keys().for_session(&c.session_id);
    let reply: redis::streams::StreamRangeReply =
        conn.xrange_all(&part.stream).await.expect("xrange");
    let types: Vec<String> = reply
        .ids
        .iter()
        .filter(|e| e.get::<String>("session_id").as_deref() == Some(c.session_id.as_str()))
        .filter_map(|e| e.get::<String>("type"))
        .collect();
    assert_eq!(types, ["created", "updated", "touched", "destroyed"]);
}

#[tokio::test]
async fn a_private_ca_serves_sessions_by_url_and_by_parts() {
    let dir = Dir::new("tls");
    let pki = pki(&dir.0);
    let node = TlsNode::start(&pki, &dir.0, false).await;

    let by_url = config(&[
        (
            "REDIS_URL",
            format!("rediss://:{PASSWORD}@{}/0", node.address()),
        ),
        ("REDIS_SSL_CA_CERTS", pki.ca.display().to_string()),
    ]);
    let store = SessionStore::connect(&by_url)
        .await
        .expect("connect with the private CA");
    round_trip(&store).await;

    let by_parts = config(&[
        ("REDIS_HOST", "127.0.0.1".to_owned()),
        ("REDIS_PORT", node.port.to_string()),
        ("REDIS_PASSWORD", PASSWORD.to_owned()),
        ("REDIS_SSL", "true".to_owned()),
        ("REDIS_SSL_CA_CERTS", pki.ca.display().to_string()),
    ]);
    assert!(by_parts.redis.is_tls());
    let store = SessionStore::connect(&by_parts)
        .await
        .expect("connect with REDIS_SSL=true");
    round_trip(&store).await;
    assert!(store.health().await.redis_reachable);
}

#[tokio::test]
async fn a_ca_that_did_not_sign_the_server_is_refused_clearly() {
    let dir = Dir::new("tls");
    let pki = pki(&dir.0);
    let node = TlsNode::start(&pki, &dir.0, false).await;
    let wrong = config(&[
        (
            "REDIS_URL",
            format!("rediss://:{PASSWORD}@{}/0", node.address()),
        ),
        ("REDIS_SSL_CA_CERTS", pki.stranger.display().to_string()),
        ("REDIS_TIMEOUT_MS", "1000".to_owned()),
    ]);
    let e = SessionStore::connect(&wrong)
        .await
        .expect_err("an untrusted certificate is refused");
    let text = e.to_string();
    eprintln!("the error: {text}");
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    assert!(text.contains(&node.address()), "names the address: {text}");
    assert!(
        text.contains("certificate") && text.contains("REDIS_SSL_CA_CERTS"),
        "says what to check: {text}"
    );
    assert!(!text.contains(PASSWORD), "{text}");
    // Without any CA (the system's roots) it is refused as well.
    let system = config(&[
        (
            "REDIS_URL",
            format!("rediss://:{PASSWORD}@{}/0", node.address()),
        ),
        ("REDIS_TIMEOUT_MS", "1000".to_owned()),
    ]);
    assert!(SessionStore::connect(&system).await.is_err());
    // A CA file that is not there is a configuration error naming it.
    let missing = config(&[
        (
            "REDIS_URL",
            format!("rediss://:{PASSWORD}@{}/0", node.address()),
        ),
        (
            "REDIS_SSL_CA_CERTS",
            dir.0.join("absent.pem").display().to_string(),
        ),
    ]);
    match SessionStore::connect(&missing).await {
        Err(Error::Config(c)) => assert_eq!(c.var, "REDIS_SSL_CA_CERTS"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

/// A `MakeWriter` into a shared buffer, to read what was logged.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[tokio::test]
async fn cert_reqs_none_connects_without_the_ca_and_warns_once() {
    let dir = Dir::new("tls");
    let pki = pki(&dir.0);
    let node = TlsNode::start(&pki, &dir.0, false).await;
    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let unverified = config(&[
        (
            "REDIS_URL",
            format!("rediss://:{PASSWORD}@{}/0", node.address()),
        ),
        ("REDIS_SSL_CERT_REQS", "none".to_owned()),
    ]);
    let store = SessionStore::connect(&unverified)
        .await
        .expect("connect without checking the certificate");
    round_trip(&store).await;
    SessionStore::connect(&unverified)
        .await
        .expect("a second connection");
    let text = String::from_utf8_lossy(
        &log.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
    .into_owned();
    assert_eq!(
        text.matches("REDIS_SSL_CERT_REQS=none").count(),
        1,
        "warned once: {text}"
    );
    assert!(text.contains("WARN"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_serves_sessions() {
    let dir = Dir::new("tls-cluster");
    let pki = pki(&dir.0);
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(TlsNode::start(&pki, &dir.0, true).await);
    }
    let mut create = tokio::process::Command::new("redis-cli");
    create
        .arg("--tls")
        .arg("--cacert")
        .arg(&pki.ca)
        .args(["-a", PASSWORD, "--no-auth-warning"])
        .args(["--cluster", "create"]);
    for n in &nodes {
        create.arg(n.address());
    }
    create
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(STARTUP, create.output())
        .await
        .expect("redis-cli --cluster create finishes in time")
        .expect("run redis-cli");
    assert!(
        out.status.success(),
        "redis-cli --cluster create: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every node sees every slot served.
    let deadline = tokio::time::Instant::now() + STARTUP;
    'settle: loop {
        let mut ok = true;
        for n in &nodes {
            let info: String = match n.connection(&pki.ca).await {
                Ok(mut c) => redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default(),
                Err(_) => String::new(),
            };
            ok &= info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384");
        }
        if ok {
            break 'settle;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the TLS cluster did not settle"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let seeds: Vec<String> = nodes.iter().map(TlsNode::address).collect();
    let cfg = config(&[
        ("REDIS_CLUSTER_NODES", seeds.join(",")),
        ("REDIS_PASSWORD", PASSWORD.to_owned()),
        ("REDIS_SSL", "true".to_owned()),
        ("REDIS_SSL_CA_CERTS", pki.ca.display().to_string()),
    ]);
    assert_eq!(cfg.partitions, 16);
    let store = SessionStore::connect(&cfg)
        .await
        .expect("connect to the TLS cluster");
    // Sessions in many partitions, so every primary serves some.
    for _ in 0..6 {
        round_trip(&store).await;
    }
    let primaries = store.connection().primaries().await.expect("cluster nodes");
    assert_eq!(primaries.len(), 3, "{primaries:?}");
}
