//! What the fault suite records: every operation a client invoked, what it
//! was told, and when; every fault and when the system settled after it; and
//! the facts read from the audit database at the end. The checker
//! (`checker.rs`) is a pure function of these values, so its unit tests can
//! feed it histories written by hand.
//!
//! Times are offsets from the start of the run on one monotonic clock (the
//! harness's `Instant`), so invocations, completions and faults compare
//! directly. Session ids are `hex(sha256(token))`; the history never holds a
//! cookie token.

use std::fmt;
use std::time::Duration;

use serde_json::Value;

/// What a client asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `POST /login` as the user with this id (carrying the client's cookie,
    /// if any, so a live session is rotated).
    Login { user_id: i64 },
    /// `POST /logout`.
    Logout,
    /// `POST /logout-all`: ends every session of the cookie's user.
    LogoutAll,
    /// `GET /me`: the session context, with the platform fields.
    Me,
    /// `POST /platform` with a unique `platform_name`.
    Platform { name: String },
    /// `PUT /session/data/{key}` with a unique string value.
    Put { key: String, value: String },
    /// `GET /session/data/{key}`.
    Get { key: String },
    /// `POST /session/incr/{key}` (`?via=modify` for the closure path) with
    /// `{"by": by}`.
    Incr {
        key: String,
        by: i64,
        via_modify: bool,
    },
    /// `vedfolnir-sessions session destroy <session> --reason admin`.
    Destroy,
}

impl Action {
    /// A short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Login { .. } => "login",
            Action::Logout => "logout",
            Action::LogoutAll => "logout-all",
            Action::Me => "me",
            Action::Platform { .. } => "platform",
            Action::Put { .. } => "data put",
            Action::Get { .. } => "data get",
            Action::Incr {
                via_modify: false, ..
            } => "incr",
            Action::Incr {
                via_modify: true, ..
            } => "incr via modify",
            Action::Destroy => "cli destroy",
        }
    }
}

/// What the `Set-Cookie` header of a response did to the session cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CookieChange {
    /// No session cookie in the response.
    Absent,
    /// The same token again (sliding expiry).
    Same,
    /// A new token: the session id it stands for.
    New(String),
    /// A removal cookie.
    Cleared,
}

/// What a client was told.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// An HTTP response: its status, the cookie change and the JSON body
    /// (`Value::Null` when empty or not JSON).
    Http {
        status: u16,
        cookie: CookieChange,
        body: Value,
    },
    /// The CLI exited with this code.
    Exit { code: i32 },
    /// The request never reached a server (connection refused): it had no
    /// effect.
    NotSent(String),
    /// A timeout or a connection lost mid-request: it may or may not have
    /// taken effect.
    Lost(String),
}

impl Reply {
    /// The HTTP status, if there was a response.
    pub fn status(&self) -> Option<u16> {
        match self {
            Reply::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The `error` code of a JSON error body.
    pub fn error_code(&self) -> Option<&str> {
        match self {
            Reply::Http { body, .. } => body.get("error").and_then(Value::as_str),
            _ => None,
        }
    }

    /// The JSON body, if there was one.
    pub fn body(&self) -> Option<&Value> {
        match self {
            Reply::Http { body, .. } => Some(body),
            _ => None,
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Http { status, body, .. } => match body.get("error").and_then(Value::as_str) {
                Some(code) => write!(f, "{status} {code}"),
                None => write!(f, "{status}"),
            },
            Reply::Exit { code } => write!(f, "exit {code}"),
            Reply::NotSent(e) => write!(f, "not sent ({e})"),
            Reply::Lost(e) => write!(f, "lost ({e})"),
        }
    }
}

/// One operation: invoked, completed, and what its client was told.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    /// Its position in the history.
    pub id: usize,
    /// Which client (`c0`, `ctr1`, `admin`, …).
    pub actor: String,
    pub action: Action,
    /// The session the request's cookie named (for `Destroy`, the target).
    pub session: Option<String>,
    pub invoke: Duration,
    pub complete: Duration,
    pub reply: Reply,
    /// Made after the faults stopped and the system settled.
    pub final_read: bool,
}

/// The kinds of fault the suite injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// The TCP proxy in front of Redis closes every connection and refuses
    /// new ones, then is restored.
    RedisCut,
    /// The Redis proxy adds latency per chunk (beyond `REDIS_TIMEOUT_MS`).
    RedisSlow,
    /// `FLUSHALL` on Redis.
    RedisFlush,
    /// `SHUTDOWN NOSAVE`, then Redis starts again empty on the same port.
    RedisRestart,
    /// `CLIENT KILL TYPE normal` on Redis.
    RedisClientKill,
    /// The TCP proxy in front of PostgreSQL is cut, then restored.
    DbCut,
    /// The PostgreSQL proxy closes every live connection once.
    DbReset,
    /// An app server is SIGKILLed and started again.
    AppKill,
    /// The worker is SIGKILLed and started again.
    WorkerKill,
    /// The audit worker is SIGSTOPped for longer than its lease while a
    /// second one takes the lease over, then SIGCONTed (it must not commit
    /// with its stale fencing token); the second one is then stopped with
    /// SIGTERM.
    WorkerStop,
    /// The PostgreSQL proxy adds latency per chunk.
    DbSlow,
    /// The harness holds `LOCK TABLE session_snapshots IN EXCLUSIVE MODE`
    /// in a transaction of its own.
    DbLock,
    /// The harness appends invalid entries to an event stream (see
    /// [`Injected`]).
    Poison,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::RedisCut => "redis proxy cut",
            FaultKind::RedisSlow => "redis proxy slow",
            FaultKind::RedisFlush => "redis flushall",
            FaultKind::RedisRestart => "redis restart empty",
            FaultKind::RedisClientKill => "redis client kill",
            FaultKind::DbCut => "db proxy cut",
            FaultKind::DbReset => "db proxy reset",
            FaultKind::AppKill => "app sigkill",
            FaultKind::WorkerKill => "worker sigkill",
            FaultKind::WorkerStop => "worker sigstop past lease",
            FaultKind::DbSlow => "db proxy slow",
            FaultKind::DbLock => "db snapshots locked",
            FaultKind::Poison => "poison entries",
        }
    }

    /// Faults of the audit database alone, during which Redis is healthy.
    pub fn database_only(self) -> bool {
        matches!(
            self,
            FaultKind::DbCut | FaultKind::DbSlow | FaultKind::DbLock
        )
    }

    /// Faults after which Redis may have lost entries it held.
    pub fn loses_redis_data(self) -> bool {
        matches!(self, FaultKind::RedisFlush | FaultKind::RedisRestart)
    }
}

