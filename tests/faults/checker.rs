//! The history checker: pure logic over a [`History`] and the [`DbFacts`]
//! read at the end. It knows nothing of processes or time but the recorded
//! offsets, so hand-made histories test it (the `tests` module below shows it
//! catching a resurrection, a lost write and lost increments).
//!
//! Every operation is classified by what its client was told:
//! - **ok**: acknowledged (the status the route answers on success);
//! - **fail**: definitely without effect (a 4xx, `503 session_busy`, which
//!   promises nothing changed, a CLI exit 1, a connection refused);
//! - **unknown**: a timeout, a connection lost mid-request, any other 5xx,
//!   a CLI exit other than 0 and 1. It may or may not have taken effect, at
//!   any time after its invocation.
//!
//! The rules (see `docs/recovery.md`, "The fault suite"):
//!
//! - **(a) No resurrection.** Once the end of a session was acknowledged to
//!   any client, no request carrying its cookie that was invoked after that
//!   acknowledgement may succeed as authenticated (`/me` 200, `/platform`
//!   200, increment 200, data `PUT` 204 without a new token, data `GET` 200,
//!   logout or logout-all 204). Ends: logout 204 (its session); a login 200
//!   that carried a cookie and set a new token (the old session, at the
//!   login's completion); logout-all 204 (every session of the user whose
//!   login completed before the logout-all was invoked); CLI destroy exit 0.
//! - **(b) Visibility and durability.** A read of a register (a data key of
//!   a session, or the session's platform as `/me` shows it) never returns a
//!   value older than the last write acknowledged before the read was
//!   invoked (writes concurrent with the read may or may not show), never a
//!   value that was never written, that a failed write carried, or that
//!   belongs to another session (other than one it was rotated from). A key
//!   read as absent while a write to it was acknowledged is a lost write,
//!   unless an end of the session may have happened. A session answered as
//!   unknown (401, 403 with its CSRF token, 409) with no end that could
//!   explain it is a lost session, or a session refused while live when it
//!   is served again afterwards (its login, an acknowledged write, was not
//!   visible for a while). Every acknowledged write is in
//!   `session_events` exactly once, in its session; an unknown one at most
//!   once; a failed one never. Increments: acknowledged results are
//!   distinct and grow in real-time order; a read sees every increment
//!   acknowledged before it and no more than were invoked; the final value
//!   lies between the acknowledged sum and the acknowledged plus unknown sum;
//!   each acknowledged result is in `session_events` exactly once.
//! - **(c) Audit trail.** `verify` exits 0 at quiescence; each session's
//!   seqs in `session_events` are exactly 1..n; no dead letter holds an
//!   acknowledged write, and only the invalid entries the harness injected
//!   are dead letters: each of them is one, with a reason, and none is in
//!   `session_events` (unless Redis lost it before it was read); every row
//!   of `session_snapshots` is the fold (the library's
//!   `Record::apply_mut`) of all its session's events: same JSON, seq and
//!   status; after the harness damaged Redis (a key made persistent, a
//!   session removed from the expiry index, a key's JSON changed), `verify`
//!   exits 1 naming every damaged session, and after `verify --repair` it
//!   exits 0.
//! - **(d) Audit database outages** (invariant 14 of `docs/design.md`): a request
//!   invoked and completed while only the audit database was cut, slowed or
//!   had its snapshot table locked (no other fault from its start until the
//!   system settled) must not fail with a 5xx or time out.
//! - **(e) Recovery.** Every fault settles within its bound, no process
//!   exits by itself once running (the harness restarts it, as a supervisor
//!   would; failing to start while a dependency is down is only counted),
//!   and every read at quiescence gets an answer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde_json::Value;

use vedfolnir_sessions::time::Timestamp;
use vedfolnir_sessions::{Event, EventKind, Record, Status};

use crate::history::{Action, AuditEvent, CookieChange, DbFacts, History, Injected, Op, Reply};

/// The rule a violation breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    A,
    B,
    C,
    D,
    E,
}

impl Rule {
    pub fn title(self) -> &'static str {
        match self {
            Rule::A => "(a) no request succeeds on a session after its end was acknowledged",
            Rule::B => "(b) acknowledged writes stay visible and are audited exactly once",
            Rule::C => "(c) the audit trail verifies",
            Rule::D => "(d) an audit database outage fails no request while Redis is healthy",
            Rule::E => "(e) the system recovers from every fault",
        }
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub rule: Rule,
    /// A short, stable name of what went wrong (`resurrection`, `lost
    /// write`, …), for tables and tests.
    pub kind: &'static str,
    pub session: Option<String>,
    pub detail: String,
}

/// What an operation's client was told, as far as its effect goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    Ok,
    Fail,
    Unknown,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Ok => "ok",
            Class::Fail => "fail",
            Class::Unknown => "unknown",
        }
    }
}

/// Classifies an operation (see the module docs).
pub fn class(op: &Op) -> Class {
    match &op.reply {
        Reply::NotSent(_) => Class::Fail,
        Reply::Lost(_) => Class::Unknown,
        Reply::Exit { code } => match code {
            0 => Class::Ok,
            1 => Class::Fail,
            _ => Class::Unknown,
        },
        Reply::Http { status, cookie, .. } => {
            let status = *status;
            if status >= 500 {
                // "the session is busy; nothing was changed"
                return if op.reply.error_code() == Some("session_busy") {
                    Class::Fail
                } else {
                    Class::Unknown
                };
            }
            let ok = match &op.action {
                Action::Login { .. } => {
                    if status == 200 && !matches!(cookie, CookieChange::New(_)) {
                        // A login that answered 200 without a token: odd,
                        // and nothing to build on.
                        return Class::Unknown;
                    }
                    status == 200
                }
                Action::Logout | Action::LogoutAll => status == 204,
                Action::Me | Action::Platform { .. } | Action::Incr { .. } => status == 200,
                // A new token would mean the value went into a new session.
                Action::Put { .. } => status == 204 && !matches!(cookie, CookieChange::New(_)),
                Action::Get { .. } => status == 200 || status == 404,
                Action::Destroy => return Class::Unknown,
            };
            if ok { Class::Ok } else { Class::Fail }
        }
    }
}

