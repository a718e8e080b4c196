//! One session's derived state in Redis, read and put right in one place.
//!
//! `verify`, `verify --repair` and the database sweep of overdue sessions
//! ([`crate::reaper::OverdueSweeper`]) need to know how a session is laid out
//! in Redis beyond its key: the ledger, the expiry index, the user index and
//! how their TTLs and scores relate. That knowledge lives here and in
//! `src/lua/repair.lua`, nowhere else outside the store, so that a change of
//! the layout is a change of these two files.
//!
//! # The layout (`docs/keys.md`)
//!
//! For a live session whose key exists, at version `V`, user `U`, deadline
//! `D` (Redis's clock, ms), look-ahead `A` (`SESSION_EXPIRY_LOOKAHEAD_MS`):
//!
//! | derived state | must hold | kind when it does not |
//! |---|---|---|
//! | the key | a TTL, ending at `D` (±1 s) | `ttl_missing`, `ttl_wrong` |
//! | the ledger `<ns>seq:<id>` | absent, or `V\|live\|U`; present in the ledger layout | `ledger_missing`, `ledger_invalid`, `ledger_seq`, `ledger_user`, `ledger_status` |
//! | the ledger's TTL | `D` + `SESSION_TOMBSTONE_TTL` (±1 s) | `ledger_ttl` |
//! | the expiry index | the session, scored at most `D` with a ledger, at most `D - A` without (±1 s) | `expiry_index_missing`, `expiry_index_wrong` |
//! | the user index `<ns>user:U` | the session (when `U` is not empty) | `user_index_missing` |
//!
//! An expiry entry earlier than that is fine: the reaper files it again
//! from the key's TTL when it comes due. A later one is not: the key could
//! expire before the reaper has recorded what its `expired` event needs.
//!
//! A session past its deadline (no key) whose ledger is still live must be
//! in the expiry index, or the reaper never writes its `expired` event
//! (`expiry_index_missing`).

use std::sync::LazyLock;

use redis::Script;
use redis::aio::ConnectionLike;

use crate::config::Layout;
use crate::error::{Error, Result};
use crate::id::SessionId;
use crate::keys::Keys;
use crate::store::script::Shape;

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/repair.lua")));

/// How far a TTL, an index score or a deadline may be from another one that
/// should be equal: they are set by one script from one clock reading, so
/// this only has to absorb the milliseconds between two reads and the
/// writer's clock of a fallback write.
pub(crate) const TOLERANCE_MS: i64 = 1000;

/// A parsed ledger: `<seq>|<status>|<user_id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ledger {
    /// The last seq Redis appended for the session.
    pub seq: u64,
    /// `live`, `destroyed` or `expired`.
    pub status: String,
    /// The user, empty when anonymous.
    pub user: String,
}

impl Ledger {
    fn parse(raw: &str) -> Option<Ledger> {
        let mut parts = raw.splitn(3, '|');
        let seq = parts.next()?.parse().ok()?;
        let status = parts.next()?;
        if status.is_empty() || !status.chars().all(|c| c.is_ascii_alphabetic()) {
            return None;
        }
        Some(Ledger {
            seq,
            status: status.to_owned(),
            user: parts.next()?.to_owned(),
        })
    }

    /// True while the ledger says the session lives.
    pub(crate) fn live(&self) -> bool {
        self.status == "live"
    }
}

/// One session's derived state in Redis, read atomically by one script call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RedisView {
    /// Redis's clock when it was read, ms.
    pub now_ms: i64,
    /// The session JSON, when the key exists.
    pub json: Option<String>,
    /// The key's `PTTL` (-1: no TTL, -2: no key).
    pub pttl: i64,
    /// The ledger as stored.
    pub ledger_raw: Option<String>,
    /// The ledger, when it parses.
    pub ledger: Option<Ledger>,
    /// The ledger's `PTTL`.
    pub ledger_pttl: i64,
    /// The session's score in the expiry index, exactly (a lean entry's
    /// fraction carries the id's last two bytes).
    pub expiry: Option<f64>,
    /// For each user asked about, the session's score in that user's index.
    pub users: Vec<(String, Option<i64>)>,
}

