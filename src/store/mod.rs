//! The session store: the write path and the read path over Redis.
//!
//! Every mutation folds the event in Rust ([`Record::apply`]), then runs one
//! invocation of `src/lua/session.lua`, which checks the expected version and
//! the tombstone, appends the event to the stream and stores the folded JSON
//! (or deletes it and leaves a tombstone), and keeps the user and expiry
//! indexes, all atomically. On a version conflict the script returns the
//! current JSON; the store folds the change again on top of it and retries,
//! up to `SESSION_MAX_RETRIES` times, then returns [`Error::Conflict`].
//! A mutation given no state folds on the state the store's last such
//! mutation of that session left when it remembers it, else on a read (see
//! `store::states`).
//!
//! The read path is one `GET`. [`SessionStore::load`] adds sliding expiry: it
//! appends a `touched` event when the last activity is older than
//! `SESSION_TOUCH_INTERVAL`, and writes nothing otherwise.

#[cfg(feature = "audit")]
mod admit;
#[cfg(feature = "audit")]
mod fallback;
mod import;
mod ops;
#[cfg(feature = "audit")]
mod recovery;
#[cfg(not(feature = "audit"))]
mod redis_only;
pub(crate) mod script;
mod states;
mod trim;

#[cfg(feature = "audit")]
use std::collections::HashMap;
use std::sync::Arc;
#[cfg(feature = "audit")]
use std::sync::Mutex;
#[cfg(feature = "audit")]
use std::sync::atomic::Ordering;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Instant;

use redis::AsyncCommands as _;
use serde::Serialize;

#[cfg(feature = "audit")]
use crate::audit::AuditSink;
use crate::config::Config;
use crate::conn::{ConnOptions, RedisConn};
use crate::error::{Error, Result};
use crate::id::{SessionId, Token};
use crate::keys::KeySpace;
use crate::session::{Record, Status};

#[cfg(feature = "audit")]
pub use fallback::{CATCH_UP_AFTER, ProjectionSummary};
pub use import::Imported;
pub use ops::Created;
#[cfg(feature = "audit")]
pub use recovery::{RECOVERING_MEMO, RecoveryState};

/// The event-sourced session store. Cheap to clone; clones share one
/// multiplexed, self-reconnecting Redis connection.
///
/// With the feature `audit` and an audit database attached
/// (`SessionStore::with_audit`) it also:
/// - commits every mutation to the database before returning when
///   `DB_SESSION_SYNC` is on (a failed commit is logged, never returned: the
///   mutation is in Redis and the audit consumer records it);
/// - keeps working while Redis is unreachable when `DB_SESSION_FALLBACK` is
///   on and the database is current: loads read the database's view of the
///   session, mutations are staged in the database, and whichever process
///   sees Redis first projects them through it (see `store::fallback`);
/// - while Redis is recovering from a loss of its data (its epoch differs
///   from the one the database knows complete, see `RecoveryState`),
///   serves a load that misses in Redis from the database under the one rule
///   of `store::admit`, puts the session back, and makes ends reach sessions
///   that are not back yet.
#[derive(Clone)]
pub struct SessionStore {
    conn: RedisConn,
    keys: Arc<KeySpace>,
    config: Arc<Config>,
    #[cfg(feature = "audit")]
    audit: Option<AuditSink>,
    shared: Arc<Shared>,
}

/// State shared by the clones of one store. None of it is needed for
/// correctness after a restart: what must survive lives in Redis or the
/// audit database.
#[derive(Debug)]
struct Shared {
    /// Events Redis appended through this store; every so many, the stream
    /// of the partition written is trimmed (see `store::trim`).
    appended: AtomicU64,
    /// A trim runs.
    trimming: AtomicBool,
    /// The sessions' states this store wrote last (see `store::states`).
    states: states::States,
    /// What the store's side of the audit database keeps.
    #[cfg(feature = "audit")]
    audit: AuditShared,
}

