//! The system under test, all real processes: a `redis-server` of the
//! test's own behind a TCP proxy, a fresh PostgreSQL database behind another,
//! two example app servers, the worker, and the CLI. Children reach Redis and
//! PostgreSQL only through the proxies; the harness observes both directly.
//! Children are killed when the value drops; the scratch directory (logs)
//! is removed unless `VEDFOLNIR_FAULTS_KEEP=1`.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use anyhow::{Context as _, bail};
use redis::AsyncCommands as _;
use redis::aio::MultiplexedConnection;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vedfolnir_sessions::Config;
use vedfolnir_sessions::keys::KeySpace;

use crate::history::{Injected, ProcessExit};
use crate::proxy::Proxy;
use crate::schedule::{WORKER_LEASE_MS, users_spec};
use vedfolnir_tests::db::{Backend, TestDb};
use vedfolnir_tests::redis_server::RedisServer;

/// `REDIS_TIMEOUT_MS` of every child.
pub const REDIS_TIMEOUT_MS: u64 = 300;
/// `SESSION_TOUCH_INTERVAL`: short, so that reads of sessions older than a
/// couple of seconds write `touched` events, as reads of real sessions do
/// once a minute.
pub const TOUCH_INTERVAL_SECS: u64 = 2;
/// How long an app server may take to print its address (it hashes every
/// user's password with argon2 first, slow in a debug build), over all
/// attempts.
const APP_START: Duration = Duration::from_secs(90);
/// A worker that exits within this long of its start failed to start.
const WORKER_START: Duration = Duration::from_secs(5);