impl RedisView {
    /// Whether the session is in `user`'s index; `None` when that index was
    /// not read.
    pub(crate) fn in_user_index(&self, user: &str) -> Option<bool> {
        self.users
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, s)| s.is_some())
    }

    /// The expiry index's time for the session, whole ms.
    pub(crate) fn expiry_ms(&self) -> Option<i64> {
        self.expiry.map(|s| s.floor() as i64)
    }

    /// When the key runs out (Redis's clock, ms), if it has a TTL.
    pub(crate) fn key_deadline(&self) -> Option<i64> {
        (self.pttl > 0).then(|| self.now_ms + self.pttl)
    }
}

/// `SCRIPT LOAD`s the script so that pipelined `EVALSHA`s find it.
pub(crate) async fn load(conn: &mut impl ConnectionLike) -> Result<()> {
    SCRIPT.prepare_invoke().load_async(conn).await?;
    Ok(())
}

/// An invocation with the common head: the expiry index, the prefixes and
/// the layout.
fn invocation<'a>(keys: &Keys, shape: Shape, op: &str) -> redis::ScriptInvocation<'a> {
    let mut inv = SCRIPT.prepare_invoke();
    inv.key(&keys.expiry)
        .arg(op)
        .arg(&keys.session_prefix)
        .arg(&keys.ledger_prefix)
        .arg(&keys.user_prefix)
        .arg(shape.layout.as_str())
        .arg(shape.lookahead_ms);
    inv
}

/// The 32 bytes of an id (its lean index member); an id that does not parse
/// has none.
fn member(id: &str) -> Vec<u8> {
    id.parse::<SessionId>()
        .map(|s| s.to_bytes().to_vec())
        .unwrap_or_default()
}

/// A bare `EVALSHA` reading one session, for pipelines (load the script
/// first with [`load`]). `users` are the user indexes to look in.
pub(crate) fn inspect_cmd(keys: &Keys, shape: Shape, id: &str, users: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(SCRIPT.get_hash())
        .arg(1)
        .arg(&keys.expiry)
        .arg("inspect")
        .arg(&keys.session_prefix)
        .arg(&keys.ledger_prefix)
        .arg(&keys.user_prefix)
        .arg(shape.layout.as_str())
        .arg(shape.lookahead_ms)
        .arg(id)
        .arg(member(id))
        .arg(users);
    cmd
}

/// Reads one session (loads the script when Redis does not have it).
pub(crate) async fn inspect(
    conn: &mut impl ConnectionLike,
    keys: &Keys,
    shape: Shape,
    id: &str,
    users: &[&str],
) -> Result<RedisView> {
    let mut inv = invocation(keys, shape, "inspect");
    inv.arg(id).arg(member(id)).arg(users);
    let parts: Vec<String> = inv.invoke_async(conn).await?;
    decode_inspect(parts, users)
}

/// Decodes the reply of `inspect` for the `users` it was asked about.
pub(crate) fn decode_inspect(parts: Vec<String>, users: &[&str]) -> Result<RedisView> {
    let bad = || {
        Error::Corrupt(format!(
            "unexpected reply to inspect: {} parts",
            parts.len()
        ))
    };
    if parts.len() != 8 + users.len() {
        return Err(bad());
    }
    let int = |s: &str| s.parse::<i64>().map_err(|_| bad());
    // Scores are doubles on the wire: the expiry index's is kept exactly (a
    // lean entry's fraction names the id), a user index's in whole units.
    let exact = |s: &str| -> Result<Option<f64>> {
        if s.is_empty() {
            return Ok(None);
        }
        s.parse::<f64>().map(Some).map_err(|_| bad())
    };
    let score = |s: &str| -> Result<Option<i64>> { Ok(exact(s)?.map(|f| f as i64)) };
    let ledger = Ledger::parse(&parts[4]);
    let mut users: Vec<(String, Option<i64>)> = users
        .iter()
        .zip(&parts[8..])
        .map(|(u, s)| Ok(((*u).to_owned(), score(s)?)))
        .collect::<Result<_>>()?;
    // The script always looks in the index of the ledger's user.
    if let Some(l) = &ledger
        && !l.user.is_empty()
        && !users.iter().any(|(u, _)| *u == l.user)
    {
        users.push((l.user.clone(), score(&parts[7])?));
    }
    Ok(RedisView {
        now_ms: int(&parts[0])?,
        json: (parts[1] == "1").then(|| parts[2].clone()),
        pttl: int(&parts[3])?,
        ledger_raw: (!parts[4].is_empty()).then(|| parts[4].clone()),
        ledger,
        ledger_pttl: int(&parts[5])?,
        expiry: exact(&parts[6])?,
        users,
    })
}

