//! The one Lua script behind every mutation (`src/lua/session.lua`), the
//! arguments of each of its operations, and its replies.
//!
//! The script is a Redis Functions library (Redis 7.0 or later), called with
//! `FCALL`: unlike `EVALSHA`, a call does not run the script's top level (its
//! helper functions are made once, when the library is loaded), which takes
//! a third of the Redis time off a write. The library's name carries a hash
//! of its text, so servers of two releases can share a Redis during a rolling
//! upgrade, each calling its own. When Redis does not have it (a restart
//! without persistence, `FUNCTION FLUSH`, a new primary that never had it),
//! the call loads it with `FUNCTION LOAD` (on every primary of a cluster)
//! and is sent again, so no operator action is ever needed.
//!
//! # Arguments
//!
//! The script reads its arguments by position: `KEYS` are the partition's
//! stream and expiry index; `ARGV[1]` names the operation, `ARGV[2..6]` are
//! the key prefixes, the layout and the look-ahead ([`Shape`]); the
//! operation's own arguments follow, read in order by the script's
//! `arg()`. Each operation has one struct here ([`Create`], [`Write`],
//! [`End`], [`Rotate`], [`DestroyUser`], [`Expire`], [`Look`], `Restore`,
//! `Apply`) whose fields are those arguments, named, and whose
//! [`Operation::args`] writes them in the order the script reads them; the
//! operation's section of the script lists the same names in the same order.
//! An event the script appends takes its [`Stamp`] after the operation's
//! own arguments, before any list of spare event ids.
//!
//! The library's two hot paths, `write` and `create` (a web request's
//! writes, in the lean layout), are functions of their own, called through
//! [`Write::quick`] and [`Create::quick`]: they name every key they touch in
//! `KEYS` and take only the arguments they read, since each argument of an
//! `FCALL` costs Redis time before a line of the script runs.

use std::sync::LazyLock;

use redis::FromRedisValue;
use redis::aio::ConnectionLike;
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::config::{Config, Layout};
use crate::error::{Error, Result};
use crate::event::SCHEMA_VERSION;
use crate::id::SessionId;
use crate::keys::Keys;
#[cfg(feature = "audit")]
use crate::session::Record;
use crate::time::Timestamp;

/// The library: its name (also the function's) and the code `FUNCTION LOAD`
/// takes.
struct Library {
    name: String,
    write: String,
    create: String,
    code: String,
}

/// The library's text: the schema of the events its hot paths append, the
/// script, and the registration of its functions (`run`, and the hot paths
/// `write` and `create` under the name with `_write`, `_create`).
static LIBRARY: LazyLock<Library> = LazyLock::new(|| {
    let body = format!(
        "local SCHEMA = '{SCHEMA_VERSION}'\n{}",
        include_str!("../lua/session.lua")
    );
    let digest = hex::encode(Sha256::digest(body.as_bytes()));
    let name = format!("vedfolnir_session_{}", &digest[..16]);
    let code = format!(
        "#!lua name={name}\n{body}\n\
         redis.register_function('{name}', run)\n\
         redis.register_function('{name}_write', write)\n\
         redis.register_function('{name}_create', create)\n"
    );
    let write = format!("{name}_write");
    let create = format!("{name}_create");
    Library {
        name,
        write,
        create,
        code,
    }
});

/// What the script answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Done: the stream id of the (last) event appended and extra values.
    Ok(String, Vec<String>),
    /// The version moved on; the current JSON when the session still exists.
    Conflict(Option<String>),
    /// No live session (never existed, or past its deadline).
    Missing,
    /// Tombstoned: `destroyed` or `expired`.
    Ended(String),
    /// The new id is taken (only with a broken random source).
    Exists,
    /// More pre-generated event ids are needed.
    NeedIds(usize),
    /// The reaper's candidate was touched or is not due.
    Skip,
    /// The reaper's candidate has no ledger any more.
    Gone,
    /// Replay: Redis holds a newer seq.
    Newer,
    /// Replay: Redis holds the same seq.
    Current,
    /// Replay: the deadline has passed.
    Expired,
    /// Projection: this staged event was applied before.
    Applied,
    /// The reaper's candidate lives within the look-ahead of its deadline
    /// and has no look yet: its JSON, to read the user from.
    Look(String),
    /// Restore: Redis holds an older state whose user must be given; its
    /// JSON.
    Behind(String),
}