/// A request the server answered as authenticated by the cookie's session.
pub fn authenticated_success(op: &Op) -> bool {
    if class(op) != Class::Ok {
        return false;
    }
    match op.action {
        Action::Me
        | Action::Platform { .. }
        | Action::Put { .. }
        | Action::Incr { .. }
        | Action::Logout
        | Action::LogoutAll => true,
        Action::Get { .. } => op.reply.status() == Some(200),
        Action::Login { .. } | Action::Destroy => false,
    }
}

/// The server answered as if the cookie named no live session: 401, 403
/// (every unsafe request of the suite carries its session's CSRF token) or
/// 409 `session_ended`. Not for logins (401 is a bad password there) nor
/// data reads (404 is also a missing key).
pub fn says_session_unknown(op: &Op) -> bool {
    match op.action {
        Action::Login { .. } | Action::Get { .. } | Action::Destroy => false,
        _ => matches!(op.reply.status(), Some(401 | 403 | 409)),
    }
}

/// Everything the checker reports.
pub fn check(h: &History, facts: &DbFacts) -> Vec<Violation> {
    let ix = Index::new(h);
    let mut out = Vec::new();
    resurrection(&ix, &mut out);
    registers(&ix, &mut out);
    lost_sessions(&ix, &mut out);
    counters(&ix, facts, &mut out);
    audited_once(&ix, facts, &mut out);
    audit_trail(&ix, facts, &mut out);
    dead_letters_only_for_invalid_input(h, facts, &mut out);
    snapshots_are_folds(facts, &mut out);
    damage_detected(facts, &mut out);
    availability(h, &mut out);
    recovery(h, &mut out);
    out.sort_by(|a, b| (a.rule, a.kind).cmp(&(b.rule, b.kind)));
    out
}

/// A session id, shortened for messages.
pub fn short(sid: &str) -> String {
    format!("{}…", &sid[..sid.len().min(10)])
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// One line about an operation.
pub fn describe(op: &Op) -> String {
    let what = match &op.action {
        Action::Put { key, value } => format!("data put {key}={value}"),
        Action::Get { key } => format!("data get {key}"),
        Action::Platform { name } => format!("platform {name}"),
        Action::Incr {
            key,
            by,
            via_modify,
        } => format!(
            "incr {key} by {by}{}",
            if *via_modify { " via modify" } else { "" }
        ),
        Action::Login { user_id } => format!("login user {user_id}"),
        other => other.name().to_owned(),
    };
    let new = match &op.reply {
        Reply::Http {
            cookie: CookieChange::New(sid),
            ..
        } => format!(" (new session {})", short(sid)),
        _ => String::new(),
    };
    format!(
        "#{} {} {what} [{:.3}s..{:.3}s] -> {}{new}",
        op.id,
        op.actor,
        secs(op.invoke),
        secs(op.complete),
        op.reply
    )
}

/// What a login told about a session it created.
#[derive(Debug, Clone)]
struct Born {
    user_id: i64,
    /// The login's completion.
    at: Duration,
    /// The session whose cookie the login carried (it may have been rotated
    /// into this one, and its data carried over).
    parent: Option<String>,
}

/// Lookups shared by the rules.
struct Index<'h> {
    ops: &'h [Op],
    born: HashMap<String, Born>,
    /// Per session: the earliest invocation of an operation that was not a
    /// definite failure and could have ended it.
    may_end_from: HashMap<String, Duration>,
    /// (session, key) pairs that counters use.
    counter_keys: HashSet<(String, String)>,
}