/// What the log says a live session is: the state Redis must derive from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Expected {
    /// The session JSON.
    pub json: String,
    /// Its version (the seq of its last event).
    pub seq: u64,
    /// Its user, empty when anonymous.
    pub user: String,
    /// Its deadline (Redis's clock, ms), when the log tells it.
    pub deadline_ms: Option<i64>,
}

/// One thing wrong with a session's derived state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    /// What is wrong, one word (the table in the module docs).
    pub kind: &'static str,
    /// In words, with the values seen.
    pub detail: String,
    /// True when [`reindex`] puts it right.
    pub reindexable: bool,
}

fn problem(kind: &'static str, detail: String) -> Problem {
    Problem {
        kind,
        detail,
        reindexable: true,
    }
}

/// The layout's checks of a session whose key exists and holds the version
/// the log expects (`exp`); `tomb_ms` is `SESSION_TOMBSTONE_TTL`. The user
/// index of `exp.user` must have been read (see [`RedisView::in_user_index`]).
pub(crate) fn check_live(
    view: &RedisView,
    exp: &Expected,
    tomb_ms: i64,
    shape: Shape,
) -> Vec<Problem> {
    let mut out = Vec::new();
    let key_deadline = view.key_deadline();
    // The log's deadline when it tells one, else the key's own.
    let deadline = exp.deadline_ms.or(key_deadline);
    match (&view.ledger, &view.ledger_raw) {
        // The lean layout records a live session's version and user only
        // near its deadline; the reaper writes them when it needs them.
        (None, None) if shape.layout == Layout::Lean => {}
        (None, None) => out.push(problem(
            "ledger_missing",
            format!(
                "no ledger; writes to the session fail (expected {}|live|{})",
                exp.seq, exp.user
            ),
        )),
        (None, Some(raw)) => out.push(problem(
            "ledger_invalid",
            format!("the ledger {raw:?} does not parse"),
        )),
        (Some(l), _) if !l.live() => out.push(Problem {
            kind: "ledger_status",
            detail: format!(
                "the ledger says {} at seq {} while the key is live at seq {}",
                l.status, l.seq, exp.seq
            ),
            reindexable: false,
        }),
        (Some(l), _) => {
            if l.seq != exp.seq {
                out.push(problem(
                    "ledger_seq",
                    format!(
                        "the ledger is at seq {}, the session at {}: the reaper would end it at the wrong seq",
                        l.seq, exp.seq
                    ),
                ));
            }
            if l.user != exp.user {
                out.push(problem(
                    "ledger_user",
                    format!(
                        "the ledger names user {:?}, the session {:?}",
                        l.user, exp.user
                    ),
                ));
            }
        }
    }
    if view.ledger.is_some() {
        let expected = deadline.map(|d| d - view.now_ms + tomb_ms);
        match (view.ledger_pttl, expected) {
            (-1, _) => out.push(problem(
                "ledger_ttl",
                "the ledger has no TTL".to_owned(),
            )),
            (t, Some(e)) if (t - e).abs() > TOLERANCE_MS => out.push(problem(
                "ledger_ttl",
                format!("the ledger expires in {t} ms, expected {e} ms (the key's TTL plus the tombstone TTL)"),
            )),
            _ => {}
        }
    }
    if view.pttl == -1 {
        out.push(problem(
            "ttl_missing",
            "the key has no TTL: it never expires".to_owned(),
        ));
    } else if let (Some(kd), Some(d)) = (key_deadline, exp.deadline_ms)
        && (kd - d).abs() > TOLERANCE_MS
    {
        out.push(problem(
            "ttl_wrong",
            format!("the key expires at {kd} ms, the log's deadline is {d} ms"),
        ));
    }
    // The latest the reaper may first look: the deadline when a ledger
    // holds the version and user, else the look-ahead before it.
    // (A ledger that is missing or wrong is named above, and a repair writes
    // it.)
    let latest = deadline.map(|d| match &view.ledger {
        None if shape.layout == Layout::Lean => d - shape.lookahead_ms as i64,
        _ => d,
    });
    match (view.expiry_ms(), latest) {
        (None, _) => out.push(problem(
            "expiry_index_missing",
            "not in the expiry index: the reaper would never expire it".to_owned(),
        )),
        (Some(s), Some(l)) if s > l + TOLERANCE_MS => out.push(problem(
            "expiry_index_wrong",
            format!(
                "the expiry index says {s} ms, after {l} ms: the key may expire before the reaper records what its end needs"
            ),
        )),
        _ => {}
    }
    if !exp.user.is_empty() && view.in_user_index(&exp.user) == Some(false) {
        out.push(problem(
            "user_index_missing",
            format!("not in the index of user {:?}", exp.user),
        ));
    }
    out
}