/// How the scripts lay out live sessions: the layout and the expiry
/// look-ahead, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub layout: Layout,
    pub lookahead_ms: u64,
}

impl Shape {
    pub(crate) fn of(config: &Config) -> Shape {
        Shape {
            layout: config.layout,
            lookahead_ms: config.expiry_lookahead.as_millis() as u64,
        }
    }
}

/// Loads the library (`FUNCTION LOAD REPLACE`; on a cluster, on every
/// primary), so that pipelined calls find it.
#[cfg(feature = "audit")]
pub(crate) async fn load(conn: &mut impl ConnectionLike) -> Result<()> {
    load_cmd().exec_async(conn).await?;
    Ok(())
}

/// `FUNCTION LOAD REPLACE` of the library.
fn load_cmd() -> redis::Cmd {
    let mut cmd = redis::cmd("FUNCTION");
    cmd.arg("LOAD").arg("REPLACE").arg(&LIBRARY.code);
    cmd
}

/// True when Redis answered that it does not have the library.
pub(crate) fn not_loaded(e: &redis::RedisError) -> bool {
    e.detail()
        .is_some_and(|d| d.starts_with("Function not found"))
}

/// One call of the script: an `FCALL` that loads the library and is sent
/// again when Redis does not have it.
#[derive(Debug, Clone)]
pub(crate) struct Invocation {
    cmd: redis::Cmd,
}

impl Invocation {
    /// Sends the call; loads the library first when Redis does not have it.
    pub(crate) async fn invoke_async<T: FromRedisValue>(
        &self,
        conn: &mut impl ConnectionLike,
    ) -> redis::RedisResult<T> {
        match self.cmd.query_async(conn).await {
            Err(e) if not_loaded(&e) => {
                tracing::debug!("redis does not have the session library; loading it");
                load_cmd().exec_async(conn).await?;
                self.cmd.query_async(conn).await
            }
            other => other,
        }
    }
}

/// `FCALL` of the library with the partition's keys, the operation's name
/// and `ARGV[2..6]`, which every operation takes.
fn head(keys: &Keys, shape: Shape, op: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("FCALL");
    cmd.arg(&LIBRARY.name)
        .arg(2)
        .arg(&keys.stream)
        .arg(&keys.expiry)
        .arg(op)
        .arg(&keys.session_prefix)
        .arg(&keys.ledger_prefix)
        .arg(&keys.user_prefix)
        .arg(shape.layout.as_str())
        .arg(shape.lookahead_ms);
    cmd
}

/// One operation of the script, with its arguments.
pub(crate) trait Operation {
    /// The operation's name, `ARGV[1]`.
    const NAME: &'static str;

    /// Writes the operation's own arguments (from `ARGV[7]`), in the order
    /// the script reads them.
    fn args(&self, a: &mut redis::Cmd);

    /// The call of the script for this operation on partition `keys`.
    fn invocation(&self, keys: &Keys, shape: Shape) -> Invocation {
        Invocation {
            cmd: self.fcall(keys, shape),
        }
    }

    /// A bare `FCALL` for a pipeline, which does not load the library by
    /// itself: `load` it first.
    fn fcall(&self, keys: &Keys, shape: Shape) -> redis::Cmd {
        let mut cmd = head(keys, shape, Self::NAME);
        self.args(&mut cmd);
        cmd
    }
}

/// The id twice: as text (keys, the stream) and as its 32 bytes (index
/// members in the lean layout; the script takes the expiry index's 30 of
/// them and their score from these).
fn id(a: &mut redis::Cmd, id: &SessionId) {
    a.arg(id.as_str()).arg(&id.to_bytes()[..]);
}