impl<'h> Index<'h> {
    fn new(h: &'h History) -> Self {
        let mut born = HashMap::new();
        for op in &h.ops {
            if let (Action::Login { user_id }, Reply::Http { cookie, .. }) = (&op.action, &op.reply)
                && class(op) == Class::Ok
                && let CookieChange::New(sid) = cookie
            {
                born.insert(
                    sid.clone(),
                    Born {
                        user_id: *user_id,
                        at: op.complete,
                        parent: op.session.clone(),
                    },
                );
            }
        }
        let mut may_end_from: HashMap<String, Duration> = HashMap::new();
        let mut note = |sid: &str, at: Duration| {
            let e = may_end_from.entry(sid.to_owned()).or_insert(at);
            if at < *e {
                *e = at;
            }
        };
        for op in &h.ops {
            if class(op) == Class::Fail {
                continue;
            }
            let Some(sid) = op.session.as_deref() else {
                continue;
            };
            match op.action {
                Action::Logout | Action::Destroy | Action::Login { .. } => note(sid, op.invoke),
                Action::LogoutAll => {
                    note(sid, op.invoke);
                    if let Some(user) = born.get(sid).map(|b| b.user_id) {
                        for (other, b) in &born {
                            if b.user_id == user {
                                note(other, op.invoke);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        let counter_keys = h
            .ops
            .iter()
            .filter_map(|op| match (&op.action, &op.session) {
                (Action::Incr { key, .. }, Some(s)) => Some((s.clone(), key.clone())),
                _ => None,
            })
            .collect();
        Index {
            ops: &h.ops,
            born,
            may_end_from,
            counter_keys,
        }
    }

    /// An operation that could have ended `sid` was invoked before `t`.
    fn may_have_ended(&self, sid: &str, t: Duration) -> bool {
        self.may_end_from.get(sid).is_some_and(|at| *at < t)
    }

    /// The sessions `sid` may have been rotated from, nearest first.
    fn ancestors(&self, sid: &str) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let mut cur = sid;
        while let Some(p) = self.born.get(cur).and_then(|b| b.parent.as_deref()) {
            if p == sid || out.contains(&p) {
                break;
            }
            out.push(p);
            cur = p;
        }
        out
    }
}

// ---------------------------------------------------------------------------
// (a)

/// An acknowledged end of a session.
#[derive(Debug, Clone)]
struct End<'h> {
    at: Duration,
    how: &'static str,
    op: &'h Op,
}

fn ends<'h>(ix: &Index<'h>) -> HashMap<String, End<'h>> {
    let mut first: HashMap<String, End<'h>> = HashMap::new();
    let mut add = |sid: &str, end: End<'h>| {
        let e = first.entry(sid.to_owned()).or_insert_with(|| end.clone());
        if end.at < e.at {
            *e = end;
        }
    };
    for op in ix.ops {
        if class(op) != Class::Ok {
            continue;
        }
        let Some(sid) = op.session.as_deref() else {
            continue;
        };
        let at = op.complete;
        match (&op.action, &op.reply) {
            (Action::Logout, _) => add(
                sid,
                End {
                    at,
                    how: "logout",
                    op,
                },
            ),
            (Action::Destroy, _) => add(
                sid,
                End {
                    at,
                    how: "cli destroy",
                    op,
                },
            ),
            (
                Action::Login { .. },
                Reply::Http {
                    cookie: CookieChange::New(new),
                    ..
                },
            ) if new != sid => add(
                sid,
                End {
                    at,
                    how: "login rotation",
                    op,
                },
            ),
            (Action::LogoutAll, _) => {
                add(
                    sid,
                    End {
                        at,
                        how: "logout-all",
                        op,
                    },
                );
                if let Some(user) = ix.born.get(sid).map(|b| b.user_id) {
                    for (other, b) in &ix.born {
                        if b.user_id == user && b.at < op.invoke {
                            add(
                                other,
                                End {
                                    at,
                                    how: "logout-all",
                                    op,
                                },
                            );
                        }
                    }
                }
            }
            _ => {}
        }
    }
    first
}

fn resurrection(ix: &Index<'_>, out: &mut Vec<Violation>) {
    let ends = ends(ix);
    let mut after: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ix.ops {
        let Some(sid) = op.session.as_deref() else {
            continue;
        };
        if let Some(end) = ends.get(sid)
            && op.invoke > end.at
            && authenticated_success(op)
        {
            after.entry(sid).or_default().push(op);
        }
    }
    for (sid, ops) in after {
        let end = &ends[sid];
        out.push(Violation {
            rule: Rule::A,
            kind: "resurrection",
            session: Some(sid.to_owned()),
            detail: format!(
                "session {} ended by {} ({}); {} request(s) invoked after that succeeded as \
                 authenticated, first {}",
                short(sid),
                end.how,
                describe(end.op),
                ops.len(),
                describe(ops[0])
            ),
        });
    }
}

// ---------------------------------------------------------------------------
// (b) registers: data keys and the platform

/// The register name of a session's platform (not a valid data key).
const PLATFORM: &str = "platform()";

/// A write to a register.
#[derive(Debug, Clone, Copy)]
struct Write<'h> {
    op: &'h Op,
    session: &'h str,
    key: &'h str,
}

fn writes<'h>(ix: &Index<'h>) -> HashMap<&'h str, Write<'h>> {
    let mut by_value = HashMap::new();
    for op in ix.ops {
        let Some(session) = op.session.as_deref() else {
            continue;
        };
        let (key, value) = match &op.action {
            Action::Put { key, value } => (key.as_str(), value.as_str()),
            Action::Platform { name } => (PLATFORM, name.as_str()),
            _ => continue,
        };
        by_value.insert(value, Write { op, session, key });
    }
    by_value
}

/// A read of a register: `Some(text)` for a value, `None` for absent;
/// `ambiguous` when an absent answer may also mean the session is gone.
struct Read<'h> {
    op: &'h Op,
    session: &'h str,
    key: &'h str,
    value: Option<String>,
    ambiguous: bool,
}

fn reads<'h>(ix: &Index<'h>) -> Vec<Read<'h>> {
    let mut out = Vec::new();
    for op in ix.ops {
        let Some(session) = op.session.as_deref() else {
            continue;
        };
        let Reply::Http { status, body, .. } = &op.reply else {
            continue;
        };
        match &op.action {
            Action::Get { key } => {
                if ix.counter_keys.contains(&(session.to_owned(), key.clone())) {
                    continue;
                }
                match status {
                    200 => out.push(Read {
                        op,
                        session,
                        key,
                        value: Some(match body {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        }),
                        ambiguous: false,
                    }),
                    404 => out.push(Read {
                        op,
                        session,
                        key,
                        value: None,
                        ambiguous: true,
                    }),
                    _ => {}
                }
            }
            Action::Me if *status == 200 => out.push(Read {
                op,
                session,
                key: PLATFORM,
                value: body
                    .get("platform_name")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                ambiguous: false,
            }),
            _ => {}
        }
    }
    out
}