impl Shared {
    fn new(config: &Config) -> Self {
        Shared {
            appended: AtomicU64::new(0),
            trimming: AtomicBool::new(false),
            states: states::States::new(config.state_cache_bytes),
            #[cfg(feature = "audit")]
            audit: AuditShared::default(),
        }
    }
}

/// The state of the store's side of the audit database: the fallback, the
/// projection of staged writes, the recovery signal, synchronous writes.
#[cfg(feature = "audit")]
#[derive(Debug)]
struct AuditShared {
    /// When the store was made; the origin of the millisecond clocks below.
    started: Instant,
    /// Redis was found unreachable; the next operation that reaches it first
    /// projects what was staged meanwhile.
    suspect: AtomicBool,
    /// Milliseconds since `started` of the last operation.
    last_contact_ms: AtomicU64,
    /// Milliseconds since `started` of the last catch-up attempt.
    last_catch_up_ms: AtomicU64,
    /// The epochs of every partition were checked once.
    epochs_checked: AtomicBool,
    /// What this process remembers of each partition's recovery state.
    recovery: Mutex<HashMap<u32, recovery::Memo>>,
    /// Per partition: whether the database may stand in for Redis, and when
    /// that was read.
    trust: Mutex<HashMap<u32, (Instant, bool)>>,
    /// Partitions for which this store reported Redis reachable (closing the
    /// database for writes) since it last found Redis unreachable.
    reopened: Mutex<std::collections::HashSet<u32>>,
    /// Partitions where this store found Redis unreachable and has not
    /// marked the outage in Redis since (see `fallback::reach`).
    mark_due: Mutex<std::collections::HashSet<u32>>,
    /// This process runs a replay.
    healing: AtomicBool,
    /// The value of the healing locks this store takes, the same for all
    /// its attempts (`<pid>:<uuid>`): a lock that an attempt of this store
    /// left behind is this store's to take again at once (see
    /// `recovery::heal`).
    healer: String,
    /// One of this store's `heal` calls is under way: another returns at
    /// once, so a lock under this store's name held while it is not set was
    /// left behind.
    in_heal: AtomicBool,
    /// A miss that finds its partition recovering starts a replay in the
    /// background (off for a short-lived process, see
    /// `SessionStore::without_background_healing`).
    background_healing: AtomicBool,
    /// The last call to the audit database on a request's path (a
    /// synchronous write, a check for staged writes) failed: the next ones
    /// wait less.
    sync_failing: AtomicBool,
    /// Milliseconds since `started` until which operations still check their
    /// session for staged writes after a clean projection.
    guard_until_ms: AtomicU64,
    /// Mutations staged in the database because Redis was unreachable.
    fallback_writes: AtomicU64,
    /// Per partition: the database's opening for writes this store waits
    /// out, and when it first saw it (see `fallback::await_open`).
    opened: Mutex<HashMap<u32, (chrono::DateTime<chrono::Utc>, Instant)>>,
    /// Milliseconds since `started` of the last look for a database that
    /// stands in for Redis (see `fallback::fence`).
    last_fence_ms: AtomicU64,
}

#[cfg(feature = "audit")]
impl Default for AuditShared {
    fn default() -> Self {
        AuditShared {
            started: Instant::now(),
            // Until a first projection says otherwise, writes staged by
            // other processes may wait in the database.
            suspect: AtomicBool::new(true),
            last_contact_ms: AtomicU64::new(0),
            last_catch_up_ms: AtomicU64::new(0),
            epochs_checked: AtomicBool::new(false),
            recovery: Mutex::new(HashMap::new()),
            trust: Mutex::new(HashMap::new()),
            reopened: Mutex::new(std::collections::HashSet::new()),
            mark_due: Mutex::new(std::collections::HashSet::new()),
            healing: AtomicBool::new(false),
            healer: format!("{}:{}", std::process::id(), uuid::Uuid::new_v4()),
            in_heal: AtomicBool::new(false),
            background_healing: AtomicBool::new(true),
            sync_failing: AtomicBool::new(false),
            guard_until_ms: AtomicU64::new(0),
            fallback_writes: AtomicU64::new(0),
            opened: Mutex::new(HashMap::new()),
            last_fence_ms: AtomicU64::new(0),
        }
    }
}