/// One injected fault.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRecord {
    pub kind: FaultKind,
    /// The app server, for `AppKill`.
    pub target: Option<usize>,
    /// When it began.
    pub start: Duration,
    /// When it was undone (the proxy restored, the process started again);
    /// equal to `start` for instantaneous faults.
    pub end: Duration,
    /// When the harness saw the system settled after it (healed, caught up,
    /// the process serving); `None` when it did not within its bound.
    pub settled: Option<Duration>,
}

/// A child process that exited without the harness killing it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessExit {
    /// `worker`, `app0`, `app1`.
    pub who: String,
    pub at: Duration,
    /// False when it exited while starting (an app server before printing
    /// its address, the worker within its first seconds).
    pub started: bool,
    /// Its exit status, as text.
    pub status: String,
}

/// One row of `session_events`, as the checker needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub session_id: String,
    pub seq: i64,
    pub event_type: String,
    /// The payload JSON text.
    pub payload: String,
    /// `stream` or `fallback`.
    pub source: String,
    pub user_id: Option<String>,
    pub occurred_at: chrono::DateTime<chrono::Utc>,
    pub schema_version: i32,
}

/// One row of `session_snapshots`.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRow {
    pub session_id: String,
    pub seq: i64,
    /// `live`, `destroyed` or `expired`.
    pub status: String,
    /// The folded session JSON text.
    pub state: String,
}

/// A stream entry the harness appended that the audit must refuse: invalid
/// input, the only kind of entry that may become a dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct Injected {
    /// What is wrong with it (`event_id with a NUL`, …).
    pub what: String,
    pub stream_id: String,
    /// The session it names (never one a client uses).
    pub session_id: String,
    /// When it was appended.
    pub at: Duration,
}

/// Damage the harness did to Redis after the run, and what `verify` made of
/// it.
#[derive(Debug, Clone, PartialEq)]
pub struct DamageCheck {
    /// (what was done, the session it was done to).
    pub damaged: Vec<(String, String)>,
    /// `verify` after the damage: must exit 1 naming every damaged session.
    pub detected: VerifyRun,
    /// `verify --repair`.
    pub repair: VerifyRun,
    /// `verify` after the repair: must exit 0.
    pub after: VerifyRun,
}

/// One row of `dead_letters`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The stream entry it was.
    pub stream_id: String,
    /// The raw stream entry's fields.
    pub fields: String,
    pub reason: String,
}

/// `vedfolnir-sessions verify` at quiescence.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyRun {
    /// The exit code (`None`: it timed out or could not start).
    pub code: Option<i32>,
    pub stdout: String,
}

/// Facts read from the audit database (directly, not through the proxy) and
/// from `verify` once the system settled.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DbFacts {
    pub events: Vec<AuditEvent>,
    pub dead_letters: Vec<DeadLetter>,
    pub snapshots: Vec<SnapshotRow>,
    pub verify: Option<VerifyRun>,
    /// The damage done after `verify` passed, when the run did it.
    pub damage: Option<DamageCheck>,
    /// Mutations the app servers staged in the database while Redis was
    /// unreachable (from their logs): the fallback was exercised.
    pub staged: u64,
}

/// A whole run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    pub ops: Vec<Op>,
    pub faults: Vec<FaultRecord>,
    /// Children that exited by themselves (the harness restarts them, as a
    /// supervisor would).
    pub exits: Vec<ProcessExit>,
    /// Invalid entries the harness appended to the streams.
    pub injected: Vec<Injected>,
}