fn registers(ix: &Index<'_>, out: &mut Vec<Violation>) {
    let by_value = writes(ix);
    let mut by_register: HashMap<(&str, &str), Vec<Write<'_>>> = HashMap::new();
    for w in by_value.values() {
        by_register.entry((w.session, w.key)).or_default().push(*w);
    }
    for r in reads(ix) {
        let empty = Vec::new();
        let here = by_register.get(&(r.session, r.key)).unwrap_or(&empty);
        // Writes to this register acknowledged before the read began.
        let acked_before: Vec<&Write<'_>> = here
            .iter()
            .filter(|w| class(w.op) == Class::Ok && w.op.complete < r.op.invoke)
            .collect();
        let what = if r.key == PLATFORM {
            "the platform".to_owned()
        } else {
            format!("key {}", r.key)
        };
        let Some(value) = &r.value else {
            let Some(last) = acked_before.iter().max_by_key(|w| w.op.complete) else {
                continue;
            };
            if r.ambiguous && ix.may_have_ended(r.session, r.op.complete) {
                continue;
            }
            out.push(Violation {
                rule: Rule::B,
                kind: "lost write",
                session: Some(r.session.to_owned()),
                detail: format!(
                    "session {}: {what} read as absent by {} although {} was acknowledged \
                     before it (and nothing could have ended the session)",
                    short(r.session),
                    describe(r.op),
                    describe(last.op)
                ),
            });
            continue;
        };
        let Some(w) = by_value.get(value.as_str()) else {
            out.push(Violation {
                rule: Rule::B,
                kind: "value never written",
                session: Some(r.session.to_owned()),
                detail: format!(
                    "session {}: {} read {what} = {value:?}, which no client wrote",
                    short(r.session),
                    describe(r.op)
                ),
            });
            continue;
        };
        if class(w.op) == Class::Fail {
            out.push(Violation {
                rule: Rule::B,
                kind: "phantom write",
                session: Some(r.session.to_owned()),
                detail: format!(
                    "session {}: {} read {what} = {value:?}, written by {}, whose client was told \
                     it failed",
                    short(r.session),
                    describe(r.op),
                    describe(w.op)
                ),
            });
            continue;
        }
        if w.op.invoke > r.op.complete {
            out.push(Violation {
                rule: Rule::B,
                kind: "value from the future",
                session: Some(r.session.to_owned()),
                detail: format!(
                    "{} read {value:?} before {} was invoked",
                    describe(r.op),
                    describe(w.op)
                ),
            });
            continue;
        }
        if w.key != r.key {
            out.push(Violation {
                rule: Rule::B,
                kind: "value of another key",
                session: Some(r.session.to_owned()),
                detail: format!(
                    "{} read {value:?}, which {} wrote to {}",
                    describe(r.op),
                    describe(w.op),
                    w.key
                ),
            });
            continue;
        }
        let stale_by = if w.session == r.session {
            // Overwritten before the read began: a write acknowledged
            // before the read that began after `w` was acknowledged.
            acked_before.iter().find(|later| {
                later.op.id != w.op.id
                    && class(w.op) == Class::Ok
                    && w.op.complete < later.op.invoke
            })
        } else if ix.ancestors(r.session).contains(&w.session) {
            // Carried over by a rotation; any acknowledged write in this
            // session before the read replaces it.
            acked_before.first()
        } else {
            out.push(Violation {
                rule: Rule::B,
                kind: "value of another session",
                session: Some(r.session.to_owned()),
                detail: format!(
                    "session {}: {} read {value:?}, which {} wrote in session {}",
                    short(r.session),
                    describe(r.op),
                    describe(w.op),
                    short(w.session)
                ),
            });
            continue;
        };
        if let Some(later) = stale_by {
            out.push(Violation {
                rule: Rule::B,
                kind: "stale read",
                session: Some(r.session.to_owned()),
                detail: format!(
                    "session {}: {} read {what} = {value:?} ({}) although {} was acknowledged \
                     before the read began",
                    short(r.session),
                    describe(r.op),
                    describe(w.op),
                    describe(later.op)
                ),
            });
        }
    }
}

/// Requests answered as if their session did not exist, with no end of the
/// session that could explain it.
fn lost_sessions(ix: &Index<'_>, out: &mut Vec<Violation>) {
    let mut lost: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ix.ops {
        let Some(sid) = op.session.as_deref() else {
            continue;
        };
        if says_session_unknown(op)
            && ix.born.contains_key(sid)
            && !ix.may_have_ended(sid, op.complete)
        {
            lost.entry(sid).or_default().push(op);
        }
    }
    for (sid, ops) in lost {
        // Served again afterwards: refused while it lived (a login's write
        // not visible for a while); never again: lost.
        let later = ix.ops.iter().find(|op| {
            op.session.as_deref() == Some(sid)
                && op.invoke > ops[0].complete
                && authenticated_success(op)
        });
        let (kind, then) = match later {
            Some(op) => (
                "session refused while live",
                format!("; served again by {}", describe(op)),
            ),
            None => ("lost session", String::new()),
        };
        out.push(Violation {
            rule: Rule::B,
            kind,
            session: Some(sid.to_owned()),
            detail: format!(
                "session {} (login {:.3}s) was answered as unknown {} time(s) with no end that \
                 could explain it, first {}{then}",
                short(sid),
                secs(ix.born[sid].at),
                ops.len(),
                describe(ops[0])
            ),
        });
    }
}

// ---------------------------------------------------------------------------
// (b) counters

/// The `updated` events of one session that set `key`, as `(seq, value)`.
fn sets_of(facts: &DbFacts, sid: &str, key: &str) -> Vec<(i64, Value)> {
    let mut v: Vec<(i64, Value)> = facts
        .events
        .iter()
        .filter(|e| e.session_id == sid && e.event_type == "updated")
        .filter_map(|e| {
            let p: Value = serde_json::from_str(&e.payload).ok()?;
            p.get("set")?.get(key).cloned().map(|x| (e.seq, x))
        })
        .collect();
    v.sort_by_key(|(s, _)| *s);
    v
}