/// What the stream entry of an appended event records besides the event's
/// own fields: when it happened, its schema and its trace context.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stamp<'a> {
    pub occurred_at: Timestamp,
    pub schema: u32,
    pub traceparent: Option<&'a str>,
}

impl Stamp<'_> {
    fn args(&self, a: &mut redis::Cmd) {
        a.arg(self.occurred_at.to_string())
            .arg(self.schema)
            .arg(self.traceparent.unwrap_or(""));
    }

    /// The hot paths' last argument: the traceparent, only when there is
    /// one (their events are of this release's schema, a constant of the
    /// library).
    fn traceparent_arg(&self, a: &mut redis::Cmd) {
        if let Some(tp) = self.traceparent {
            a.arg(tp);
        }
    }
}

/// `create`: a new session, its `created` event and, with a per-user
/// limit, the evictions it makes room with.
#[derive(Debug)]
pub(crate) struct Create<'a> {
    pub id: &'a SessionId,
    pub json: &'a str,
    pub ttl_ms: u64,
    pub tomb_ms: u64,
    /// The session's user (empty when anonymous).
    pub user: &'a str,
    /// `SESSION_MAX_PER_USER` for the script to enforce (0: none).
    pub max_per_user: u32,
    pub event_id: Uuid,
    pub payload: &'a str,
    pub stamp: Stamp<'a>,
    /// Event ids for the `destroyed` events of evictions.
    pub spare_ids: &'a [String],
}

impl Operation for Create<'_> {
    const NAME: &'static str = "create";

    fn args(&self, a: &mut redis::Cmd) {
        id(a, self.id);
        a.arg(self.json)
            .arg(self.ttl_ms)
            .arg(self.tomb_ms)
            .arg(self.user)
            .arg(self.max_per_user)
            .arg(self.event_id.to_string())
            .arg(self.payload);
        self.stamp.args(a);
        a.arg(self.spare_ids);
    }
}

/// `write`: one event on a live session at version `expected`, storing the
/// folded `json`.
#[derive(Debug)]
pub(crate) struct Write<'a> {
    pub id: &'a SessionId,
    pub expected: u64,
    pub json: &'a str,
    pub ttl_ms: u64,
    pub tomb_ms: u64,
    /// The session's user after the event.
    pub user: &'a str,
    /// Its user before (the user index moves when they differ).
    pub old_user: &'a str,
    /// The event type (`updated`, `touched`, …).
    pub kind: &'a str,
    pub event_id: Uuid,
    pub payload: &'a str,
    pub stamp: Stamp<'a>,
    /// `ttl_ms` is the call's own rather than the timeout: the script lowers
    /// the expiry entry when the deadline moved earlier (the usual write
    /// leaves the entry alone).
    pub lower: bool,
}

impl Operation for Write<'_> {
    const NAME: &'static str = "write";

    fn args(&self, a: &mut redis::Cmd) {
        id(a, self.id);
        a.arg(self.expected)
            .arg(self.json)
            .arg(self.ttl_ms)
            .arg(self.tomb_ms)
            .arg(self.user)
            .arg(self.old_user)
            .arg(self.kind)
            .arg(self.event_id.to_string())
            .arg(self.payload);
        self.stamp.args(a);
        if self.lower {
            a.arg("lower");
        }
    }
}

/// An empty command with room for `args` arguments and, besides `bulk`
/// bytes of JSON, the keys, ids and times of a call: built once, not grown.
fn sized(args: usize, bulk: usize) -> redis::Cmd {
    redis::Cmd::with_capacity(args, bulk + 512)
}