/// A directory for this run's logs.
#[derive(Debug)]
pub struct Scratch {
    pub path: PathBuf,
    /// `VEDFOLNIR_FAULTS_KEEP=1`: the directory stays, with the history.
    pub keep: bool,
}

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("vfaults-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let keep = std::env::var("VEDFOLNIR_FAULTS_KEEP").is_ok_and(|v| v == "1");
        Ok(Scratch { path, keep })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("fault suite: logs kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[derive(Debug)]
struct Proc {
    child: Child,
    pid: u32,
    started: Instant,
}

/// The system. Field order is drop order: processes first, then the
/// proxies, the database and Redis.
pub struct System {
    apps: Vec<Mutex<Option<Proc>>>,
    /// A started app server waiting to replace a killed one, and its URL.
    standby: Mutex<Option<(Proc, String)>>,
    /// App server processes started so far (names their logs).
    instances: AtomicUsize,
    /// A standby is being started.
    preparing: std::sync::atomic::AtomicBool,
    /// The worker (all roles, or `--only audit` when the roles are split).
    worker: Mutex<Option<Proc>>,
    /// `--only reaper`, when the roles are split.
    reaper: Mutex<Option<Proc>>,
    /// A second `--only audit` worker that takes the leases over while the
    /// first one is stopped.
    takeover: Mutex<Option<Proc>>,
    split_roles: bool,
    /// Invalid entries appended to the streams so far.
    injected: std::sync::Mutex<Vec<Injected>>,
    /// Base URLs of the running app servers, for clients to follow.
    addrs: RwLock<Vec<Option<String>>>,
    pub redis_proxy: Proxy,
    pub db_proxy: Proxy,
    pub db: TestDb,
    pub redis: Mutex<RedisServer>,
    redis_url: String,
    database_url: String,
    namespace: String,
    keys: KeySpace,
    app_bin: PathBuf,
    worker_bin: PathBuf,
    http: reqwest::Client,
    /// The start of the load: exits are recorded from it.
    origin: OnceLock<Instant>,
    exits: std::sync::Mutex<Vec<ProcessExit>>,
    pub scratch: Scratch,
}

impl System {
    /// Starts Redis, the database and both proxies (no app server or worker
    /// yet).
    pub async fn start(app_servers: usize, split_roles: bool) -> anyhow::Result<Self> {
        let app_bin = vedfolnir_tests::binary("app_server");
        let worker_bin = vedfolnir_tests::binary("vedfolnir-worker");
        let redis = RedisServer::start().await;
        let redis_url = redis.url();
        let redis_target = url::Url::parse(&redis_url)?;
        let redis_proxy = Proxy::start(format!(
            "127.0.0.1:{}",
            redis_target.port().context("redis port")?
        ))
        .await?;
        let db = TestDb::new(Backend::Postgres).await;
        let mut pg = url::Url::parse(&db.url).context("the test database url")?;
        let upstream = format!(
            "{}:{}",
            pg.host_str().context("postgres host")?,
            pg.port().unwrap_or(5432)
        );
        let db_proxy = Proxy::start(upstream).await?;
        pg.set_host(Some("127.0.0.1"))?;
        pg.set_port(Some(db_proxy.port()))
            .map_err(|()| anyhow::anyhow!("cannot set the port of the database url"))?;
        if !pg.query_pairs().any(|(k, _)| k == "sslmode") {
            pg.query_pairs_mut().append_pair("sslmode", "disable");
        }
        let namespace = format!("vfault:{}:", uuid::Uuid::new_v4().simple());
        let keys = KeySpace::new(&Config::default().with_namespace(&namespace));
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(0)
            .build()?;
        Ok(System {
            apps: (0..app_servers).map(|_| Mutex::new(None)).collect(),
            standby: Mutex::new(None),
            instances: AtomicUsize::new(0),
            preparing: std::sync::atomic::AtomicBool::new(false),
            worker: Mutex::new(None),
            reaper: Mutex::new(None),
            takeover: Mutex::new(None),
            split_roles,
            injected: std::sync::Mutex::new(Vec::new()),
            addrs: RwLock::new(vec![None; app_servers]),
            redis_proxy,
            db_proxy,
            db,
            redis: Mutex::new(redis),
            redis_url,
            database_url: pg.to_string(),
            namespace,
            keys,
            app_bin,
            worker_bin,
            http,
            origin: OnceLock::new(),
            exits: std::sync::Mutex::new(Vec::new()),
            scratch: Scratch::new()?,
        })
    }

    /// Sets the start of the load (once).
    pub fn set_origin(&self, origin: Instant) {
        let _ = self.origin.set(origin);
    }

    fn now(&self) -> Duration {
        self.origin.get().map(Instant::elapsed).unwrap_or_default()
    }

    fn note_exit(&self, who: &str, started: bool, status: std::process::ExitStatus) {
        let at = self.now();
        eprintln!(
            "  {who} exited by itself at {:.2}s ({}): {status}",
            at.as_secs_f64(),
            if started {
                "while running"
            } else {
                "while starting"
            }
        );
        self.exits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ProcessExit {
                who: who.to_owned(),
                at,
                started,
                status: status.to_string(),
            });
    }

    /// The exits recorded so far.
    pub fn exits(&self) -> Vec<ProcessExit> {
        self.exits.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// One line naming the run's Redis, database and namespace.
    pub fn describe(&self) -> String {
        format!(
            "redis {} (proxy :{}), database {} (proxy :{}), namespace {}",
            self.redis_url,
            self.redis_proxy.port(),
            self.db.url.rsplit('/').next().unwrap_or_default(),
            self.db_proxy.port(),
            self.namespace
        )
    }

    pub fn app_servers(&self) -> usize {
        self.apps.len()
    }

    /// The environment every child gets (after `env_clear`).
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PATH", std::env::var("PATH").unwrap_or_default()),
            (
                "REDIS_URL",
                format!("redis://127.0.0.1:{}/0", self.redis_proxy.port()),
            ),
            (
                "REDIS_SESSION_PREFIX",
                format!("{}session:", self.namespace),
            ),
            ("REDIS_EVENT_STREAM", format!("{}events", self.namespace)),
            ("DATABASE_URL", self.database_url.clone()),
            ("REDIS_TIMEOUT_MS", REDIS_TIMEOUT_MS.to_string()),
            ("SESSION_COOKIE_SECURE", "false".to_owned()),
            ("SESSION_TOUCH_INTERVAL", TOUCH_INTERVAL_SECS.to_string()),
            // `VEDFOLNIR_FAULTS_RUST_LOG` raises the children's log level to
            // look into a run.
            (
                "RUST_LOG",
                std::env::var("VEDFOLNIR_FAULTS_RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            ),
            ("NO_COLOR", "1".to_owned()),
        ]
    }

    fn log(&self, name: &str) -> anyhow::Result<std::fs::File> {
        let path = self.scratch.path.join(name);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))
    }

    /// Starts app server `i` (promoting the standby instance when one is
    /// ready, else starting a process and waiting for its address); clients
    /// follow it. Then prepares the next standby in the background.
    pub async fn start_app(self: &Arc<Self>, i: usize) -> anyhow::Result<()> {
        let mut slot = self.apps[i].lock().await;
        if slot.is_some() {
            return Ok(());
        }
        // A standby being started is nearer than a new process.
        poll(APP_START, Duration::from_millis(50), || async {
            !self.preparing.load(std::sync::atomic::Ordering::SeqCst)
        })
        .await;
        let ready = self.standby.lock().await.take();
        let (proc_, addr) = match ready {
            Some((mut p, addr)) => match p.child.try_wait() {
                Ok(None) => (p, addr),
                _ => {
                    if let Ok(Some(status)) = p.child.try_wait() {
                        self.note_exit("standby app", true, status);
                    }
                    self.spawn_app().await?
                }
            },
            None => self.spawn_app().await?,
        };
        *slot = Some(proc_);
        self.addrs.write().unwrap_or_else(|e| e.into_inner())[i] = Some(addr);
        drop(slot);
        let sys = self.clone();
        tokio::spawn(async move { sys.prepare_standby().await });
        Ok(())
    }

    /// Starts app server `i` as a new process (not the standby), at setup.
    pub async fn launch_app(&self, i: usize) -> anyhow::Result<()> {
        let mut slot = self.apps[i].lock().await;
        if slot.is_some() {
            return Ok(());
        }
        let (proc_, addr) = self.spawn_app().await?;
        *slot = Some(proc_);
        self.addrs.write().unwrap_or_else(|e| e.into_inner())[i] = Some(addr);
        Ok(())
    }

    /// Starts a spare app server and keeps it ready, so that a restart
    /// after a SIGKILL does not wait for the password hashing of a debug
    /// build. A fresh process all the same: it has served nothing.
    pub async fn prepare_standby(&self) {
        use std::sync::atomic::Ordering;
        if self.standby.lock().await.is_some() || self.preparing.swap(true, Ordering::SeqCst) {
            return;
        }
        let spawned = self.spawn_app().await;
        self.preparing.store(false, Ordering::SeqCst);
        match spawned {
            Ok(ready) => {
                let mut standby = self.standby.lock().await;
                if standby.is_none() {
                    *standby = Some(ready);
                }
            }
            Err(e) => eprintln!("  the standby app server did not start: {e:#}"),
        }
    }

    /// Starts an app server process and waits for its address. An instance
    /// that exits before printing it (Redis or the database unreachable at
    /// start) is recorded and started again, as a supervisor would, for at
    /// most [`APP_START`].
    async fn spawn_app(&self) -> anyhow::Result<(Proc, String)> {
        let deadline = Instant::now() + APP_START;
        loop {
            let n = self
                .instances
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut cmd = Command::new(&self.app_bin);
            cmd.env_clear()
                .envs(self.env())
                .env("APP_LISTEN", "127.0.0.1:0")
                .env("APP_USERS", users_spec())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::from(self.log(&format!("app-instance{n}.log"))?))
                .kill_on_drop(true);
            let mut child = cmd.spawn().context("starting the example app server")?;
            let pid = child.id().context("app pid")?;
            let started = Instant::now();
            let mut lines = BufReader::new(child.stdout.take().context("app stdout")?).lines();
            let addr = tokio::time::timeout_at(deadline, async {
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(a) = line.strip_prefix("vedfolnir example app listening on http://")
                    {
                        return Some(a.trim().to_owned());
                    }
                }
                None
            })
            .await;
            match addr {
                Ok(Some(addr)) => {
                    // Keep reading so that the pipe never fills.
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                    let p = Proc {
                        child,
                        pid,
                        started,
                    };
                    return Ok((p, format!("http://{addr}")));
                }
                Ok(None) => {
                    let status = child.wait().await.context("app exit status")?;
                    self.note_exit(&format!("app instance {n}"), false, status);
                    if Instant::now() >= deadline {
                        bail!("the app server kept exiting at start");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(_) => bail!("the app server did not print its address in {APP_START:?}"),
            }
        }
    }

    /// SIGKILLs app server `i`; clients stop choosing it at once.
    pub async fn kill_app(&self, i: usize) {
        self.addrs.write().unwrap_or_else(|e| e.into_inner())[i] = None;
        if let Some(mut p) = self.apps[i].lock().await.take() {
            let _ = p.child.kill().await;
        }
    }

    /// The base URL of app server `preferred`, or of another running one.
    pub fn app_url(&self, preferred: usize) -> Option<String> {
        let addrs = self.addrs.read().unwrap_or_else(|e| e.into_inner());
        let n = addrs.len();
        (0..n).find_map(|k| addrs[(preferred + k) % n].clone())
    }

    /// Starts the worker (again, if it exited): one process, or `--only
    /// audit` and `--only reaper` when the roles are split; returns the pid
    /// of the one that runs the audit consumer.
    pub async fn start_worker(&self) -> anyhow::Result<u32> {
        if self.split_roles {
            self.ensure_worker(&self.reaper, "reaper worker", Some("reaper"), "reaper.log")
                .await?;
            self.ensure_worker(&self.worker, "worker", Some("audit"), "worker.log")
                .await
        } else {
            self.ensure_worker(&self.worker, "worker", None, "worker.log")
                .await
        }
    }

    /// Starts a worker in `slot` unless one runs there; records an exit it
    /// finds.
    async fn ensure_worker(
        &self,
        slot: &Mutex<Option<Proc>>,
        who: &str,
        only: Option<&str>,
        log: &str,
    ) -> anyhow::Result<u32> {
        let mut slot = slot.lock().await;
        if let Some(p) = slot.as_mut() {
            match p.child.try_wait() {
                Ok(Some(status)) => {
                    let ran = p.started.elapsed() >= WORKER_START;
                    *slot = None;
                    self.note_exit(who, ran, status);
                }
                _ => return Ok(p.pid),
            }
        }
        let p = self.spawn_worker(only, log)?;
        let pid = p.pid;
        *slot = Some(p);
        Ok(pid)
    }

    fn spawn_worker(&self, only: Option<&str>, log: &str) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(&self.worker_bin);
        if let Some(role) = only {
            cmd.arg("--only").arg(role);
        }
        let child = cmd
            .env_clear()
            .envs(self.env())
            .env("HEAL_CHECK_MS", "100")
            .env("WORKER_LEASE_MS", WORKER_LEASE_MS.to_string())
            .env("AUDIT_BLOCK_MS", "100")
            .env("AUDIT_CLAIM_IDLE_MS", "1000")
            .env("AUDIT_DB_RETRY_MAX_MS", "200")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(self.log(log)?))
            .kill_on_drop(true)
            .spawn()
            .context("starting vedfolnir-worker")?;
        let pid = child.id().context("worker pid")?;
        Ok(Proc {
            child,
            pid,
            started: Instant::now(),
        })
    }

    /// SIGKILLs the worker (both processes when the roles are split).
    pub async fn kill_worker(&self) {
        for slot in [&self.worker, &self.reaper] {
            if let Some(mut p) = slot.lock().await.take() {
                let _ = p.child.kill().await;
            }
        }
    }

    /// The pid of the worker that runs the audit consumer.
    pub async fn worker_pid(&self) -> Option<u32> {
        self.worker.lock().await.as_ref().map(|p| p.pid)
    }

    /// The worker that runs the audit consumer is running (stopped counts).
    pub async fn worker_alive(&self) -> bool {
        self.worker
            .lock()
            .await
            .as_mut()
            .is_some_and(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    /// Starts the second `--only audit` worker; returns its pid.
    pub async fn start_takeover(&self) -> anyhow::Result<u32> {
        let p = self.spawn_worker(Some("audit"), "takeover.log")?;
        let pid = p.pid;
        *self.takeover.lock().await = Some(p);
        Ok(pid)
    }

    /// Stops the second worker with SIGTERM, as an operator would, and
    /// waits for it; an exit other than 0 is recorded as a crash.
    pub async fn stop_takeover(&self) {
        let Some(mut p) = self.takeover.lock().await.take() else {
            return;
        };
        signal(p.pid, "TERM").await;
        match tokio::time::timeout(Duration::from_secs(40), p.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => self.note_exit("takeover worker", true, status),
            Ok(Err(e)) => eprintln!("  waiting for the takeover worker: {e}"),
            Err(_) => {
                eprintln!("  the takeover worker did not stop on SIGTERM within 40s");
                let _ = p.child.kill().await;
            }
        }
    }

    /// Holds `LOCK TABLE session_snapshots IN EXCLUSIVE MODE` for `hold`,
    /// directly on the database (not through the proxy).
    pub async fn lock_snapshots(&self, hold: Duration) -> anyhow::Result<()> {
        use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
        let txn = self.db.db.begin().await?;
        txn.execute_unprepared("LOCK TABLE session_snapshots IN EXCLUSIVE MODE")
            .await?;
        tokio::time::sleep(hold).await;
        txn.commit().await?;
        Ok(())
    }

    /// Appends invalid entries to the event streams, each of a session no
    /// client uses: an `event_id` with a NUL, a `destroyed` reason with a
    /// NUL, a user id of about 3 KB (over PostgreSQL's btree row limit), a
    /// `seq` above the i64 range, and an `event_id` the audit database
    /// already holds with other content. Records each; returns them.
    pub async fn inject_poison(&self) -> anyhow::Result<Vec<Injected>> {
        use sea_orm::EntityTrait as _;
        use vedfolnir_sessions::audit::entity::session_events;
        let mut conn = self.admin().await.context("redis for the poison entries")?;
        let fresh = || -> vedfolnir_sessions::SessionId {
            format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            )
            .parse()
            .expect("64 hex characters")
        };
        let event = |sid: &vedfolnir_sessions::SessionId,
                     kind: vedfolnir_sessions::EventKind,
                     user: &str| {
            vedfolnir_sessions::Event {
                event_id: uuid::Uuid::now_v7(),
                session_id: sid.clone(),
                seq: 1,
                occurred_at: vedfolnir_sessions::time::Timestamp::now(),
                user_id: Some(user.to_owned()),
                schema: vedfolnir_sessions::event::SCHEMA_VERSION,
                kind,
                traceparent: None,
            }
        };
        let created = |user: &str| {
            let mut fields = serde_json::Map::new();
            fields.insert("user_id".to_owned(), serde_json::json!(user));
            fields.insert("username".to_owned(), serde_json::json!("poison"));
            vedfolnir_sessions::EventKind::Created {
                fields,
                rotated_from: None,
                imported: None,
            }
        };
        let fields = |e: &vedfolnir_sessions::Event| -> Vec<(String, String)> {
            e.to_fields()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect()
        };
        let set = |f: &mut Vec<(String, String)>, key: &str, value: String| {
            for (k, v) in f.iter_mut() {
                if k == key {
                    *v = value.clone();
                }
            }
        };
        let mut entries: Vec<PoisonEntry> = Vec::new();
        {
            let sid = fresh();
            let mut f = fields(&event(&sid, created("1"), "1"));
            let id = uuid::Uuid::now_v7().to_string();
            set(&mut f, "event_id", format!("{}\0{}", &id[..1], &id[2..]));
            entries.push(("event_id with a NUL", sid, f));
        }
        {
            let sid = fresh();
            let kind = vedfolnir_sessions::EventKind::Destroyed {
                reason: vedfolnir_sessions::DestroyReason::Logout,
            };
            let mut f = fields(&event(&sid, kind, "1"));
            set(&mut f, "payload", r#"{"reason":"log\u0000out"}"#.to_owned());
            entries.push(("destroyed reason with a NUL", sid, f));
        }
        {
            // Random hex: PostgreSQL cannot compress it below its limit.
            let huge: String = (0..100)
                .map(|_| uuid::Uuid::new_v4().simple().to_string())
                .collect();
            let sid = fresh();
            let f = fields(&event(&sid, created(&huge), &huge));
            entries.push(("user id of 3 KB", sid, f));
        }
        {
            let sid = fresh();
            let mut f = fields(&event(&sid, created("1"), "1"));
            set(&mut f, "seq", (i64::MAX as u64 + 1).to_string());
            entries.push(("seq above the i64 range", sid, f));
        }
        if let Some(held) = session_events::Entity::find().one(&self.db.db).await? {
            let sid = fresh();
            let mut e = event(&sid, created("1"), "1");
            e.event_id = held.event_id;
            entries.push(("event_id held by another event", sid, fields(&e)));
        }
        let mut out = Vec::new();
        for (what, sid, f) in entries {
            let stream = self.keys.for_session(&sid).stream.clone();
            let stream_id: String = conn
                .xadd(&stream, "*", &f)
                .await
                .with_context(|| format!("XADD of the poison entry ({what})"))?;
            out.push(Injected {
                what: what.to_owned(),
                stream_id,
                session_id: sid.to_string(),
                at: self.now(),
            });
        }
        self.injected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(out.iter().cloned());
        Ok(out)
    }

    /// The invalid entries appended so far.
    pub fn injected(&self) -> Vec<Injected> {
        self.injected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every entry of `injected` is a dead letter.
    pub async fn dead_lettered(&self, injected: &[Injected]) -> bool {
        use sea_orm::{ColumnTrait as _, EntityTrait as _, PaginatorTrait as _, QueryFilter as _};
        use vedfolnir_sessions::audit::entity::dead_letters;
        let ids: Vec<&str> = injected.iter().map(|i| i.stream_id.as_str()).collect();
        let n = dead_letters::Entity::find()
            .filter(dead_letters::Column::StreamId.is_in(ids))
            .count(&self.db.db)
            .await;
        matches!(n, Ok(n) if n as usize >= injected.len())
    }

    /// Damages Redis beside the audit trail's back, one kind per live
    /// session (up to three sessions, in id order): the session key made
    /// persistent, the session removed from the expiry index, the key's JSON
    /// changed. Returns (what, session id).
    pub async fn damage(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut conn = self.admin().await.context("redis for the damage")?;
        let prefix = format!("{}session:", self.namespace);
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("string")
                .query_async(&mut conn)
                .await?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let mut ids: Vec<vedfolnir_sessions::SessionId> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix)?.parse().ok())
            .collect();
        ids.sort_by_key(ToString::to_string);
        let mut out = Vec::new();
        for (i, id) in ids.iter().take(3).enumerate() {
            let part = self.keys.for_session(id);
            let key = part.session(id);
            let hex = id.to_string();
            let what = match i {
                0 => {
                    let _: i64 = conn.persist(&key).await?;
                    "key made persistent"
                }
                1 => {
                    let raw: Vec<u8> = (0..hex.len() / 2)
                        .filter_map(|j| u8::from_str_radix(&hex[2 * j..2 * j + 2], 16).ok())
                        .collect();
                    let short = raw.get(..30).map(<[u8]>::to_vec).unwrap_or_default();
                    let _: i64 = conn.zrem(&part.expiry, &hex).await?;
                    let _: i64 = conn.zrem(&part.expiry, raw).await?;
                    let _: i64 = conn.zrem(&part.expiry, short).await?;
                    "removed from the expiry index"
                }
                _ => {
                    let text: String = conn.get(&key).await?;
                    let mut v: serde_json::Value = serde_json::from_str(&text)?;
                    if let Some(o) = v.as_object_mut() {
                        o.insert("damaged_by".to_owned(), serde_json::json!("fault suite"));
                    }
                    let _: () = redis::cmd("SET")
                        .arg(&key)
                        .arg(v.to_string())
                        .arg("KEEPTTL")
                        .query_async(&mut conn)
                        .await?;
                    "JSON changed"
                }
            };
            out.push((what.to_owned(), hex));
        }
        Ok(out)
    }

    /// Runs the CLI with the children's environment; `None` as the code
    /// when it did not finish within `limit` (it is killed then).
    pub async fn cli(&self, args: &[&str], limit: Duration) -> (Option<i32>, String, String) {
        let mut cmd = Command::new(vedfolnir_tests::binary("vedfolnir-sessions"));
        cmd.args(args)
            .env_clear()
            .envs(self.env())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(limit, cmd.output()).await {
            Ok(Ok(out)) => (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ),
            Ok(Err(e)) => (None, String::new(), format!("could not run the CLI: {e}")),
            Err(_) => (None, String::new(), format!("timed out after {limit:?}")),
        }
    }

    /// Restarts, as a supervisor would, every child that exited by itself
    /// (the harness's own kills take the process out of its slot first),
    /// until `stop`.
    pub async fn supervise(self: &Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            // Only a worker that exited: one the harness stopped stays
            // stopped until the harness starts it.
            let mut exited = false;
            for slot in [&self.worker, &self.reaper] {
                exited |= slot
                    .lock()
                    .await
                    .as_mut()
                    .is_some_and(|p| matches!(p.child.try_wait(), Ok(Some(_))));
            }
            if exited && let Err(e) = self.start_worker().await {
                eprintln!("  the worker did not start again: {e:#}");
            }
            for i in 0..self.apps.len() {
                let exited = {
                    let mut slot = self.apps[i].lock().await;
                    match slot.as_mut().map(|p| p.child.try_wait()) {
                        Some(Ok(Some(status))) => {
                            *slot = None;
                            Some(status)
                        }
                        _ => None,
                    }
                };
                if let Some(status) = exited {
                    self.addrs.write().unwrap_or_else(|e| e.into_inner())[i] = None;
                    self.note_exit(&format!("app{i}"), true, status);
                    if let Err(e) = self.start_app(i).await {
                        eprintln!("  app server {i} did not start again: {e:#}");
                    }
                }
            }
        }
    }

    /// Undoes every fault still in place: proxies restored, Redis running,
    /// every app server and the worker running.
    pub async fn restore_all(self: &Arc<Self>) -> anyhow::Result<()> {
        self.redis_proxy.delay(Duration::ZERO);
        self.redis_proxy.restore();
        self.db_proxy.delay(Duration::ZERO);
        self.db_proxy.restore();
        {
            let mut redis = self.redis.lock().await;
            if !redis.running() {
                redis.restart().await;
            }
        }
        for i in 0..self.apps.len() {
            self.start_app(i).await?;
        }
        self.start_worker().await?;
        Ok(())
    }

    // -----------------------------------------------------------------------
    // Observations, directly on Redis (not through the proxy)

    /// A fresh connection of the harness's own, or `None` when Redis does
    /// not answer in time.
    pub async fn admin(&self) -> Option<MultiplexedConnection> {
        let client = redis::Client::open(self.redis_url.as_str()).ok()?;
        tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .ok()?
        .ok()
    }

    /// What keeps the system from having settled, condition by condition
    /// (for the report of a fault that did not settle).
    pub async fn unsettled(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.apps_healthy().await {
            out.push("an app server does not reach redis".to_owned());
        }
        out.extend(self.not_healed().await);
        if !self.caught_up().await {
            out.push("the audit group is not drained".to_owned());
        }
        out
    }

    /// Redis is back after a cut, a slowdown or dropped connections: every
    /// app server reaches it, and what was staged meanwhile is applied.
    pub async fn redis_back(&self) -> bool {
        self.apps_healthy().await && self.healed().await
    }

    /// Redis holds the data set the audit database knows complete in every
    /// partition (the same epoch in both: no recovery due or running),
    /// nothing staged during an outage waits to be applied, and no outage is
    /// marked that no projection has read since.
    pub async fn healed(&self) -> bool {
        self.not_healed().await.is_empty()
    }

    /// What keeps [`System::healed`] from holding.
    async fn not_healed(&self) -> Vec<String> {
        use sea_orm::{EntityTrait as _, PaginatorTrait as _};
        let Some(mut conn) = self.admin().await else {
            return vec!["the harness cannot reach redis".to_owned()];
        };
        let mut out = Vec::new();
        for part in self.keys.all() {
            let epoch: redis::RedisResult<Option<String>> = redis::cmd("GET")
                .arg(&part.epoch)
                .query_async(&mut conn)
                .await;
            let known = vedfolnir_sessions::audit::partition::load(&self.db.db, &part.stream).await;
            let known = known.ok().flatten().and_then(|r| r.redis_epoch);
            if !matches!(&epoch, Ok(Some(e)) if Some(e) == known.as_ref()) {
                // Who replays, if anyone: the lock holds `<pid>:<uuid>`.
                let lock: redis::RedisResult<(Option<String>, i64)> = redis::pipe()
                    .cmd("GET")
                    .arg(&part.healing)
                    .cmd("PTTL")
                    .arg(&part.healing)
                    .query_async(&mut conn)
                    .await;
                out.push(format!(
                    "partition {}: redis epoch {epoch:?}, the database knows {known:?}, \
                     healing lock (holder, ms left) {lock:?}",
                    part.partition
                ));
            }
            // An outage whose staged writes no projection has read since.
            let marks: redis::RedisResult<(Vec<String>, Vec<String>)> = redis::pipe()
                .cmd("SMEMBERS")
                .arg(&part.outage)
                .cmd("SMEMBERS")
                .arg(&part.staged)
                .query_async(&mut conn)
                .await;
            if !matches!(&marks, Ok((m, _)) if m.is_empty()) {
                out.push(format!(
                    "partition {}: outage marks and sessions waiting {marks:?}",
                    part.partition
                ));
            }
        }
        let staged = vedfolnir_sessions::audit::entity::fallback_events::Entity::find()
            .count(&self.db.db)
            .await;
        if !matches!(staged, Ok(0)) {
            out.push(format!("staged rows: {staged:?}"));
        }
        out
    }

    /// Every stream of the namespace has been delivered to the audit group
    /// up to its last entry, and nothing is pending.
    pub async fn caught_up(&self) -> bool {
        let Some(mut conn) = self.admin().await else {
            return false;
        };
        let mut streams = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let r: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.namespace))
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("stream")
                .query_async(&mut conn)
                .await;
            let Ok((next, keys)) = r else {
                return false;
            };
            streams.extend(keys);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        for stream in streams {
            let last: redis::RedisResult<redis::streams::StreamRangeReply> =
                conn.xrevrange_count(&stream, "+", "-", 1).await;
            let Ok(last) = last else {
                return false;
            };
            let Some(last) = last.ids.first() else {
                continue;
            };
            let groups: redis::RedisResult<redis::streams::StreamInfoGroupsReply> =
                conn.xinfo_groups(&stream).await;
            let Ok(groups) = groups else {
                return false;
            };
            let done = groups.groups.iter().any(|g| {
                g.name == "audit"
                    && g.pending == 0
                    && stream_id(&g.last_delivered_id) >= stream_id(&last.id)
            });
            if !done {
                return false;
            }
        }
        true
    }

    /// The running worker (the harness may have restarted it since it was
    /// started) has joined the audit group as a consumer.
    pub async fn worker_consuming(&self) -> bool {
        let pid = match self.worker.lock().await.as_ref() {
            Some(p) => p.pid,
            None => return false,
        };
        self.consumer_of(pid).await
    }

    /// The worker with this pid has joined the audit group as a consumer
    /// (consumer names are `<host>-<pid>-<random>`).
    pub async fn consumer_of(&self, pid: u32) -> bool {
        let Some(mut conn) = self.admin().await else {
            return false;
        };
        let needle = format!("-{pid}-");
        for part in self.keys.all() {
            let r: redis::RedisResult<redis::streams::StreamInfoConsumersReply> =
                conn.xinfo_consumers(&part.stream, "audit").await;
            if r.is_ok_and(|r| r.consumers.iter().any(|c| c.name.contains(&needle))) {
                return true;
            }
        }
        false
    }

    /// Every running app server answers `/healthz` with 200 (its store
    /// reaches Redis).
    pub async fn apps_healthy(&self) -> bool {
        let addrs: Vec<Option<String>> =
            self.addrs.read().unwrap_or_else(|e| e.into_inner()).clone();
        for base in addrs.into_iter().flatten() {
            let ok = self
                .http
                .get(format!("{base}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == reqwest::StatusCode::OK);
            if !ok {
                return false;
            }
        }
        true
    }

    /// One request with an unknown, well-formed cookie to every running app
    /// server: a miss, which lets a store project what it wrote in fallback
    /// mode, as any request would. Stores nothing.
    pub async fn poke_apps(&self) {
        let addrs: Vec<Option<String>> =
            self.addrs.read().unwrap_or_else(|e| e.into_inner()).clone();
        for base in addrs.into_iter().flatten() {
            let token = vedfolnir_sessions::Token::generate();
            let _ = self
                .http
                .get(format!("{base}/me"))
                .header("cookie", format!("session={}", token.expose()))
                .send()
                .await;
        }
    }
}

/// Waits until `cond` holds, polling every `every`, at most `limit`;
/// returns whether it held.
pub async fn poll<F, Fut>(limit: Duration, every: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// An invalid entry: what is wrong with it, its session, its fields.
type PoisonEntry = (
    &'static str,
    vedfolnir_sessions::SessionId,
    Vec<(String, String)>,
);

/// Sends `sig` (`STOP`, `CONT`, `TERM`) to a process with kill(1).
pub async fn signal(pid: u32, sig: &str) {
    let r = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .await;
    if !r.is_ok_and(|s| s.success()) {
        eprintln!("  kill -{sig} {pid} failed");
    }
}

/// A stream id as a comparable pair.
fn stream_id(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').unwrap_or((id, "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}