fn counters(ix: &Index<'_>, facts: &DbFacts, out: &mut Vec<Violation>) {
    let missing_route: Vec<&Op> = ix
        .ops
        .iter()
        .filter(|op| matches!(op.action, Action::Incr { .. }) && op.reply.status() == Some(404))
        .collect();
    if let Some(first) = missing_route.first() {
        out.push(Violation {
            rule: Rule::B,
            kind: "increment route missing",
            session: None,
            detail: format!(
                "{} increment(s) answered 404: the app server has no POST /session/incr/{{key}} \
                 (first {}); the increments were not tested",
                missing_route.len(),
                describe(first)
            ),
        });
    }
    let mut keys: Vec<&(String, String)> = ix.counter_keys.iter().collect();
    keys.sort();
    for (sid, key) in keys {
        let incrs: Vec<(&Op, i64)> = ix
            .ops
            .iter()
            .filter_map(|op| match &op.action {
                Action::Incr { key: k, by, .. }
                    if k == key && op.session.as_deref() == Some(sid.as_str()) =>
                {
                    Some((op, *by))
                }
                _ => None,
            })
            .collect();
        let mut acked: Vec<(&Op, i64, i64)> = Vec::new();
        let (mut sum_acked, mut sum_unknown) = (0i64, 0i64);
        for (op, by) in &incrs {
            match class(op) {
                Class::Ok => match op.reply.body().and_then(Value::as_i64) {
                    Some(r) => {
                        acked.push((op, *by, r));
                        sum_acked += by;
                    }
                    None => out.push(Violation {
                        rule: Rule::B,
                        kind: "increment without a number",
                        session: Some(sid.clone()),
                        detail: format!("{} answered no JSON number", describe(op)),
                    }),
                },
                Class::Unknown => sum_unknown += by,
                Class::Fail => {}
            }
        }
        let label = format!("counter {key} of session {}", short(sid));
        // Distinct results.
        let mut seen: HashMap<i64, &Op> = HashMap::new();
        for (op, _, r) in &acked {
            if let Some(other) = seen.insert(*r, op) {
                out.push(Violation {
                    rule: Rule::B,
                    kind: "duplicate increment result",
                    session: Some(sid.clone()),
                    detail: format!(
                        "{label}: {} and {} both returned {r}",
                        describe(other),
                        describe(op)
                    ),
                });
            }
        }
        // Real-time order: an increment that began after another was
        // acknowledged starts from at least that one's result.
        let mut backwards = Vec::new();
        for (a, _, ra) in &acked {
            for (b, by_b, rb) in &acked {
                if a.complete < b.invoke && rb - by_b < *ra {
                    backwards.push((*a, *ra, *b, *rb));
                }
            }
        }
        if let Some((a, ra, b, rb)) = backwards.first() {
            out.push(Violation {
                rule: Rule::B,
                kind: "increment went backwards",
                session: Some(sid.clone()),
                detail: format!(
                    "{label}: {} returned {rb} after {} had returned {ra} ({} such pair(s)): an \
                     acknowledged increment was lost",
                    describe(b),
                    describe(a),
                    backwards.len()
                ),
            });
        }
        // Reads of the counter, during the run and at the end.
        let mut final_http: Option<(i64, &Op)> = None;
        for op in ix.ops {
            let Action::Get { key: k } = &op.action else {
                continue;
            };
            if k != key || op.session.as_deref() != Some(sid.as_str()) {
                continue;
            }
            let value = match (op.reply.status(), op.reply.body()) {
                (Some(200), Some(v)) => match v.as_i64() {
                    Some(n) => n,
                    None => {
                        out.push(Violation {
                            rule: Rule::B,
                            kind: "counter read without a number",
                            session: Some(sid.clone()),
                            detail: format!("{label}: {} read {v}", describe(op)),
                        });
                        continue;
                    }
                },
                (Some(404), _) if !ix.may_have_ended(sid, op.complete) => 0,
                _ => continue,
            };
            if op.final_read && op.reply.status() == Some(200) {
                // Judged below, as the final value.
                final_http = Some((value, op));
                continue;
            }
            if let Some((a, _, ra)) = acked
                .iter()
                .filter(|(a, _, _)| a.complete < op.invoke)
                .max_by_key(|(_, _, r)| *r)
                && value < *ra
            {
                out.push(Violation {
                    rule: Rule::B,
                    kind: "counter read lost increments",
                    session: Some(sid.clone()),
                    detail: format!(
                        "{label}: {} read {value} although {} had returned {ra} before it",
                        describe(op),
                        describe(a)
                    ),
                });
            }
            let invoked: i64 = incrs
                .iter()
                .filter(|(i, _)| class(i) != Class::Fail && i.invoke < op.complete)
                .map(|(_, by)| by)
                .sum();
            if value > invoked {
                out.push(Violation {
                    rule: Rule::B,
                    kind: "counter read more than was added",
                    session: Some(sid.clone()),
                    detail: format!(
                        "{label}: {} read {value}, but increments invoked before it add up to \
                         {invoked} at most",
                        describe(op)
                    ),
                });
            }
        }
        // The final value: read over HTTP at quiescence, else (the session
        // ended) the last value the audit log holds.
        let sets = sets_of(facts, sid, key);
        let (final_value, source) = match final_http {
            Some((v, _)) => (v, "read at quiescence"),
            None => (
                sets.last()
                    .and_then(|(_, v)| v.as_i64())
                    .unwrap_or_default(),
                "last value in session_events",
            ),
        };
        if final_value < sum_acked {
            out.push(Violation {
                rule: Rule::B,
                kind: "lost increments",
                session: Some(sid.clone()),
                detail: format!(
                    "{label}: final value {final_value} ({source}) but {} acknowledged \
                     increment(s) add up to {sum_acked} ({sum_unknown} more with unknown outcome)",
                    acked.len()
                ),
            });
        }
        if final_value > sum_acked + sum_unknown {
            out.push(Violation {
                rule: Rule::B,
                kind: "phantom increments",
                session: Some(sid.clone()),
                detail: format!(
                    "{label}: final value {final_value} ({source}) exceeds the acknowledged \
                     {sum_acked} plus the unknown {sum_unknown}"
                ),
            });
        }
        // Each acknowledged result is one `updated` event.
        let mut not_once = Vec::new();
        for (op, _, r) in &acked {
            let n = sets.iter().filter(|(_, v)| v.as_i64() == Some(*r)).count();
            if n != 1 {
                not_once.push((*op, *r, n));
            }
        }
        if let Some((op, r, n)) = not_once.first() {
            out.push(Violation {
                rule: Rule::B,
                kind: "increment not audited once",
                session: Some(sid.clone()),
                detail: format!(
                    "{label}: {} acknowledged increment(s) are not in session_events exactly \
                     once; first {} (value {r} found {n} time(s))",
                    not_once.len(),
                    describe(op)
                ),
            });
        }
    }
}