/// The layout's check of a session past its deadline (no key) whose ledger
/// is live at `seq`: it must be in the expiry index for the reaper to end it.
pub(crate) fn check_overdue(view: &RedisView, seq: u64) -> Vec<Problem> {
    match &view.ledger {
        Some(l) if l.live() && l.seq == seq && view.json.is_none() && view.expiry.is_none() => {
            vec![problem(
                "expiry_index_missing",
                "past its deadline and not in the expiry index: the reaper never writes its end"
                    .to_owned(),
            )]
        }
        _ => Vec::new(),
    }
}

/// What [`reindex`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reindexed {
    /// The key, ledger and indexes now hold what the log says.
    Done,
    /// The session changed since it was inspected; nothing was written.
    Moved,
    /// Its ledger says it ended; nothing was written.
    Ended,
    /// The deadline has passed; nothing was written.
    Expired,
}

/// Writes a live session's derived state from what the log says it is
/// (`exp`, whose deadline must be known), provided the key still holds
/// `inspected` (or is still absent when `inspected` is `None`).
pub(crate) async fn reindex(
    conn: &mut impl ConnectionLike,
    keys: &Keys,
    shape: Shape,
    id: &str,
    inspected: Option<&str>,
    exp: &Expected,
    tomb_ms: i64,
) -> Result<Reindexed> {
    let Some(deadline) = exp.deadline_ms else {
        return Err(Error::InvalidInput(format!(
            "reindex of {id} without a deadline"
        )));
    };
    // The user whose index holds the inspected state.
    let old_user = inspected
        .and_then(|j| crate::session::Record::from_json(j).ok())
        .and_then(|s| s.user_key())
        .unwrap_or_default();
    let mut inv = invocation(keys, shape, "reindex");
    inv.arg(id)
        .arg(member(id))
        .arg(if inspected.is_some() { "1" } else { "0" })
        .arg(inspected.unwrap_or(""))
        .arg(&exp.json)
        .arg(exp.seq)
        .arg(&exp.user)
        .arg(deadline)
        .arg(tomb_ms)
        .arg(old_user);
    let parts: Vec<String> = inv.invoke_async(conn).await?;
    Ok(match parts.first().map(String::as_str) {
        Some("ok") => Reindexed::Done,
        Some("moved") => Reindexed::Moved,
        Some("ended") => Reindexed::Ended,
        Some("expired") => Reindexed::Expired,
        other => {
            return Err(Error::Corrupt(format!(
                "unexpected reply {other:?} to reindex"
            )));
        }
    })
}