impl Write<'_> {
    /// The hot path of this write (the library's `write`), for the lean
    /// layout with the configured time to live (longer than the look-ahead)
    /// and the user unchanged, which is every write of a web request. It
    /// names the keys it touches and passes only what the script reads:
    /// about 30 % less Redis time than `run`'s `write`.
    pub(crate) fn quick(&self, keys: &Keys) -> Invocation {
        debug_assert!(!self.lower && self.user == self.old_user);
        let mut cmd = sized(16, self.json.len() + self.payload.len());
        cmd.arg("FCALL")
            .arg(&LIBRARY.write)
            .arg(3)
            .arg(&keys.stream)
            .arg(keys.session(self.id))
            .arg(keys.ledger(self.id))
            .arg(self.expected)
            .arg(self.json)
            .arg(self.ttl_ms)
            .arg(self.tomb_ms)
            .arg(self.id.as_str())
            .arg(self.kind)
            .arg(self.event_id.to_string())
            .arg(self.payload)
            .arg(self.stamp.occurred_at.to_string())
            .arg(self.user);
        self.stamp.traceparent_arg(&mut cmd);
        Invocation { cmd }
    }
}

impl Create<'_> {
    /// The hot path of this create (the library's `create`), for the lean
    /// layout, a time to live longer than the look-ahead (`lookahead_ms`)
    /// and no per-user limit for the script to enforce.
    pub(crate) fn quick(&self, keys: &Keys, lookahead_ms: u64) -> Invocation {
        debug_assert!(self.max_per_user == 0 && self.ttl_ms > lookahead_ms);
        let signed_in = !self.user.is_empty();
        let mut cmd = sized(16, self.json.len() + self.payload.len());
        cmd.arg("FCALL")
            .arg(&LIBRARY.create)
            .arg(if signed_in { 4 } else { 3 })
            .arg(&keys.stream)
            .arg(keys.session(self.id))
            .arg(&keys.expiry);
        if signed_in {
            cmd.arg(keys.user(self.user));
        }
        cmd.arg(self.json)
            .arg(self.ttl_ms)
            .arg(lookahead_ms)
            .arg(self.id.as_str())
            .arg(&self.id.to_bytes()[..])
            .arg(self.event_id.to_string())
            .arg(self.payload)
            .arg(self.stamp.occurred_at.to_string())
            .arg(self.user);
        self.stamp.traceparent_arg(&mut cmd);
        Invocation { cmd }
    }
}

/// `end`: a session's end (`destroyed`), at version `expected` when the
/// caller knows it (-1: whatever the ledger says, or the session's JSON
/// back).
#[derive(Debug)]
pub(crate) struct End<'a> {
    pub id: &'a SessionId,
    pub expected: i64,
    /// The user at that version (empty when unknown or anonymous).
    pub user: &'a str,
    /// The event type.
    pub kind: &'a str,
    /// The status the tombstone records.
    pub status: &'a str,
    pub tomb_ms: u64,
    pub event_id: Uuid,
    pub payload: &'a str,
    pub stamp: Stamp<'a>,
}

impl Operation for End<'_> {
    const NAME: &'static str = "end";

    fn args(&self, a: &mut redis::Cmd) {
        id(a, self.id);
        a.arg(self.expected)
            .arg(self.user)
            .arg(self.kind)
            .arg(self.status)
            .arg(self.tomb_ms)
            .arg(self.event_id.to_string())
            .arg(self.payload);
        self.stamp.args(a);
    }
}

/// `rotate`: ends `old` (at version `expected`, `destroyed{rotated}`) and
/// creates `new` in one step.
#[derive(Debug)]
pub(crate) struct Rotate<'a> {
    pub old: &'a SessionId,
    pub expected: u64,
    pub old_user: &'a str,
    pub new: &'a SessionId,
    pub json: &'a str,
    pub ttl_ms: u64,
    pub tomb_ms: u64,
    pub user: &'a str,
    pub max_per_user: u32,
    pub end_id: Uuid,
    pub end_payload: &'a str,
    pub create_id: Uuid,
    pub create_payload: &'a str,
    pub stamp: Stamp<'a>,
    pub spare_ids: &'a [String],
}

impl Operation for Rotate<'_> {
    const NAME: &'static str = "rotate";

    fn args(&self, a: &mut redis::Cmd) {
        id(a, self.old);
        a.arg(self.expected).arg(self.old_user);
        id(a, self.new);
        a.arg(self.json)
            .arg(self.ttl_ms)
            .arg(self.tomb_ms)
            .arg(self.user)
            .arg(self.max_per_user)
            .arg(self.end_id.to_string())
            .arg(self.end_payload)
            .arg(self.create_id.to_string())
            .arg(self.create_payload);
        self.stamp.args(a);
        a.arg(self.spare_ids);
    }
}

