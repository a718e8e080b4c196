//! The one Lua script behind every mutation, and its replies.
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

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{FromRedisValue, ToRedisArgs};
use sha2::{Digest as _, Sha256};

use crate::config::{Config, Layout};
use crate::error::{Error, Result};
use crate::id::SessionId;
use crate::keys::Keys;
use crate::session::Session;

/// The library: its name (also the function's) and the code `FUNCTION LOAD`
/// takes.
struct Library {
    name: String,
    code: String,
}

static LIBRARY: LazyLock<Library> = LazyLock::new(|| {
    let body = include_str!("../lua/session.lua");
    let digest = hex::encode(Sha256::digest(body.as_bytes()));
    let name = format!("vedfolnir_session_{}", &digest[..16]);
    let code = format!("#!lua name={name}\n{body}\nredis.register_function('{name}', run)\n");
    Library { name, code }
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
pub(crate) async fn load(conn: &mut impl ConnectionLike) -> Result<()> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(&LIBRARY.code)
        .exec_async(conn)
        .await?;
    Ok(())
}

/// True when Redis answered that it does not have the library.
pub(crate) fn not_loaded(e: &redis::RedisError) -> bool {
    e.detail()
        .is_some_and(|d| d.starts_with("Function not found"))
}

/// A bare `FCALL` of the script with the common keys and prefixes, for
/// pipelines (load the library first with [`load`]; a pipeline does not
/// load it by itself).
pub(crate) fn fcall(keys: &Keys, shape: Shape, op: &str) -> redis::Cmd {
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

/// One call of the script: an `FCALL` that loads the library and is sent
/// again when Redis does not have it.
#[derive(Debug, Clone)]
pub(crate) struct Invocation {
    cmd: redis::Cmd,
}

impl Invocation {
    /// Appends the next argument, in the order the operation reads them.
    pub(crate) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    /// Sends the call; loads the library first when Redis does not have it.
    pub(crate) async fn invoke_async<T: FromRedisValue>(
        &self,
        conn: &mut impl ConnectionLike,
    ) -> redis::RedisResult<T> {
        match self.cmd.query_async(conn).await {
            Err(e) if not_loaded(&e) => {
                tracing::debug!("redis does not have the session library; loading it");
                redis::cmd("FUNCTION")
                    .arg("LOAD")
                    .arg("REPLACE")
                    .arg(&LIBRARY.code)
                    .exec_async(conn)
                    .await?;
                self.cmd.query_async(conn).await
            }
            other => other,
        }
    }
}

/// The arguments of a `restore`: a session's state from the audit database
/// put back into Redis under the one rule (see `src/store/admit.rs`).
pub(crate) struct Restore<'a> {
    pub id: &'a SessionId,
    pub state: &'a str,
    pub seq: u64,
    pub user: &'a str,
    pub deadline_ms: i64,
    pub tomb_ms: u64,
    /// The older state Redis holds, when a first call answered `behind`.
    pub behind: Option<&'a Session>,
}

impl Restore<'_> {
    /// The operation's arguments, in the script's order.
    pub(crate) fn args(&self) -> Vec<Vec<u8>> {
        let (old_seq, old_user) = match self.behind {
            Some(s) => (s.version() as i64, s.user_key().unwrap_or_default()),
            None => (-1, String::new()),
        };
        vec![
            self.id.as_str().as_bytes().to_vec(),
            self.id.to_bytes().to_vec(),
            self.state.as_bytes().to_vec(),
            self.seq.to_string().into_bytes(),
            self.user.as_bytes().to_vec(),
            self.deadline_ms.to_string().into_bytes(),
            self.tomb_ms.to_string().into_bytes(),
            old_seq.to_string().into_bytes(),
            old_user.into_bytes(),
        ]
    }
}

/// Decodes one reply of the script.
pub(crate) fn decode(parts: Vec<String>) -> Result<Reply> {
    let mut it = parts.into_iter();
    let tag = it.next().unwrap_or_default();
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

/// Starts an invocation with the keys and prefixes every operation takes.
pub(crate) fn invocation(keys: &Keys, shape: Shape, op: &str) -> Invocation {
    Invocation {
        cmd: fcall(keys, shape, op),
    }
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
/// retried.
pub(crate) async fn run_retrying(
    inv: &Invocation,
    conn: &mut impl ConnectionLike,
) -> Result<(Reply, bool)> {
    match inv.invoke_async::<Vec<String>>(conn).await {
        Ok(parts) => Ok((decode(parts)?, false)),
        Err(e) if connection_broke(&e) => {
            tracing::debug!(err = %e, "the connection broke under a mutation; sending it again");
            let parts: Vec<String> = inv.invoke_async(conn).await?;
            Ok((decode(parts)?, true))
        }
        Err(e) => Err(e.into()),
    }
}