/// Puts a session past its deadline whose ledger is live at `seq` back into
/// the expiry index (scored `deadline_ms`), so that the reaper ends it.
/// False when it changed since it was inspected.
pub(crate) async fn requeue(
    conn: &mut impl ConnectionLike,
    keys: &Keys,
    shape: Shape,
    id: &str,
    seq: u64,
    deadline_ms: i64,
) -> Result<bool> {
    let mut inv = invocation(keys, shape, "requeue");
    inv.arg(id).arg(member(id)).arg(seq).arg(deadline_ms);
    let parts: Vec<String> = inv.invoke_async(conn).await?;
    Ok(parts.first().is_some_and(|p| p == "ok"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> RedisView {
        RedisView {
            now_ms: 1_000_000,
            json: Some("{}".to_owned()),
            pttl: 60_000,
            ledger_raw: Some("3|live|7".to_owned()),
            ledger: Ledger::parse("3|live|7"),
            ledger_pttl: 60_000 + 86_400_000,
            expiry: Some(1_060_000.0),
            users: vec![("7".to_owned(), Some(5.0e15 as i64))],
        }
    }

    fn expected() -> Expected {
        Expected {
            json: "{}".to_owned(),
            seq: 3,
            user: "7".to_owned(),
            deadline_ms: Some(1_060_000),
        }
    }

    const LEDGER: Shape = Shape {
        layout: Layout::Ledger,
        lookahead_ms: 300_000,
    };
    const LEAN: Shape = Shape {
        layout: Layout::Lean,
        lookahead_ms: 20_000,
    };

    fn kinds_in(v: &RedisView, shape: Shape) -> Vec<&'static str> {
        check_live(v, &expected(), 86_400_000, shape)
            .into_iter()
            .map(|p| p.kind)
            .collect()
    }

    fn kinds(v: &RedisView) -> Vec<&'static str> {
        kinds_in(v, LEDGER)
    }

    #[test]
    fn a_consistent_session_has_no_problem() {
        assert!(kinds(&view()).is_empty());
    }

    #[test]
    fn each_kind_of_damage_is_named() {
        let mut v = view();
        v.ledger = None;
        v.ledger_raw = None;
        assert_eq!(kinds(&v), ["ledger_missing"]);
        let mut v = view();
        v.ledger = Ledger::parse("9|live|7");
        assert_eq!(kinds(&v), ["ledger_seq"]);
        let mut v = view();
        v.ledger = Ledger::parse("3|destroyed|7");
        assert_eq!(kinds(&v), ["ledger_status"]);
        let mut v = view();
        v.ledger_raw = Some("junk".to_owned());
        v.ledger = Ledger::parse("junk");
        assert_eq!(kinds(&v), ["ledger_invalid"]);
        let mut v = view();
        v.pttl = -1;
        v.ledger_pttl = -1;
        assert_eq!(kinds(&v), ["ledger_ttl", "ttl_missing"]);
        let mut v = view();
        v.pttl = 10_000;
        assert_eq!(kinds(&v), ["ttl_wrong"]);
        let mut v = view();
        v.expiry = Some(1_070_000.0);
        assert_eq!(kinds(&v), ["expiry_index_wrong"]);
        let mut v = view();
        v.expiry = None;
        assert_eq!(kinds(&v), ["expiry_index_missing"]);
        let mut v = view();
        v.users = vec![("7".to_owned(), None)];
        assert_eq!(kinds(&v), ["user_index_missing"]);
    }

    #[test]
    fn the_lean_layout_wants_no_ledger_but_an_earlier_entry() {
        // With a current ledger the entry may sit at the deadline.
        assert!(kinds_in(&view(), LEAN).is_empty());
        // Without one it must come the look-ahead earlier, or the key could
        // go before the reaper records what the end needs.
        let mut v = view();
        v.ledger = None;
        v.ledger_raw = None;
        assert_eq!(kinds_in(&v, LEAN), ["expiry_index_wrong"]);
        v.expiry = Some(1_040_000.0);
        assert!(kinds_in(&v, LEAN).is_empty());
        // Earlier still is fine: the reaper files it again.
        v.expiry = Some(1_000_000.0);
        assert!(kinds_in(&v, LEAN).is_empty());
        // The ledger layout wants the ledger.
        assert_eq!(kinds_in(&v, LEDGER), ["ledger_missing"]);
        // A stale ledger is named in either layout.
        let mut v = view();
        v.ledger = Ledger::parse("2|live|7");
        assert_eq!(kinds_in(&v, LEAN), ["ledger_seq"]);
    }

    #[test]
    fn ledgers_parse_strictly() {
        assert_eq!(
            Ledger::parse("12|expired|"),
            Some(Ledger {
                seq: 12,
                status: "expired".to_owned(),
                user: String::new()
            })
        );
        assert_eq!(Ledger::parse("x|live|1"), None);
        assert_eq!(Ledger::parse("1||1"), None);
        assert_eq!(Ledger::parse("1|live"), None);
    }

    #[test]
    fn inspect_replies_decode() {
        let parts = |p: &[&str]| p.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let v = decode_inspect(
            parts(&[
                "1000", "1", "{}", "500", "2|live|u", "86400500", "1500", "", "", "7",
            ]),
            &["u", "v"],
        )
        .expect("decodes");
        assert_eq!(v.key_deadline(), Some(1500));
        assert_eq!(v.in_user_index("u"), Some(false));
        assert_eq!(v.in_user_index("v"), Some(true));
        assert_eq!(v.in_user_index("w"), None);
        // The ledger's user is looked up without being asked for.
        let v = decode_inspect(
            parts(&[
                "1000", "1", "{}", "500", "2|live|w", "86400500", "1500", "9",
            ]),
            &[],
        )
        .expect("decodes");
        assert_eq!(v.in_user_index("w"), Some(true));
        assert!(decode_inspect(vec!["1".to_owned()], &[]).is_err());
    }
}