// ---------------------------------------------------------------------------
// (b) every acknowledged write in session_events exactly once

/// Where each unique value occurs in `session_events`: `updated` events'
/// `set` values and `platform_switched` events' `platform_name`, as
/// (session, key).
fn audited_values(events: &[AuditEvent]) -> HashMap<String, Vec<(&str, String)>> {
    let mut out: HashMap<String, Vec<(&str, String)>> = HashMap::new();
    for e in events {
        let Ok(p) = serde_json::from_str::<Value>(&e.payload) else {
            continue;
        };
        match e.event_type.as_str() {
            "updated" => {
                if let Some(set) = p.get("set").and_then(Value::as_object) {
                    for (k, v) in set {
                        if let Some(s) = v.as_str() {
                            out.entry(s.to_owned())
                                .or_default()
                                .push((&e.session_id, k.clone()));
                        }
                    }
                }
            }
            "platform_switched" => {
                if let Some(name) = p.get("platform_name").and_then(Value::as_str) {
                    out.entry(name.to_owned())
                        .or_default()
                        .push((&e.session_id, PLATFORM.to_owned()));
                }
            }
            _ => {}
        }
    }
    out
}

fn audited_once(ix: &Index<'_>, facts: &DbFacts, out: &mut Vec<Violation>) {
    let found = audited_values(&facts.events);
    let mut ws: Vec<(&str, Write<'_>)> = writes(ix).into_iter().collect();
    ws.sort_by_key(|(_, w)| w.op.id);
    for (value, w) in ws {
        let rows = found.get(value).map(Vec::as_slice).unwrap_or(&[]);
        let here = rows
            .iter()
            .filter(|(s, k)| *s == w.session && k == w.key)
            .count();
        let elsewhere = rows.len() - here;
        let c = class(w.op);
        let (bad, kind, expected) = match c {
            Class::Ok => (
                here != 1 || elsewhere != 0,
                "acknowledged write not audited once",
                "exactly once",
            ),
            Class::Unknown => (
                here > 1 || elsewhere != 0,
                "write audited more than once",
                "at most once",
            ),
            Class::Fail => (here + elsewhere != 0, "failed write audited", "never"),
        };
        if bad {
            out.push(Violation {
                rule: Rule::B,
                kind,
                session: Some(w.session.to_owned()),
                detail: format!(
                    "{} ({}) should be in session_events {expected}: found {here} time(s) in its \
                     session, {elsewhere} elsewhere",
                    describe(w.op),
                    c.name()
                ),
            });
        }
    }
}

// ---------------------------------------------------------------------------
// (c)

fn audit_trail(ix: &Index<'_>, facts: &DbFacts, out: &mut Vec<Violation>) {
    match &facts.verify {
        Some(v) if v.code == Some(0) => {}
        Some(v) => out.push(Violation {
            rule: Rule::C,
            kind: "verify failed",
            session: None,
            detail: format!(
                "vedfolnir-sessions verify exited {:?} at quiescence: {}",
                v.code,
                excerpt(&v.stdout, 600)
            ),
        }),
        None => out.push(Violation {
            rule: Rule::C,
            kind: "verify failed",
            session: None,
            detail: "vedfolnir-sessions verify did not run".to_owned(),
        }),
    }
    let mut seqs: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for e in &facts.events {
        seqs.entry(&e.session_id).or_default().push(e.seq);
    }
    for (sid, mut s) in seqs {
        s.sort_unstable();
        let expected: Vec<i64> = (1..=s.len() as i64).collect();
        if s != expected {
            out.push(Violation {
                rule: Rule::C,
                kind: "seq not contiguous",
                session: Some(sid.to_owned()),
                detail: format!(
                    "session {}: seqs in session_events are {} (expected 1..{})",
                    short(sid),
                    runs(&s),
                    s.len()
                ),
            });
        }
    }
    let by_value = writes(ix);
    let mut acked: Vec<(&str, &Op)> = by_value
        .iter()
        .filter(|(_, w)| class(w.op) == Class::Ok)
        .map(|(v, w)| (*v, w.op))
        .collect();
    acked.sort_by_key(|(_, op)| op.id);
    for d in &facts.dead_letters {
        for (value, op) in &acked {
            if d.fields.contains(value) {
                out.push(Violation {
                    rule: Rule::C,
                    kind: "acknowledged write in dead letters",
                    session: op.session.clone(),
                    detail: format!(
                        "{} is in a dead letter: {}",
                        describe(op),
                        excerpt(&d.reason, 200)
                    ),
                });
            }
        }
    }
}

/// Only injected invalid input is a dead letter: each injected entry is one
/// (with a reason) unless Redis lost it before it was read, none is in
/// `session_events`, and no other dead letter exists.
fn dead_letters_only_for_invalid_input(h: &History, facts: &DbFacts, out: &mut Vec<Violation>) {
    let injected: HashMap<&str, &Injected> = h
        .injected
        .iter()
        .map(|i| (i.stream_id.as_str(), i))
        .collect();
    for d in &facts.dead_letters {
        match injected.get(d.stream_id.as_str()) {
            Some(i) if d.reason.trim().is_empty() => out.push(Violation {
                rule: Rule::C,
                kind: "dead letter without a reason",
                session: Some(i.session_id.clone()),
                detail: format!(
                    "the injected entry {} ({}) is a dead letter with an empty reason",
                    i.stream_id, i.what
                ),
            }),
            Some(_) => {}
            None => out.push(Violation {
                rule: Rule::C,
                kind: "dead letter not injected",
                session: None,
                detail: format!(
                    "stream entry {} is a dead letter but the harness injected no invalid entry \
                     there (valid input refused): {}; fields {}",
                    d.stream_id,
                    excerpt(&d.reason, 200),
                    excerpt(&d.fields, 300)
                ),
            }),
        }
    }
    let dead: HashSet<&str> = facts
        .dead_letters
        .iter()
        .map(|d| d.stream_id.as_str())
        .collect();
    let audited: HashSet<&str> = facts.events.iter().map(|e| e.session_id.as_str()).collect();
    for i in &h.injected {
        if audited.contains(i.session_id.as_str()) {
            out.push(Violation {
                rule: Rule::C,
                kind: "invalid input audited",
                session: Some(i.session_id.clone()),
                detail: format!(
                    "the injected entry {} ({}) at {:.3}s is in session_events",
                    i.stream_id,
                    i.what,
                    secs(i.at)
                ),
            });
        }
        let lost = h
            .faults
            .iter()
            .any(|f| f.kind.loses_redis_data() && f.start >= i.at);
        if !dead.contains(i.stream_id.as_str()) && !lost {
            out.push(Violation {
                rule: Rule::C,
                kind: "invalid input not a dead letter",
                session: Some(i.session_id.clone()),
                detail: format!(
                    "the injected entry {} ({}) at {:.3}s is not in dead_letters",
                    i.stream_id,
                    i.what,
                    secs(i.at)
                ),
            });
        }
    }
}

/// The fold of a session's events, in seq order and contiguous from 1, with
/// the library's fold; `Err` names a row that does not decode.
fn fold(events: &[&AuditEvent]) -> Result<Record, String> {
    let mut state = Record::default();
    for e in events {
        if e.seq != state.version() as i64 + 1 {
            break;
        }
        let what = |m: String| format!("event {} of {}: {m}", e.seq, short(&e.session_id));
        let payload: Value =
            serde_json::from_str(&e.payload).map_err(|err| what(format!("payload: {err}")))?;
        let payload = vedfolnir_sessions::event::upcast(
            u32::try_from(e.schema_version).unwrap_or(0),
            &e.event_type,
            payload,
        )
        .map_err(|err| what(err.to_string()))?;
        let kind =
            EventKind::from_parts(&e.event_type, payload).map_err(|err| what(err.to_string()))?;
        let session_id = e
            .session_id
            .parse()
            .map_err(|err: vedfolnir_sessions::id::InvalidSessionId| what(err.to_string()))?;
        state.apply_mut(&Event {
            event_id: uuid::Uuid::nil(),
            session_id,
            seq: e.seq as u64,
            occurred_at: Timestamp::from_datetime(e.occurred_at),
            user_id: e.user_id.clone(),
            schema: vedfolnir_sessions::event::SCHEMA_VERSION,
            kind,
            traceparent: None,
        });
    }
    Ok(state)
}

/// Every snapshot row is the fold of all its session's events.
fn snapshots_are_folds(facts: &DbFacts, out: &mut Vec<Violation>) {
    let mut by_session: HashMap<&str, Vec<&AuditEvent>> = HashMap::new();
    for e in &facts.events {
        by_session.entry(&e.session_id).or_default().push(e);
    }
    for events in by_session.values_mut() {
        events.sort_by_key(|e| e.seq);
    }
    let mut bad: Vec<Violation> = Vec::new();
    for snap in &facts.snapshots {
        let events = by_session
            .get(snap.session_id.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let expected = match fold(events) {
            Ok(f) => f,
            Err(e) => {
                bad.push(Violation {
                    rule: Rule::C,
                    kind: "snapshot not the fold of its events",
                    session: Some(snap.session_id.clone()),
                    detail: format!("the events do not fold: {e}"),
                });
                continue;
            }
        };
        let status = match expected.status() {
            Status::Live => "live",
            Status::Destroyed => "destroyed",
            Status::Expired => "expired",
        };
        let json = expected.to_json();
        if snap.seq != expected.version() as i64 || snap.status != status || snap.state != json {
            bad.push(Violation {
                rule: Rule::C,
                kind: "snapshot not the fold of its events",
                session: Some(snap.session_id.clone()),
                detail: format!(
                    "session {}: snapshot seq {} {} {} but its {} event(s) fold to seq {} {} {}",
                    short(&snap.session_id),
                    snap.seq,
                    snap.status,
                    excerpt(&snap.state, 200),
                    events.len(),
                    expected.version(),
                    status,
                    excerpt(&json, 200)
                ),
            });
        }
    }
    bad.sort_by(|a, b| a.session.cmp(&b.session));
    out.extend(bad);
}

/// `verify` saw the damage, named every damaged session, and passed after
/// its repair.
fn damage_detected(facts: &DbFacts, out: &mut Vec<Violation>) {
    let Some(d) = &facts.damage else {
        return;
    };
    let mut fail = |kind: &'static str, session: Option<String>, detail: String| {
        out.push(Violation {
            rule: Rule::C,
            kind,
            session,
            detail,
        });
    };
    if d.damaged.is_empty() {
        fail(
            "no damage done",
            None,
            "the harness found no live session to damage after the run".to_owned(),
        );
        return;
    }
    if d.detected.code != Some(1) {
        fail(
            "verify missed damage",
            None,
            format!(
                "after {} verify exited {:?}, not 1: {}",
                damage_list(&d.damaged),
                d.detected.code,
                excerpt(&d.detected.stdout, 400)
            ),
        );
    } else {
        for (what, sid) in &d.damaged {
            if !d.detected.stdout.contains(sid.as_str()) {
                fail(
                    "verify missed damage",
                    Some(sid.clone()),
                    format!(
                        "session {} ({what}) is not named by verify: {}",
                        short(sid),
                        excerpt(&d.detected.stdout, 400)
                    ),
                );
            }
        }
    }
    if d.after.code != Some(0) {
        fail(
            "verify fails after repair",
            None,
            format!(
                "after {} and verify --repair (exit {:?}: {}), verify exited {:?}: {}",
                damage_list(&d.damaged),
                d.repair.code,
                excerpt(&d.repair.stdout, 300),
                d.after.code,
                excerpt(&d.after.stdout, 400)
            ),
        );
    }
}

fn damage_list(d: &[(String, String)]) -> String {
    d.iter()
        .map(|(what, sid)| format!("{what} on {}", short(sid)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `1-5,7,9-12`.
fn runs(s: &[i64]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let mut j = i;
        while j + 1 < s.len() && s[j + 1] == s[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            s[i].to_string()
        } else {
            format!("{}-{}", s[i], s[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

fn excerpt(s: &str, max: usize) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        format!("{}…", one_line.chars().take(max).collect::<String>())
    }
}

// ---------------------------------------------------------------------------
// (d)

fn availability(h: &History, out: &mut Vec<Violation>) {
    let cuts: Vec<(Duration, Duration)> = h
        .faults
        .iter()
        .filter(|f| f.kind.database_only())
        .map(|f| (f.start, f.end))
        .collect();
    let others: Vec<(Duration, Duration)> = h
        .faults
        .iter()
        .filter(|f| !f.kind.database_only())
        .map(|f| (f.start, f.settled.unwrap_or(Duration::MAX)))
        .collect();
    let mut failed: BTreeMap<&'static str, Vec<&Op>> = BTreeMap::new();
    for op in &h.ops {
        if op.final_read || matches!(op.action, Action::Destroy) {
            continue;
        }
        let broke = match &op.reply {
            Reply::Http { status, .. } => *status >= 500,
            Reply::Lost(_) => true,
            Reply::NotSent(_) | Reply::Exit { .. } => false,
        };
        if !broke {
            continue;
        }
        let inside = cuts
            .iter()
            .any(|(s, e)| op.invoke >= *s && op.complete <= *e);
        let disturbed = others
            .iter()
            .any(|(s, e)| op.invoke <= *e && op.complete >= *s);
        if inside && !disturbed {
            let kind = match op.action {
                Action::Me | Action::Get { .. } => "read failed during a database outage",
                Action::Login { .. } => "login failed during a database outage",
                _ => "write failed during a database outage",
            };
            failed.entry(kind).or_default().push(op);
        }
    }
    for (kind, ops) in failed {
        out.push(Violation {
            rule: Rule::D,
            kind,
            session: None,
            detail: format!(
                "{} request(s) failed while only the audit database was unreachable and Redis \
                 was healthy, first {}",
                ops.len(),
                describe(ops[0])
            ),
        });
    }
}

// ---------------------------------------------------------------------------
// (e)

fn recovery(h: &History, out: &mut Vec<Violation>) {
    for f in &h.faults {
        if f.settled.is_none() {
            out.push(Violation {
                rule: Rule::E,
                kind: "fault did not settle",
                session: None,
                detail: format!(
                    "{}{} at {:.3}s: the system did not settle within the bound",
                    f.kind.name(),
                    f.target.map(|t| format!(" #{t}")).unwrap_or_default(),
                    secs(f.start)
                ),
            });
        }
    }
    let mut crashed: BTreeMap<&str, Vec<&crate::history::ProcessExit>> = BTreeMap::new();
    for e in h.exits.iter().filter(|e| e.started) {
        crashed.entry(&e.who).or_default().push(e);
    }
    for (who, exits) in crashed {
        out.push(Violation {
            rule: Rule::E,
            kind: "process exited by itself",
            session: None,
            detail: format!(
                "{who} exited by itself {} time(s) while running, first at {:.3}s ({})",
                exits.len(),
                secs(exits[0].at),
                exits[0].status
            ),
        });
    }
    let broken: Vec<&Op> = h
        .ops
        .iter()
        .filter(|op| {
            op.final_read
                && match &op.reply {
                    Reply::Http { status, .. } => *status >= 500,
                    _ => true,
                }
        })
        .collect();
    if let Some(first) = broken.first() {
        out.push(Violation {
            rule: Rule::E,
            kind: "read failed at quiescence",
            session: first.session.clone(),
            detail: format!(
                "{} read(s) at quiescence got no answer, first {}",
                broken.len(),
                describe(first)
            ),
        });
    }
}

#[cfg(test)]
#[path = "checker_tests.rs"]
mod tests;