/// `destroy_user`: ends every session the partition holds for `user`, one
/// `destroyed` event each, with ids from `event_ids`.
#[derive(Debug)]
pub(crate) struct DestroyUser<'a> {
    pub user: &'a str,
    pub tomb_ms: u64,
    pub payload: &'a str,
    pub stamp: Stamp<'a>,
    pub event_ids: &'a [String],
}

impl Operation for DestroyUser<'_> {
    const NAME: &'static str = "destroy_user";

    fn args(&self, a: &mut redis::Cmd) {
        a.arg(self.user).arg(self.tomb_ms).arg(self.payload);
        self.stamp.args(a);
        a.arg(self.event_ids);
    }
}

/// `expire`: the reaper's visit of the expiry index entry scored `score`.
#[derive(Debug)]
pub(crate) struct Expire<'a> {
    pub id: &'a SessionId,
    /// The entry's score, exactly (a lean entry's carries the id's last
    /// two bytes).
    pub score: f64,
    pub tomb_ms: u64,
    pub event_id: Uuid,
    pub payload: &'a str,
    pub stamp: Stamp<'a>,
}

impl Operation for Expire<'_> {
    const NAME: &'static str = "expire";

    fn args(&self, a: &mut redis::Cmd) {
        id(a, self.id);
        a.arg(self.score)
            .arg(self.tomb_ms)
            .arg(self.event_id.to_string())
            .arg(self.payload);
        self.stamp.args(a);
    }
}

/// `look`: records the version and user of a live session near its
/// deadline (what `expired` needs once Redis has dropped the key).
#[derive(Debug)]
pub(crate) struct Look<'a> {
    pub id: &'a SessionId,
    pub seq: u64,
    pub user: &'a str,
    pub tomb_ms: u64,
}

impl Operation for Look<'_> {
    const NAME: &'static str = "look";

    fn args(&self, a: &mut redis::Cmd) {
        id(a, self.id);
        a.arg(self.seq).arg(self.user).arg(self.tomb_ms);
    }
}

/// `restore`: a session's state from the audit database put back into
/// Redis under the one rule (see `src/store/admit.rs`).
#[cfg(feature = "audit")]
#[derive(Debug)]
pub(crate) struct Restore<'a> {
    pub id: &'a SessionId,
    pub state: &'a str,
    pub seq: u64,
    pub user: &'a str,
    pub deadline_ms: i64,
    pub tomb_ms: u64,
    /// The older state Redis holds, when a first call answered `behind`.
    pub behind: Option<&'a Record>,
}

#[cfg(feature = "audit")]
impl Operation for Restore<'_> {
    const NAME: &'static str = "restore";

    fn args(&self, a: &mut redis::Cmd) {
        let (old_seq, old_user) = match self.behind {
            Some(s) => (s.version() as i64, s.user_key().unwrap_or_default()),
            None => (-1, String::new()),
        };
        id(a, self.id);
        a.arg(self.state)
            .arg(self.seq)
            .arg(self.user)
            .arg(self.deadline_ms)
            .arg(self.tomb_ms)
            .arg(old_seq)
            .arg(old_user);
    }
}

/// The `base` of an [`Apply`] folded on an ended session: it matches no
/// live version, so only the tombstone's branch of the script takes it.
#[cfg(feature = "audit")]
pub(crate) const ENDED_BASE: u64 = u64::MAX;

/// `apply`: a staged event projected onto the session's state in Redis at
/// version `base`, leaving it `status_after`.
#[cfg(feature = "audit")]
#[derive(Debug)]
pub(crate) struct Apply<'a> {
    pub id: &'a SessionId,
    pub base: u64,
    /// The folded JSON (empty when the event ends the session).
    pub json: &'a str,
    pub ttl_ms: u64,
    pub tomb_ms: u64,
    pub user: &'a str,
    pub old_user: &'a str,
    pub kind: &'a str,
    pub status_after: &'a str,
    pub event_id: Uuid,
    pub payload: &'a str,
    pub stamp: Stamp<'a>,
}