#[cfg(feature = "audit")]
impl AuditShared {
    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("redis", &self.config.redis_redacted())
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl SessionStore {
    /// Connects to the configured Redis. Fails when it cannot be reached
    /// within `REDIS_TIMEOUT_MS`.
    #[tracing::instrument(skip_all, fields(redis = %config.redis_redacted()), err)]
    pub async fn connect(config: &Config) -> Result<Self> {
        let conn = RedisConn::connect(config, ConnOptions::store(config)).await?;
        Ok(Self::from_parts(conn, config))
    }

    /// Like [`SessionStore::connect`], but connects on first use: the store
    /// can be made while Redis is down (an app server that starts during an
    /// outage serves from the audit database with `DB_SESSION_FALLBACK`).
    pub fn connect_lazy(config: &Config) -> Result<Self> {
        let conn = RedisConn::connect_lazy(config, ConnOptions::store(config))?;
        Ok(Self::from_parts(conn, config))
    }

    fn from_parts(conn: RedisConn, config: &Config) -> Self {
        SessionStore {
            conn,
            keys: Arc::new(KeySpace::new(config)),
            config: Arc::new(config.clone()),
            #[cfg(feature = "audit")]
            audit: None,
            shared: Arc::new(Shared::new(config)),
        }
    }

    /// Attaches the audit database, for `DB_SESSION_SYNC`,
    /// `DB_SESSION_FALLBACK` and reads during recovery.
    #[cfg(feature = "audit")]
    pub fn with_audit(mut self, sink: AuditSink) -> Self {
        self.audit = Some(sink);
        self
    }

    /// A store that never starts a replay in the background when it finds
    /// that Redis lost its data, for a short-lived process (the CLI): the
    /// replay would end with the process, and the healing lock it took would
    /// hold every other healer up until it runs out (15 s). Its reads are
    /// still answered from the database while a partition recovers, and
    /// [`SessionStore::heal`] still heals when called; the worker and the app
    /// servers heal on their own. Applies to every clone of this store.
    #[cfg(feature = "audit")]
    pub fn without_background_healing(self) -> Self {
        self.shared
            .audit
            .background_healing
            .store(false, Ordering::Release);
        self
    }

    /// The attached audit database.
    #[cfg(feature = "audit")]
    pub fn audit(&self) -> Option<&AuditSink> {
        self.audit.as_ref()
    }

    /// Mutations this process staged in the database because Redis was
    /// unreachable.
    #[cfg(feature = "audit")]
    pub fn fallback_writes(&self) -> u64 {
        self.shared.audit.fallback_writes.load(Ordering::Relaxed)
    }

    /// The configuration this store runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The key layout: every partition's keys.
    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    /// A handle on the shared connection, for operations outside the store
    /// (the worker, the CLI's statistics).
    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// The session behind a cookie token, with sliding expiry (see
    /// [`SessionStore::load`]).
    pub async fn load_by_token(&self, token: &Token) -> Result<Option<Record>> {
        self.load(&token.session_id()).await
    }

    /// Reads a session with one `GET`. When its last activity is older than
    /// the touch interval it appends one `touched` event (which also refreshes
    /// the TTL); inside the interval it writes nothing. A missing, expired or
    /// destroyed session is `None`.
    #[tracing::instrument(skip_all, fields(session_id = %id), err)]
    pub async fn load(&self, id: &SessionId) -> Result<Option<Record>> {
        let started = std::time::Instant::now();
        let result: Result<Option<Record>> = async {
            let Some(session) = self.get(id).await? else {
                return Ok(None);
            };
            if !self.touch_due(&session) {
                return Ok(Some(session));
            }
            // Boxed: a due touch is rare, and inline its script call would
            // make every load's future several kilobytes larger.
            match Box::pin(self.touch_at(id, session.clone(), None)).await {
                Ok(s) => Ok(Some(s)),
                // Someone else wrote (and so refreshed it) or ended it meanwhile.
                Err(Error::Conflict { .. }) => Ok(Some(session)),
                Err(Error::NotFound(_) | Error::Ended { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        }
        .await;
        crate::telemetry::record_operation("load", started, &result);
        result
    }

    /// Reads a session with one `GET` and never writes (but see the type's
    /// docs for what happens while Redis is unreachable or recovering).
    pub async fn get(&self, id: &SessionId) -> Result<Option<Record>> {
        self.catch_up().await;
        #[cfg(feature = "audit")]
        if let Err(e) = self.settle(id).await {
            if e.is_unavailable() && self.fallback_enabled() {
                return Box::pin(self.fallback_get(id, e)).await;
            }
            return Err(e);
        }
        let key = self.keys.session(id);
        let mut json: redis::RedisResult<Option<String>> = self.conn.clone().get(&key).await;
        // A read is safe to repeat: the first command on a connection that
        // Redis dropped (a restart) fails even when Redis is back.
        if json.as_ref().is_err_and(script::connection_broke) {
            json = self.conn.clone().get(&key).await;
        }
        match json {
            Ok(Some(j)) => parse_session(id, &j).map(Some),
            #[cfg(feature = "audit")]
            Ok(None) if self.audit.is_some() => Box::pin(self.missed(id)).await,
            Ok(None) => Ok(None),
            Err(e) => {
                let e = Error::from(e);
                if e.is_unavailable() {
                    self.note_unavailable();
                    #[cfg(feature = "audit")]
                    if self.fallback_enabled() {
                        return Box::pin(self.fallback_get(id, e)).await;
                    }
                }
                Err(e)
            }
        }
    }

    /// A read that missed in Redis, with the audit database attached: the
    /// miss stands while Redis holds its complete data set; during recovery
    /// the session comes from the database (see `store::recovery`).
    #[cfg(feature = "audit")]
    async fn missed(&self, id: &SessionId) -> Result<Option<Record>> {
        use recovery::Miss;
        let part = self.keys.for_session(id);
        match self.after_miss(part).await {
            Miss::Stands => Ok(None),
            Miss::Unknown(e) => Err(e),
            Miss::Recovering => self.restore_on_read(id).await,
            Miss::ReadAgain { epoch } => match self.read_in_epoch(id, part, &epoch).await? {
                (Some(j), _) => parse_session(id, &j).map(Some),
                (None, true) => Ok(None),
                // Redis lost its data again since the state was read.
                (None, false) => self.restore_on_read(id).await,
            },
        }
    }

    /// True when the session's last activity is at least one touch interval old.
    pub fn touch_due(&self, session: &Record) -> bool {
        match session.last_activity() {
            Some(t) => {
                let age = chrono::Utc::now().signed_duration_since(t.datetime());
                age.to_std().is_ok_and(|a| a >= self.config.touch_interval)
            }
            None => true,
        }
    }

    /// Whether an id that has no live key ended (and how) or never existed.
    pub async fn tombstone(&self, id: &SessionId) -> Result<Option<Status>> {
        let ledger: Option<String> = match self.conn.clone().get(self.keys.ledger(id)).await {
            Ok(l) => l,
            Err(e) => {
                let e = Error::from(e);
                #[cfg(feature = "audit")]
                if e.is_unavailable() && self.fallback_enabled() {
                    return Ok(self
                        .fallback_view(id)
                        .await?
                        .map(|v| v.session.status())
                        .filter(|s| *s != Status::Live));
                }
                return Err(e);
            }
        };
        Ok(ledger.and_then(|l| match l.split('|').nth(1) {
            Some("destroyed") => Some(Status::Destroyed),
            Some("expired") => Some(Status::Expired),
            _ => None,
        }))
    }

    /// Live sessions of one user, oldest first.
    /// Across partitions this reads each partition's index in turn (not one
    /// atomic snapshot).
    pub async fn user_sessions(&self, user_id: &str) -> Result<Vec<(SessionId, Record)>> {
        let mut out = Vec::new();
        for (id, created, json) in self.user_index(user_id).await? {
            if let Some(json) = json {
                out.push((created, parse_session(&id, &json)?, id));
            }
        }
        out.sort_by_key(|(created, _, _)| *created);
        Ok(out.into_iter().map(|(_, s, id)| (id, s)).collect())
    }

    /// The user's index entries in every partition: session id, creation
    /// time (µs, Redis clock) and the session JSON when it is live.
    pub(crate) async fn user_index(
        &self,
        user_id: &str,
    ) -> Result<Vec<(SessionId, i64, Option<String>)>> {
        let mut conn = self.conn.clone();
        let mut out = Vec::new();
        for part in self.keys.all() {
            let entries: Vec<(Vec<u8>, f64)> =
                conn.zrange_withscores(part.user(user_id), 0, -1).await?;
            let mut entries: Vec<(SessionId, i64)> = entries
                .into_iter()
                .filter_map(|(m, score)| Some((SessionId::from_member(&m)?, score as i64)))
                .collect();
            // A session filed under both member forms is listed once.
            entries.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
            entries.dedup_by(|a, b| a.0 == b.0);
            entries.sort_by_key(|e| e.1);
            if entries.is_empty() {
                continue;
            }
            let keys: Vec<String> = entries.iter().map(|(i, _)| part.session(i)).collect();
            let values: Vec<Option<String>> =
                redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
            for ((id, created), json) in entries.into_iter().zip(values) {
                out.push((id, created, json));
            }
        }
        Ok(out)
    }

    /// Counts for operators: live sessions, stream length, busiest users.
    /// Sums over every partition.
    pub async fn stats(&self, top: usize) -> Result<Stats> {
        let mut conn = self.conn.clone();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let (mut active, mut indexed, mut stream_length) = (0u64, 0u64, 0u64);
        let mut per_user: std::collections::BTreeMap<String, u64> = Default::default();
        // One scan of every partition's user indexes, sorted by partition.
        let mut users: std::collections::BTreeMap<u32, Vec<(String, String)>> = Default::default();
        for k in conn.scan_all(&self.keys.user_pattern()).await? {
            if let Some((part, user)) = self.keys.split_key(&k, |p| &p.user_prefix) {
                let entry = (user.to_owned(), k.clone());
                users.entry(part.partition).or_default().push(entry);
            }
        }
        for part in self.keys.all() {
            active += conn
                .zcount::<_, _, _, u64>(&part.expiry, now_ms, "+inf")
                .await?;
            indexed += conn.zcard::<_, u64>(&part.expiry).await?;
            stream_length += conn.xlen::<_, u64>(&part.stream).await?;
            let Some(users) = users.get(&part.partition) else {
                continue;
            };
            // One pipeline per partition: its keys share one slot.
            let mut pipe = redis::pipe();
            for (_, key) in users {
                pipe.zcard(key);
            }
            let counts: Vec<u64> = pipe.query_async(&mut conn).await?;
            for ((user, _), c) in users.iter().zip(counts) {
                if c > 0 {
                    *per_user.entry(user.clone()).or_default() += c;
                }
            }
        }
        let users_with_sessions = per_user.len() as u64;
        let mut top_users: Vec<UserCount> = per_user
            .into_iter()
            .map(|(user_id, sessions)| UserCount { user_id, sessions })
            .collect();
        top_users.sort_by(|a, b| b.sessions.cmp(&a.sessions).then(a.user_id.cmp(&b.user_id)));
        top_users.truncate(top);
        #[cfg(feature = "audit")]
        let staged_fallback_events = match &self.audit {
            Some(_) => Some(self.staged_count().await?),
            None => None,
        };
        #[cfg(not(feature = "audit"))]
        let staged_fallback_events = None;
        Ok(Stats {
            active_sessions: active,
            awaiting_expiry: indexed.saturating_sub(active),
            stream_length,
            users_with_sessions,
            top_users,
            staged_fallback_events,
        })
    }

    /// Pings Redis, measures the round trip, and checks the settings the
    /// product relies on (an eviction policy that could drop session keys or
    /// the stream is reported as a warning).
    pub async fn health(&self) -> Health {
        let mut conn = self.conn.clone();
        let start = Instant::now();
        let ping: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
        let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
        let mut warnings = Vec::new();
        let (reachable, error) = match ping {
            Ok(_) => (true, None),
            Err(e) => (false, Some(e.to_string())),
        };
        let mut policy = None;
        let mut used_memory = None;
        if reachable {
            let cfg: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
                .arg("GET")
                .arg("maxmemory-policy")
                .query_async(&mut conn)
                .await;
            if let Ok(v) = cfg {
                policy = v.get(1).cloned();
            }
            if let Some(w) = policy.as_deref().and_then(eviction_warning) {
                warnings.push(w);
            }
            used_memory = conn.used_memory().await.ok().flatten();
        }
        Health {
            healthy: reachable,
            redis_reachable: reachable,
            latency_ms,
            maxmemory_policy: policy,
            used_memory_bytes: used_memory,
            warnings,
            error,
        }
    }
}

/// The warning for a `maxmemory-policy` under which Redis may evict session
/// keys, indexes or the event stream. The product requires `noeviction` or a
/// `volatile-*` policy (which only evicts keys with a TTL: sessions that would
/// expire anyway, never the stream or the indexes).
pub(crate) fn eviction_warning(policy: &str) -> Option<String> {
    policy.starts_with("allkeys-").then(|| {
        format!(
            "maxmemory-policy is {policy}: Redis may evict the event stream and indexes; \
             use noeviction (or volatile-lru) for vedfolnir-sessions"
        )
    })
}

fn parse_session(id: &SessionId, json: &str) -> Result<Record> {
    Record::from_json(json).map_err(|e| Error::Corrupt(format!("session {id}: {e}")))
}

/// Operator statistics.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Sessions whose deadline is in the future.
    pub active_sessions: u64,
    /// Sessions past their deadline that the reaper has not expired yet.
    pub awaiting_expiry: u64,
    /// Entries in the event stream.
    pub stream_length: u64,
    /// Users with a session index.
    pub users_with_sessions: u64,
    /// The users with the most sessions.
    pub top_users: Vec<UserCount>,
    /// Events staged in the audit database during a Redis outage and not yet
    /// applied to Redis (with the audit database attached).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staged_fallback_events: Option<u64>,
}

/// One user's session count.
#[derive(Debug, Clone, Serialize)]
pub struct UserCount {
    /// The user.
    pub user_id: String,
    /// Sessions in their index.
    pub sessions: u64,
}

/// The result of a health check.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// True when everything needed to serve sessions works.
    pub healthy: bool,
    /// Redis answered `PING`.
    pub redis_reachable: bool,
    /// Round trip of the `PING`, in milliseconds.
    pub latency_ms: f64,
    /// Redis's `maxmemory-policy`, when it could be read.
    pub maxmemory_policy: Option<String>,
    /// Redis's `used_memory`, when it could be read.
    pub used_memory_bytes: Option<u64>,
    /// Settings that put sessions or the log at risk.
    pub warnings: Vec<String>,
    /// The error when Redis could not be reached.
    pub error: Option<String>,
}