#[cfg(feature = "audit")]
impl Operation for Apply<'_> {
    const NAME: &'static str = "apply";

    fn args(&self, a: &mut redis::Cmd) {
        id(a, self.id);
        a.arg(self.base)
            .arg(self.json)
            .arg(self.ttl_ms)
            .arg(self.tomb_ms)
            .arg(self.user)
            .arg(self.old_user)
            .arg(self.kind)
            .arg(self.status_after)
            .arg(self.event_id.to_string())
            .arg(self.payload);
        self.stamp.args(a);
    }
}

/// Decodes one reply of the script.
pub(crate) fn decode(parts: Vec<String>) -> Result<Reply> {
    let mut it = parts.into_iter();
    let tag = it.next().unwrap_or_default();
    // The hot paths answer a success with the stream id alone, which no tag
    // looks like (`<ms>-<seq>`).
    if tag.contains('-') {
        return Ok(Reply::Ok(tag, it.collect()));
    }
    let reply = match tag.as_str() {
        "ok" => {
            let sid = it.next().unwrap_or_default();
            Reply::Ok(sid, it.collect())
        }
        "conflict" => Reply::Conflict(it.next()),
        "missing" => Reply::Missing,
        "ended" => Reply::Ended(it.next().unwrap_or_default()),
        "exists" => Reply::Exists,
        "need_ids" => Reply::NeedIds(it.next().and_then(|n| n.parse().ok()).unwrap_or(1)),
        "skip" => Reply::Skip,
        "gone" => Reply::Gone,
        "newer" => Reply::Newer,
        "current" => Reply::Current,
        "expired" => Reply::Expired,
        "applied" => Reply::Applied,
        "look" => Reply::Look(it.next().unwrap_or_default()),
        "behind" => Reply::Behind(it.next().unwrap_or_default()),
        other => {
            return Err(Error::Corrupt(format!(
                "unexpected reply {other:?} from the session script"
            )));
        }
    };
    Ok(reply)
}

/// True when a command failed because its connection broke (Redis
/// restarted, `CLIENT KILL`, a reset), so that the same command on a new
/// connection may well succeed. A refused connection or a timeout is not:
/// Redis is down or slow, and trying again at once only delays the fallback.
pub(crate) fn connection_broke(e: &redis::RedisError) -> bool {
    (e.is_connection_dropped() || e.is_io_error()) && !e.is_connection_refusal() && !e.is_timeout()
}

/// Runs an invocation and decodes its reply; sent once more when the
/// connection broke. The invocation is the
/// same (same event ids, same expected version), so the retry is idempotent
/// in effect: when the first attempt was applied before its connection
/// broke, the script answers as for a write that already happened (a
/// conflict whose state is the one the caller wrote, an `exists`, an
/// `ended`), and the caller recognizes its own write. Returns whether it
/// retried. When the second attempt cannot reach Redis either, the error is
/// the first one's: the write may have been applied, which a refusal of the
/// second would hide ([`crate::Error::may_have_applied`]).
pub(crate) async fn run_retrying(
    inv: &Invocation,
    conn: &mut impl ConnectionLike,
) -> Result<(Reply, bool)> {
    match inv.invoke_async::<Vec<String>>(conn).await {
        Ok(parts) => Ok((decode(parts)?, false)),
        Err(e) if connection_broke(&e) => {
            tracing::debug!(err = %e, "the connection broke under a mutation; sending it again");
            match inv.invoke_async::<Vec<String>>(conn).await {
                Ok(parts) => Ok((decode(parts)?, true)),
                // Redis may have applied the first attempt: its error says
                // so (a refusal of the second would say it sent nothing).
                Err(again) if again.is_connection_refusal() || connection_broke(&again) => {
                    Err(e.into())
                }
                Err(again) => Err(again.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}
