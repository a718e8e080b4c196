//! The mutations: create, update, touch, switch_platform, rotate, destroy,
//! destroy_all_for_user, and the reaper's expire.
//!
//! Each one folds in Rust, runs the script once, and then (with
//! `DB_SESSION_SYNC`) commits the events it appended to the audit database.
//! When Redis cannot be reached and `DB_SESSION_FALLBACK` is on, the same
//! events are staged in the audit database instead, against the version of
//! the database's view of the session (see `store::fallback`).
//!
//! A mutation whose connection broke before its reply is sent again, once,
//! with the same event ids and the same expected version: when the first
//! attempt was applied, the script's answer shows the caller's own write
//! (the state it folded, its new session), which counts as success, so the
//! retry never applies a change twice.

use std::time::Duration;

use rand::Rng as _;
use redis::AsyncCommands as _;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::SessionStore;
use super::script::{self, Operation as _, Reply};
#[cfg(feature = "audit")]
use crate::audit::outbox::Staged;
use crate::error::{Error, Result};
use crate::event::{DestroyReason, Event, EventKind, Incoming, Platform, SCHEMA_VERSION};
use crate::id::{SessionId, Token};
use crate::keys::Keys;
use crate::session::{Changes, NewSession, RESERVED_KEYS, Record, user_id_of};
use crate::time::Timestamp;

/// A new session: the token for the cookie (returned once, never stored), its
/// id, its state, and any sessions of the same user that the per-user limit
/// ended to make room.
#[derive(Debug, Clone)]
pub struct Created {
    /// The bearer token for the cookie.
    pub token: Token,
    /// `hex(SHA-256(token))`.
    pub session_id: SessionId,
    /// The session as stored.
    pub session: Record,
    /// Sessions destroyed with reason `evicted`.
    pub evicted: Vec<SessionId>,
}

/// Event metadata shared by the events of one call.
struct Meta {
    occurred_at: Timestamp,
    traceparent: Option<String>,
}

impl Meta {
    fn now() -> Self {
        Meta {
            occurred_at: Timestamp::now(),
            traceparent: crate::telemetry::current_traceparent(),
        }
    }

    fn event_with_id(
        &self,
        event_id: Uuid,
        session_id: &SessionId,
        seq: u64,
        user_id: Option<String>,
        kind: EventKind,
    ) -> Event {
        Event {
            event_id,
            session_id: session_id.clone(),
            seq,
            occurred_at: self.occurred_at,
            user_id,
            schema: SCHEMA_VERSION,
            kind,
            traceparent: self.traceparent.clone(),
        }
    }

    fn event(
        &self,
        session_id: &SessionId,
        seq: u64,
        user_id: Option<String>,
        kind: EventKind,
    ) -> Event {
        self.event_with_id(Uuid::now_v7(), session_id, seq, user_id, kind)
    }

    /// What the stream entries of this call's events record besides the
    /// events' own fields.
    fn stamp(&self) -> script::Stamp<'_> {
        script::Stamp {
            occurred_at: self.occurred_at,
            schema: SCHEMA_VERSION,
            traceparent: self.traceparent.as_deref(),
        }
    }

    /// The `destroyed` events the script composed itself (evictions, logout
    /// everywhere), from its `"<id> <seq> <stream id>"` entries and the event
    /// ids it was given, in order.
    fn composed(
        &self,
        entries: &[String],
        ids: &[String],
        user: Option<&str>,
        reason: DestroyReason,
    ) -> Vec<Incoming> {
        entries
            .iter()
            .zip(ids)
            .filter_map(|(entry, eid)| {
                let mut parts = entry.split(' ');
                let sid = parts.next()?.parse::<SessionId>().ok()?;
                let seq = parts.next()?.parse::<u64>().ok()?;
                let xid = parts.next()?.to_owned();
                let event_id = eid.parse::<Uuid>().ok()?;
                Some(Incoming {
                    stream_id: Some(xid),
                    event: self.event_with_id(
                        event_id,
                        &sid,
                        seq,
                        user.map(str::to_owned),
                        EventKind::Destroyed { reason },
                    ),
                })
            })
            .collect()
    }
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|_| Uuid::now_v7().to_string()).collect()
}

fn first_ids(entries: &[String]) -> Vec<SessionId> {
    entries
        .iter()
        .filter_map(|e| e.split(' ').next()?.parse().ok())
        .collect()
}

fn streamed(stream_id: String, event: Event) -> Incoming {
    Incoming {
        stream_id: Some(stream_id),
        event,
    }
}

/// The error of a write whose outcome cannot be known while Redis is
/// unreachable ([`Outcome::Unknown`]): unavailable, so the caller may try
/// again.
#[cfg(feature = "audit")]
fn outcome_unknown() -> Error {
    tracing::warn!(
        "redis may have applied a write before its connection broke, and the audit database moved on; not applying it again"
    );
    Error::unavailable(
        "the write's outcome is unknown: redis may have applied it before its connection broke",
    )
}

/// Where a write ended up.
enum Written {
    /// Redis took it; the stream id (unknown when a retried attempt found its
    /// own write already applied).
    Redis(Option<String>),
    /// The audit database staged it (fallback).
    #[cfg(feature = "audit")]
    Database,
    /// The version moved on; the current state when the session still lives.
    Conflict(Record),
    /// Fold again on a fresh read (the database's view moved on).
    #[cfg(feature = "audit")]
    Reread,
    /// No live session.
    Gone,
}

/// Where one attempt at a touch ended.
enum Touched {
    Done(Record),
    /// Another write came first; its state when Redis answered.
    Moved(Option<Record>),
    /// No live session.
    Gone,
}

/// The state a write folds on first.
enum Base {
    /// The caller's (`update_from`, a web request's load).
    Given(Record),
    /// Read for a call given no state.
    Read(Record),
    /// What this store's last write given no state left (see
    /// `store::states`): maybe behind.
    Remembered(Record),
}

impl Base {
    /// The state, whether it is remembered, and whether the state the write
    /// leaves is to be remembered (it was given none).
    fn split(self) -> (Record, bool, bool) {
        match self {
            Base::Given(s) => (s, false, false),
            Base::Read(s) => (s, false, true),
            Base::Remembered(s) => (s, true, true),
        }
    }
}

/// Where a script invocation went.
enum Outcome {
    /// Redis answered; whether the invocation was sent twice.
    Redis(Reply, bool),
    /// Redis was unreachable; the database staged the events (or refused).
    #[cfg(feature = "audit")]
    Staged(Staged),
    /// Redis may have applied the invocation before its connection broke,
    /// and the database's view is not at the version it was folded on:
    /// nothing was staged (see `run_or_fallback`).
    #[cfg(feature = "audit")]
    Unknown,
}

impl SessionStore {
    fn ttl_ms(&self) -> u64 {
        self.config.session_timeout.as_millis() as u64
    }

    /// A per-call time to live in ms: at most `REDIS_SESSION_TIMEOUT` (the
    /// audit database computes deadlines from the timeout, and its sweep of
    /// overdue sessions relies on Redis never holding one longer), at least
    /// 1 ms.
    fn clamped_ttl_ms(&self, ttl: Duration) -> u64 {
        (ttl.min(self.config.session_timeout).as_millis() as u64).max(1)
    }

    /// [`Self::clamped_ttl_ms`], or `None` when it is the timeout itself
    /// (the usual write, which costs nothing more).
    fn own_ttl(&self, ttl: Duration) -> Option<u64> {
        let ms = self.clamped_ttl_ms(ttl);
        (ms != self.ttl_ms()).then_some(ms)
    }

    pub(super) fn shape(&self) -> script::Shape {
        script::Shape::of(&self.config)
    }

    fn tomb_ms(&self) -> u64 {
        self.config.tombstone_ttl.as_millis() as u64
    }

    /// True when a write or create with time to live `ttl_ms` (the timeout
    /// when `None`) may take the script's hot path: the lean layout, and a
    /// deadline further away than the look-ahead (nearer, a write keeps a
    /// ledger, which the hot path does not write).
    fn quick_ttl(&self, ttl_ms: Option<u64>) -> bool {
        let shape = self.shape();
        shape.layout == crate::config::Layout::Lean
            && ttl_ms.unwrap_or_else(|| self.ttl_ms()) > shape.lookahead_ms
    }

    fn checked_json(&self, session: &Record) -> Result<String> {
        let json = session.to_json();
        if json.len() > self.config.max_bytes {
            return Err(Error::TooLarge {
                size: json.len(),
                max: self.config.max_bytes,
            });
        }
        Ok(json)
    }

    /// The error for a session that has no live state (a rare path: the
    /// lookup is boxed so that it does not enlarge every write's future).
    async fn missing(&self, id: &SessionId) -> Error {
        match Box::pin(self.tombstone(id)).await {
            Ok(Some(status)) => Error::Ended {
                session_id: id.clone(),
                status,
            },
            Ok(None) => Error::NotFound(id.clone()),
            Err(e) => e,
        }
    }

    async fn backoff(attempt: u32) {
        if attempt < 3 {
            tokio::task::yield_now().await;
        } else {
            let cap = u64::from(attempt.min(10));
            let us = rand::rng().random_range(0..cap * 500);
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
    }

    /// With `REDIS_WAIT_REPLICAS`: waits until that many replicas have the
    /// writes of this connection. `WAIT` holds the shared connection while it
    /// waits, so every command behind it waits too: the price of not losing
    /// an acknowledged write to a failover. On a cluster it waits on the
    /// primary of the partition written (`part`).
    pub(super) async fn replicate(&self, part: &Keys) -> Result<()> {
        let wanted = self.config.wait_replicas;
        if wanted == 0 {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let acknowledged = Box::pin(conn.wait_replicas(
            &part.stream,
            wanted,
            self.config.wait_timeout.as_millis() as u64,
        ))
        .await?;
        if acknowledged < wanted {
            return Err(Error::NotReplicated {
                wanted,
                acknowledged,
            });
        }
        Ok(())
    }

    /// Runs a script invocation (sent again once if its connection broke);
    /// when Redis is unreachable and the fallback is on, stages the events
    /// `fallback` builds (each with the version it was folded on) in the
    /// audit database instead. They are built only then.
    ///
    /// When Redis may have applied the invocation before its connection
    /// broke and the database's view of the session is not at the version
    /// it was folded on (it moved on, or it lags Redis), nothing is staged
    /// ([`Outcome::Unknown`]): folding the change again, under a new event
    /// id, on a view that may already hold it (the audit consumer recorded
    /// it from the stream) or beside Redis's copy of it would apply it
    /// twice, and answer the caller with a state that never was.
    async fn run_or_fallback(
        &self,
        part: &Keys,
        inv: &script::Invocation,
        settle: Option<&SessionId>,
        fallback: impl FnOnce() -> Vec<(u64, Event)>,
    ) -> Result<Outcome> {
        let settled = match settle {
            Some(id) => self.settle(id).await,
            None => Ok(()),
        };
        let ran = match settled {
            Ok(()) => script::run_retrying(inv, &mut self.conn.clone()).await,
            Err(e) => Err(e),
        };
        match ran {
            Ok((r, retried)) => {
                if matches!(r, Reply::Ok(..)) {
                    self.appended(part);
                    self.replicate(part).await?;
                }
                Ok(Outcome::Redis(r, retried))
            }
            Err(e) if e.is_unavailable() => {
                self.note_unavailable();
                #[cfg(feature = "audit")]
                if self.fallback_enabled() {
                    let events = fallback();
                    let unsure = e.may_have_applied();
                    let staged = Box::pin(self.fallback_stage(part, &events, e)).await?;
                    if unsure && staged == Staged::Conflict {
                        return Ok(Outcome::Unknown);
                    }
                    return Ok(Outcome::Staged(staged));
                }
                #[cfg(not(feature = "audit"))]
                drop(fallback);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// True when Redis holds `id` with exactly `json`: a retried mutation
    /// finds its own first attempt applied.
    pub(super) async fn holds(&self, id: &SessionId, json: &str) -> bool {
        let now: redis::RedisResult<Option<String>> =
            self.conn.clone().get(self.keys.session(id)).await;
        matches!(now, Ok(Some(j)) if j == json)
    }

    /// Creates a session and returns its token, once. When the user already
    /// has `SESSION_MAX_PER_USER` sessions, the oldest is destroyed with
    /// reason `evicted` in the same atomic step.
    #[tracing::instrument(skip_all, fields(session_id), err)]
    pub async fn create(&self, new: NewSession) -> Result<Created> {
        let started = std::time::Instant::now();
        let result: Result<Created> = async {
            self.catch_up().await;
            self.create_inner(new.fields, None, None).await
        }
        .await;
        crate::telemetry::record_operation("create", started, &result);
        result
    }

    /// Like [`SessionStore::create`], with a time to live of this write's
    /// own instead of `REDIS_SESSION_TIMEOUT`: the session ends (an
    /// `expired` event) `ttl` from now unless a later write extends it.
    /// `ttl` is clamped to at most `REDIS_SESSION_TIMEOUT` (the audit
    /// database and its sweep of overdue sessions count deadlines from the
    /// timeout, so no session may outlive it in Redis) and to at least 1 ms.
    #[tracing::instrument(skip_all, fields(session_id), err)]
    pub async fn create_with_ttl(&self, new: NewSession, ttl: Duration) -> Result<Created> {
        let started = std::time::Instant::now();
        let ttl_ms = self.own_ttl(ttl);
        let result: Result<Created> = async {
            self.catch_up().await;
            self.create_inner(new.fields, None, ttl_ms).await
        }
        .await;
        crate::telemetry::record_operation("create", started, &result);
        result
    }

    async fn create_inner(
        &self,
        fields: Map<String, Value>,
        rotated_from: Option<(SessionId, Record, DestroyReason)>,
        ttl_ms: Option<u64>,
    ) -> Result<Created> {
        if let Some(k) = fields.keys().find(|k| RESERVED_KEYS.contains(&k.as_str())) {
            return Err(Error::InvalidInput(format!(
                "`{k}` is maintained by the store"
            )));
        }
        crate::session::check_fields(&fields)?;
        let user = user_id_of(&fields);
        // With partitions, a user's sessions may sit in several partitions:
        // the limit is enforced across them after the create (best effort),
        // not inside the script, which only sees its own partition.
        let partitioned = self.keys.partitions() > 1;
        let script_limit = if partitioned {
            0
        } else {
            self.config.max_per_user
        };
        let mut spare = usize::from(user.is_some() && script_limit > 0);
        loop {
            let token = match &rotated_from {
                // A rotation stays in the old session's partition, so that
                // ending the old id and creating the new one is one script.
                Some((old, _, _)) => self.token_in_partition(self.keys.partition_of(old)),
                None => Token::generate(),
            };
            let id = token.session_id();
            tracing::Span::current().record("session_id", tracing::field::display(&id));
            let meta = Meta::now();
            let created = meta.event(
                &id,
                1,
                user.clone(),
                EventKind::Created {
                    fields: fields.clone(),
                    imported: None,
                    rotated_from: rotated_from.as_ref().map(|r| r.0.clone()),
                },
            );
            let session = Record::default().apply(&created);
            let json = self.checked_json(&session)?;
            let spare_ids = ids(spare);
            let part = self.keys.for_session(&id);
            let inv;
            let mut ended_old = None;
            match &rotated_from {
                None => {
                    let create = script::Create {
                        id: &id,
                        json: &json,
                        ttl_ms: ttl_ms.unwrap_or_else(|| self.ttl_ms()),
                        tomb_ms: self.tomb_ms(),
                        user: user.as_deref().unwrap_or(""),
                        max_per_user: script_limit,
                        event_id: created.event_id,
                        payload: &created.kind.payload_json(),
                        stamp: meta.stamp(),
                        spare_ids: &spare_ids,
                    };
                    inv = if script_limit == 0 && self.quick_ttl(ttl_ms) {
                        create.quick(part, self.shape().lookahead_ms)
                    } else {
                        create.invocation(part, self.shape())
                    };
                }
                Some((old, current, reason)) => {
                    let end = meta.event(
                        old,
                        current.version() + 1,
                        current.user_key(),
                        EventKind::Destroyed { reason: *reason },
                    );
                    inv = script::Rotate {
                        old,
                        expected: current.version(),
                        old_user: end.user_id.as_deref().unwrap_or(""),
                        new: &id,
                        json: &json,
                        ttl_ms: self.ttl_ms(),
                        tomb_ms: self.tomb_ms(),
                        user: user.as_deref().unwrap_or(""),
                        max_per_user: script_limit,
                        end_id: end.event_id,
                        end_payload: &end.kind.payload_json(),
                        create_id: created.event_id,
                        create_payload: &created.kind.payload_json(),
                        stamp: meta.stamp(),
                        spare_ids: &spare_ids,
                    }
                    .invocation(part, self.shape());
                    ended_old = Some((current.version(), end));
                }
            }
            let done = |evicted| Created {
                token: token.clone(),
                session_id: id.clone(),
                session: session.clone(),
                evicted,
            };
            let settle = rotated_from.as_ref().map(|r| &r.0);
            match self
                .run_or_fallback(part, &inv, settle, || {
                    let mut events: Vec<(u64, Event)> = ended_old.iter().cloned().collect();
                    events.push((0, created.clone()));
                    events
                })
                .await?
            {
                Outcome::Redis(Reply::Ok(xid, extra), _) => {
                    let (entries, mut events) = match ended_old {
                        None => (extra, Vec::new()),
                        Some((_, end)) => {
                            let mut it = extra.into_iter();
                            let oxid = it.next().unwrap_or_default();
                            let old_user = it.next().filter(|u| !u.is_empty());
                            let end = Event {
                                user_id: old_user,
                                ..end
                            };
                            (it.collect(), vec![streamed(oxid, end)])
                        }
                    };
                    events.push(streamed(xid, created));
                    events.extend(meta.composed(
                        &entries,
                        &spare_ids,
                        user.as_deref(),
                        DestroyReason::Evicted,
                    ));
                    self.sync(events).await?;
                    let mut evicted = first_ids(&entries);
                    for gone in settle.into_iter().chain(&evicted) {
                        self.shared.states.forget(gone);
                    }
                    if partitioned && let Some(u) = user.as_deref() {
                        evicted.extend(Box::pin(self.enforce_user_limit(u, &id)).await?);
                    }
                    return Ok(done(evicted));
                }
                Outcome::Redis(Reply::NeedIds(n), _) => spare = n,
                // A retried attempt whose first try went through finds its
                // own session (and, for a rotation, its own tombstone).
                Outcome::Redis(Reply::Exists | Reply::Ended(_) | Reply::Missing, true)
                    if self.holds(&id, &json).await =>
                {
                    return Ok(done(Vec::new()));
                }
                Outcome::Redis(Reply::Exists, _) => continue,
                Outcome::Redis(Reply::Conflict(_), _) => {
                    return Err(Error::Conflict {
                        session_id: rotated_from.map(|r| r.0).unwrap_or(id),
                        attempts: 1,
                    });
                }
                #[cfg(feature = "audit")]
                Outcome::Staged(Staged::Conflict | Staged::Refused) => {
                    return Err(Error::Conflict {
                        session_id: rotated_from.map(|r| r.0).unwrap_or(id),
                        attempts: 1,
                    });
                }
                #[cfg(feature = "audit")]
                Outcome::Staged(Staged::Written) => return Ok(done(Vec::new())),
                #[cfg(feature = "audit")]
                Outcome::Unknown => return Err(outcome_unknown()),
                Outcome::Redis(Reply::Missing | Reply::Ended(_), _) => {
                    let old = rotated_from.map(|r| r.0).unwrap_or(id);
                    return Err(self.missing(&old).await);
                }
                Outcome::Redis(other, _) => {
                    return Err(Error::Corrupt(format!(
                        "create: unexpected reply {other:?}"
                    )));
                }
            }
        }
    }

    /// One attempt at writing a folded event (Redis, or the database in
    /// fallback mode).
    /// `base` is the version `next` was folded on and `old_user` its user.
    #[allow(clippy::too_many_arguments)]
    async fn write_once(
        &self,
        id: &SessionId,
        base: u64,
        old_user: Option<&str>,
        next: &Record,
        event: &Event,
        meta: &Meta,
        ttl_ms: Option<u64>,
    ) -> Result<Written> {
        let json = self.checked_json(next)?;
        let part = self.keys.for_session(id);
        let user = event.user_id.as_deref().unwrap_or("");
        let old_user = old_user.unwrap_or("");
        let payload = event.kind.payload_json();
        let write = script::Write {
            id,
            expected: base,
            json: &json,
            ttl_ms: ttl_ms.unwrap_or_else(|| self.ttl_ms()),
            tomb_ms: self.tomb_ms(),
            user,
            old_user,
            kind: event.kind.type_name(),
            event_id: event.event_id,
            payload: &payload,
            stamp: meta.stamp(),
            // A time to live of the call's own may be shorter than the one
            // the expiry entry was filed for: the script lowers the entry
            // (the usual write leaves it alone, see `store_live`).
            lower: ttl_ms.is_some(),
        };
        let inv = if !write.lower && user == old_user && self.quick_ttl(None) {
            write.quick(part)
        } else {
            write.invocation(part, self.shape())
        };
        let outcome = self
            .run_or_fallback(part, &inv, Some(id), || vec![(base, event.clone())])
            .await?;
        Ok(match outcome {
            Outcome::Redis(Reply::Ok(xid, _), _) => Written::Redis(Some(xid)),
            // The first attempt went through before its connection broke.
            Outcome::Redis(Reply::Conflict(Some(j)), true) if j == json => Written::Redis(None),
            Outcome::Redis(Reply::Conflict(Some(json)), _) => {
                Written::Conflict(super::parse_session(id, &json)?)
            }
            Outcome::Redis(Reply::Conflict(None) | Reply::Missing | Reply::Ended(_), _) => {
                self.shared.states.forget(id);
                Written::Gone
            }
            Outcome::Redis(other, _) => {
                return Err(Error::Corrupt(format!("write: unexpected reply {other:?}")));
            }
            #[cfg(feature = "audit")]
            Outcome::Staged(Staged::Written) => Written::Database,
            #[cfg(feature = "audit")]
            Outcome::Staged(Staged::Conflict | Staged::Refused) => Written::Reread,
            // Applied after all when the audit consumer recorded it (it read
            // the stream before Redis went away); otherwise only the stream
            // can tell, once Redis answers.
            #[cfg(feature = "audit")]
            Outcome::Unknown => {
                match crate::audit::outbox::logged(self.db()?, event.event_id).await {
                    Ok(true) => Written::Redis(None),
                    _ => return Err(outcome_unknown()),
                }
            }
        })
    }

    /// The common loop of every change to a live session: check the
    /// caller's preconditions and fold the change on the current state,
    /// write it if the version still matches, otherwise fold again on the
    /// state the script returned. `change` runs on every attempt, on the
    /// state of that attempt, so a change computed from the state (an
    /// increment, a `modify`) is never computed from a stale one.
    ///
    /// A `Remembered` state (see `store::states`) is only a guess: whatever
    /// but a success or a conflict's fresh state it leads to (a change that
    /// refuses it, a missing or ended session, a database that moved on) is
    /// not an answer, and the loop starts again from a read, as the call
    /// would have without it. Only the database's moving on costs an
    /// attempt, as it does from any state.
    async fn write(
        &self,
        id: &SessionId,
        base: Base,
        ttl_ms: Option<u64>,
        change: impl Fn(&Record) -> Result<EventKind>,
    ) -> Result<Record> {
        let attempts = self.config.max_retries.max(1);
        let mut brought_back = false;
        let (mut current, mut remembered, keep) = base.split();
        let mut attempt = 1;
        while attempt <= attempts {
            let meta = Meta::now();
            let base = current.version();
            let old_user = current.user_key();
            let kind = match change(&current) {
                Ok(kind) => kind,
                Err(_) if remembered => {
                    (current, remembered) = (self.current(id).await?, false);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let draft = meta.event(id, base + 1, None, kind);
            // Folded in place: a conflict brings a fresh state anyway.
            let mut next = current;
            next.apply_mut(&draft);
            let user_id = if draft.kind.may_change_user() {
                next.user_key()
            } else {
                old_user.clone()
            };
            let event = Event { user_id, ..draft };
            let retry = match self
                .write_once(id, base, old_user.as_deref(), &next, &event, &meta, ttl_ms)
                .await?
            {
                Written::Redis(xid) => {
                    if keep {
                        self.shared.states.remember(id, &next);
                    }
                    if let Some(xid) = xid {
                        self.sync(vec![streamed(xid, event)]).await?;
                    }
                    return Ok(next);
                }
                #[cfg(feature = "audit")]
                Written::Database => {
                    if keep {
                        self.shared.states.remember(id, &next);
                    }
                    return Ok(next);
                }
                // The remembered state was behind: the script's answer is
                // the read it saved.
                Written::Conflict(s) if remembered => {
                    (current, remembered) = (s, false);
                    continue;
                }
                Written::Conflict(s) => s,
                #[cfg(feature = "audit")]
                Written::Reread => {
                    remembered = false;
                    self.current(id).await?
                }
                Written::Gone if remembered => {
                    (current, remembered) = (self.current(id).await?, false);
                    continue;
                }
                // Redis lacks a session the audit database may know live
                // (it is recovering, or lost the key): put it back under the
                // one rule and fold again on it.
                Written::Gone if !brought_back && Box::pin(self.bring_back(id)).await? => {
                    brought_back = true;
                    self.current(id).await?
                }
                Written::Gone => return Err(self.missing(id).await),
            };
            current = retry;
            let m = crate::telemetry::metrics();
            m.conflicts.add(1, &[]);
            m.retries.add(1, &[]);
            Self::backoff(attempt).await;
            attempt += 1;
        }
        Err(Error::Conflict {
            session_id: id.clone(),
            attempts,
        })
    }

    /// The base of a write given no state: the state this store remembers
    /// writing, else a read.
    async fn base(&self, id: &SessionId) -> Result<Base> {
        match self.shared.states.take(id) {
            Some(s) => {
                self.catch_up().await;
                Ok(Base::Remembered(s))
            }
            None => self.current(id).await.map(Base::Read),
        }
    }

    async fn current(&self, id: &SessionId) -> Result<Record> {
        match self.get(id).await? {
            Some(s) => Ok(s),
            None => Err(self.missing(id).await),
        }
    }

    /// Sets and removes application keys: one `updated` event. Keys the store
    /// maintains (`_version`, `_last_updated`, `created_at`,
    /// `last_activity`) are refused. Concurrent updates of different keys all
    /// survive; a change whose preconditions (`changes.expect`) a concurrent
    /// write broke is refused with [`Error::StaleRead`].
    ///
    /// It folds on the state this store's last write given no state of the
    /// session left, when it remembers it (`SESSION_STATE_CACHE_BYTES`), else on
    /// a read; so do `touch`, `modify`, `increment` and `switch_platform`.
    #[tracing::instrument(skip_all, fields(session_id = %id), err)]
    pub async fn update(&self, id: &SessionId, changes: Changes) -> Result<Record> {
        let started = std::time::Instant::now();
        let result = match self.base(id).await {
            Ok(base) => self.update_in(id, base, changes, None).await,
            Err(e) => Err(e),
        };
        crate::telemetry::record_operation("update", started, &result);
        result
    }

    /// Like [`SessionStore::update`], with a time to live of this write's
    /// own instead of `REDIS_SESSION_TIMEOUT` (clamped as in
    /// [`SessionStore::create_with_ttl`]): the session's deadline becomes
    /// `ttl` from now, earlier or later than it was.
    #[tracing::instrument(skip_all, fields(session_id = %id), err)]
    pub async fn update_with_ttl(
        &self,
        id: &SessionId,
        changes: Changes,
        ttl: Duration,
    ) -> Result<Record> {
        let started = std::time::Instant::now();
        let ttl_ms = self.own_ttl(ttl);
        let result = match self.base(id).await {
            Ok(base) => self.update_in(id, base, changes, ttl_ms).await,
            Err(e) => Err(e),
        };
        crate::telemetry::record_operation("update", started, &result);
        result
    }

    /// [`SessionStore::update_from`] with a time to live of this write's
    /// own (see [`SessionStore::update_with_ttl`]).
    #[tracing::instrument(skip_all, fields(session_id = %id), err)]
    pub async fn update_from_with_ttl(
        &self,
        id: &SessionId,
        current: Record,
        changes: Changes,
        ttl: Duration,
    ) -> Result<Record> {
        let started = std::time::Instant::now();
        let ttl_ms = self.own_ttl(ttl);
        self.catch_up().await;
        let result = self
            .update_in(id, Base::Given(current), changes, ttl_ms)
            .await;
        crate::telemetry::record_operation("update", started, &result);
        result
    }

    /// Like [`SessionStore::update`], folding on a state the caller already
    /// read (a web request's session), which saves the `GET`. When the
    /// session moved on since, the script returns its current state and the
    /// change is folded again on top of it, as with `update`, unless a
    /// precondition in `changes.expect` no longer holds.
    #[tracing::instrument(skip_all, fields(session_id = %id), err)]
    pub async fn update_from(
        &self,
        id: &SessionId,
        current: Record,
        changes: Changes,
    ) -> Result<Record> {
        let started = std::time::Instant::now();
        self.catch_up().await;
        let result = self
            .update_in(id, Base::Given(current), changes, None)
            .await;
        crate::telemetry::record_operation("update", started, &result);
        result
    }

    async fn update_in(
        &self,
        id: &SessionId,
        base: Base,
        changes: Changes,
        ttl_ms: Option<u64>,
    ) -> Result<Record> {
        if let Some(k) = changes.reserved_key() {
            return Err(Error::InvalidInput(format!(
                "`{k}` is maintained by the store"
            )));
        }
        crate::session::check_fields(&changes.set)?;
        self.write(id, base, ttl_ms, |now| {
            if let Some(key) = changes.stale_key(now) {
                return Err(Error::StaleRead {
                    session_id: id.clone(),
                    key: key.to_owned(),
                });
            }
            Ok(EventKind::Updated {
                set: changes.set.clone(),
                unset: changes.unset.clone(),
            })
        })
        .await
    }

    /// Changes one key with a function of its current value (`None` when
    /// absent; returning `None` removes it), as one `updated` event. The
    /// function runs again on the fresh state after every version conflict,
    /// so concurrent `modify` calls never lose each other's changes (a
    /// read-modify-write done by hand does; see `docs/web.md`). Returns the
    /// session as stored.
    #[tracing::instrument(skip_all, fields(session_id = %id, key = key), err)]
    pub async fn modify(
        &self,
        id: &SessionId,
        key: &str,
        f: impl Fn(Option<&Value>) -> Result<Option<Value>>,
    ) -> Result<Record> {
        let started = std::time::Instant::now();
        let result = match self.base(id).await {
            Ok(base) => self.modify_in(id, base, key, f).await,
            Err(e) => Err(e),
        };
        crate::telemetry::record_operation("update", started, &result);
        result
    }

    /// Like [`SessionStore::modify`], folding first on a state the caller
    /// already read.
    pub async fn modify_from(
        &self,
        id: &SessionId,
        current: Record,
        key: &str,
        f: impl Fn(Option<&Value>) -> Result<Option<Value>>,
    ) -> Result<Record> {
        let started = std::time::Instant::now();
        self.catch_up().await;
        let result = self.modify_in(id, Base::Given(current), key, f).await;
        crate::telemetry::record_operation("update", started, &result);
        result
    }

    async fn modify_in(
        &self,
        id: &SessionId,
        base: Base,
        key: &str,
        f: impl Fn(Option<&Value>) -> Result<Option<Value>>,
    ) -> Result<Record> {
        if RESERVED_KEYS.contains(&key) {
            return Err(Error::InvalidInput(format!(
                "`{key}` is maintained by the store"
            )));
        }
        crate::session::check_key(key)?;
        self.write(id, base, None, |now| {
            let (set, unset) = match f(now.get(key))? {
                Some(v) => (Map::from_iter([(key.to_owned(), v)]), Vec::new()),
                None => (Map::new(), vec![key.to_owned()]),
            };
            Ok(EventKind::Updated { set, unset })
        })
        .await
    }

    /// Adds `by` to an integer key (absent counts as 0), atomically: one
    /// `updated` event, re-applied on the fresh state after every conflict,
    /// so a counter loses nothing under any concurrency. Returns the new
    /// value. A key holding anything but an integer, or an overflow, is
    /// [`Error::InvalidInput`] and writes nothing.
    pub async fn increment(&self, id: &SessionId, key: &str, by: i64) -> Result<i64> {
        let s = self
            .modify(id, key, |v| increment_value(key, v, by))
            .await?;
        Ok(s.get(key).and_then(Value::as_i64).unwrap_or_default())
    }

    /// Like [`SessionStore::increment`], folding first on a state the caller
    /// already read; returns the session as stored.
    pub async fn increment_from(
        &self,
        id: &SessionId,
        current: Record,
        key: &str,
        by: i64,
    ) -> Result<Record> {
        self.modify_from(id, current, key, |v| increment_value(key, v, by))
            .await
    }

    /// Appends a `touched` event now, refreshing `last_activity` and the TTL.
    #[tracing::instrument(skip_all, fields(session_id = %id), err)]
    pub async fn touch(&self, id: &SessionId) -> Result<Record> {
        let started = std::time::Instant::now();
        let result = self.touch_base(id, None).await;
        crate::telemetry::record_operation("touch", started, &result);
        result
    }

    /// Like [`SessionStore::touch`], with a time to live of this write's own
    /// (clamped as in [`SessionStore::create_with_ttl`]): the deadline
    /// becomes `ttl` from now, earlier or later than it was. One attempt: a
    /// concurrent write is [`Error::Conflict`].
    #[tracing::instrument(skip_all, fields(session_id = %id), err)]
    pub async fn touch_with_ttl(&self, id: &SessionId, ttl: Duration) -> Result<Record> {
        let started = std::time::Instant::now();
        let ttl_ms = self.own_ttl(ttl);
        let result = self.touch_base(id, ttl_ms).await;
        crate::telemetry::record_operation("touch", started, &result);
        result
    }

    /// A touch given no state: on the state this store remembers writing,
    /// else on a read. A remembered state another writer moved on is tried
    /// once more on the state the script answered; any other failure of it
    /// is not an answer, and the touch reads the session (see `write`).
    async fn touch_base(&self, id: &SessionId, ttl_ms: Option<u64>) -> Result<Record> {
        let touched = match self.base(id).await? {
            Base::Remembered(s) => match self.touch_once(id, s, ttl_ms).await? {
                Touched::Done(s) => s,
                Touched::Moved(Some(s)) => self.touch_at(id, s, ttl_ms).await?,
                Touched::Moved(None) | Touched::Gone => {
                    let current = self.current(id).await?;
                    self.touch_at(id, current, ttl_ms).await?
                }
            },
            Base::Read(s) | Base::Given(s) => self.touch_at(id, s, ttl_ms).await?,
        };
        self.shared.states.remember(id, &touched);
        Ok(touched)
    }

    /// Touch with one attempt: a conflict means another write just refreshed
    /// the session, which is all a touch wants.
    pub(super) async fn touch_at(
        &self,
        id: &SessionId,
        current: Record,
        ttl_ms: Option<u64>,
    ) -> Result<Record> {
        match self.touch_once(id, current, ttl_ms).await? {
            Touched::Done(s) => Ok(s),
            Touched::Moved(_) => {
                crate::telemetry::metrics().conflicts.add(1, &[]);
                Err(Error::Conflict {
                    session_id: id.clone(),
                    attempts: 1,
                })
            }
            Touched::Gone => Err(self.missing(id).await),
        }
    }

    async fn touch_once(
        &self,
        id: &SessionId,
        current: Record,
        ttl_ms: Option<u64>,
    ) -> Result<Touched> {
        let meta = Meta::now();
        let kind = EventKind::Touched {
            last_activity: meta.occurred_at,
        };
        let base = current.version();
        let user = current.user_key();
        let event = meta.event(id, base + 1, user.clone(), kind);
        let mut next = current;
        next.apply_mut(&event);
        Ok(
            match self
                .write_once(id, base, user.as_deref(), &next, &event, &meta, ttl_ms)
                .await?
            {
                Written::Redis(xid) => {
                    if let Some(xid) = xid {
                        self.sync(vec![streamed(xid, event)]).await?;
                    }
                    Touched::Done(next)
                }
                #[cfg(feature = "audit")]
                Written::Database => Touched::Done(next),
                #[cfg(feature = "audit")]
                Written::Reread => Touched::Moved(None),
                Written::Conflict(s) => Touched::Moved(Some(s)),
                Written::Gone => Touched::Gone,
            },
        )
    }

    /// Moves the session to another platform connection: one
    /// `platform_switched` event.
    #[tracing::instrument(skip_all, fields(session_id = %id), err)]
    pub async fn switch_platform(&self, id: &SessionId, platform: Platform) -> Result<Record> {
        let started = std::time::Instant::now();
        let result: Result<Record> = async {
            let base = self.base(id).await?;
            self.write(id, base, None, |_| {
                Ok(EventKind::PlatformSwitched(platform.clone()))
            })
            .await
        }
        .await;
        crate::telemetry::record_operation("switch_platform", started, &result);
        result
    }

    /// Replaces the session's id (session fixation defence): the old id is
    /// destroyed with reason `rotated` and tombstoned, and a new session
    /// carrying the old one's application fields plus `changes` is created
    /// with `rotated_from`, in one atomic step. Returns the new token.
    #[tracing::instrument(skip_all, fields(session_id = %id), err)]
    pub async fn rotate(&self, id: &SessionId, changes: Changes) -> Result<Created> {
        let started = std::time::Instant::now();
        let result: Result<Created> = async {
            if let Some(k) = changes.reserved_key() {
                return Err(Error::InvalidInput(format!(
                    "`{k}` is maintained by the store"
                )));
            }
            let attempts = self.config.max_retries.max(1);
            for attempt in 1..=attempts {
                let current = self.current(id).await?;
                if let Some(key) = changes.stale_key(&current) {
                    return Err(Error::StaleRead {
                        session_id: id.clone(),
                        key: key.to_owned(),
                    });
                }
                let mut fields = current.app_fields();
                for k in &changes.unset {
                    fields.remove(k);
                }
                for (k, v) in &changes.set {
                    fields.insert(k.clone(), v.clone());
                }
                match self
                    .create_inner(
                        fields,
                        Some((id.clone(), current, DestroyReason::Rotated)),
                        None,
                    )
                    .await
                {
                    Err(Error::Conflict { .. }) => {
                        let m = crate::telemetry::metrics();
                        m.conflicts.add(1, &[]);
                        m.retries.add(1, &[]);
                        Self::backoff(attempt).await
                    }
                    other => return other,
                }
            }
            Err(Error::Conflict {
                session_id: id.clone(),
                attempts,
            })
        }
        .await;
        crate::telemetry::record_operation("rotate", started, &result);
        result
    }

    /// Ends a session: one `destroyed` event, the key deleted, a tombstone
    /// left so that no in-flight request can bring it back. Returns false
    /// when there was no live session to end.
    ///
    /// Complete in every mode: a session that Redis does not hold but the
    /// audit database knows live (Redis is recovering, or lost the key) is
    /// put back and ended; while Redis is unreachable the end is staged in
    /// the database (no proof that the database is current is needed: an
    /// end can only end).
    #[tracing::instrument(skip_all, fields(session_id = %id, reason = reason.as_str()), err)]
    pub async fn destroy(&self, id: &SessionId, reason: DestroyReason) -> Result<bool> {
        let started = std::time::Instant::now();
        self.shared.states.forget(id);
        let result: Result<bool> = async {
            self.catch_up().await;
            let attempts = self.config.max_retries.max(1);
            let mut brought_back = false;
            // The version and user of the session as last read: without
            // them the script ends it only when a ledger tells them, and
            // otherwise answers with the session's JSON.
            let mut known: Option<(u64, String)> = None;
            for attempt in 1..=attempts {
                // (Only a staged end that lost a race waits before the next.)
                #[cfg(not(feature = "audit"))]
                let _ = attempt;
                let meta = Meta::now();
                let kind = EventKind::Destroyed { reason };
                let event_id = Uuid::now_v7();
                let part = self.keys.for_session(id);
                let inv = script::End {
                    id,
                    expected: known.as_ref().map_or(-1, |k| k.0 as i64),
                    user: known.as_ref().map_or("", |k| k.1.as_str()),
                    kind: kind.type_name(),
                    status: crate::session::Status::Destroyed.as_str(),
                    tomb_ms: self.tomb_ms(),
                    event_id,
                    payload: &kind.payload_json(),
                    stamp: meta.stamp(),
                }
                .invocation(part, self.shape());
                let (reply, retried) =
                    match script::run_retrying(&inv, &mut self.conn.clone()).await {
                        #[cfg(feature = "audit")]
                        Err(e) if e.is_unavailable() && self.fallback_enabled() => {
                            self.note_unavailable();
                            let Some(view) = self.fallback_view(id).await? else {
                                return Ok(false);
                            };
                            if view.session.status() != crate::session::Status::Live {
                                return Ok(false);
                            }
                            let event = meta.event_with_id(
                                event_id,
                                id,
                                view.session.version() + 1,
                                view.session.user_key(),
                                kind,
                            );
                            match self
                                .fallback_stage(part, &[(view.session.version(), event)], e)
                                .await?
                            {
                                Staged::Written => return Ok(true),
                                // (`Refused` comes back as the Redis error.)
                                Staged::Conflict | Staged::Refused => {
                                    Self::backoff(attempt).await;
                                    continue;
                                }
                            }
                        }
                        Err(e) => {
                            if e.is_unavailable() {
                                self.note_unavailable();
                            }
                            return Err(e);
                        }
                        Ok(r) => r,
                    };
                return match reply {
                    Reply::Ok(xid, extra) => {
                        self.appended(part);
                        self.replicate(part).await?;
                        let seq = extra.first().and_then(|s| s.parse().ok()).unwrap_or(0);
                        let user = extra.get(1).filter(|u| !u.is_empty()).cloned();
                        let event = meta.event_with_id(event_id, id, seq, user, kind);
                        self.sync(vec![streamed(xid, event)]).await?;
                        Ok(true)
                    }
                    // The first attempt ended it before its connection broke.
                    Reply::Ended(_) if retried => Ok(true),
                    Reply::Conflict(Some(json)) => {
                        let s = super::parse_session(id, &json)?;
                        known = Some((s.version(), s.user_key().unwrap_or_default()));
                        continue;
                    }
                    Reply::Missing if !brought_back && Box::pin(self.bring_back(id)).await? => {
                        brought_back = true;
                        continue;
                    }
                    Reply::Missing | Reply::Ended(_) => Ok(false),
                    other => Err(Error::Corrupt(format!(
                        "destroy: unexpected reply {other:?}"
                    ))),
                };
            }
            Err(Error::Conflict {
                session_id: id.clone(),
                attempts,
            })
        }
        .await;
        crate::telemetry::record_operation("destroy", started, &result);
        result
    }

    /// Logs a user out everywhere: every live session of the user is
    /// destroyed. Returns the ids that were ended. Within one partition the
    /// sessions Redis holds end in one atomic step; with several partitions,
    /// each partition is one atomic step and they run in turn, so a session
    /// created in a partition already passed survives (as it would if it had
    /// been created just after the call).
    ///
    /// With the audit database attached it is complete in every mode: the
    /// sessions the database knows live that Redis did not end (Redis is
    /// recovering, unreachable, or lost an index entry) are ended one by one
    /// through [`SessionStore::destroy`].
    #[tracing::instrument(skip_all, fields(user_id = user_id), err)]
    pub async fn destroy_all_for_user(
        &self,
        user_id: &str,
        reason: DestroyReason,
    ) -> Result<Vec<SessionId>> {
        let started = std::time::Instant::now();
        let result: Result<Vec<SessionId>> = async {
            if user_id.is_empty() {
                return Err(Error::InvalidInput("empty user id".to_owned()));
            }
            crate::session::check_user_id(user_id)?;
            self.catch_up().await;
            let mut ended = Vec::new();
            let mut redis_down = None;
            for part in self.keys.all() {
                match self.destroy_user_in(part, user_id, reason).await {
                    Ok(ids) => ended.extend(ids),
                    Err(e) if e.is_unavailable() && self.fallback_enabled() => {
                        redis_down = Some(e);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            self.end_sessions_known_to_audit(user_id, reason, ended, redis_down)
                .await
        }
        .await;
        for id in result.iter().flatten() {
            self.shared.states.forget(id);
        }
        crate::telemetry::record_operation("destroy_all_for_user", started, &result);
        result
    }

    /// Ends the user's sessions that one partition holds, atomically.
    async fn destroy_user_in(
        &self,
        part: &Keys,
        user_id: &str,
        reason: DestroyReason,
    ) -> Result<Vec<SessionId>> {
        let mut spare = 4;
        loop {
            let meta = Meta::now();
            let spare_ids = ids(spare);
            let inv = script::DestroyUser {
                user: user_id,
                tomb_ms: self.tomb_ms(),
                payload: &EventKind::Destroyed { reason }.payload_json(),
                stamp: meta.stamp(),
                event_ids: &spare_ids,
            }
            .invocation(part, self.shape());
            let reply = match script::run_retrying(&inv, &mut self.conn.clone()).await {
                Err(e) => {
                    if e.is_unavailable() {
                        self.note_unavailable();
                    }
                    return Err(e);
                }
                Ok((r, _)) => r,
            };
            match reply {
                Reply::Ok(_, entries) => {
                    self.appended(part);
                    self.replicate(part).await?;
                    let events = meta.composed(&entries, &spare_ids, Some(user_id), reason);
                    self.sync(events).await?;
                    return Ok(first_ids(&entries));
                }
                Reply::NeedIds(n) => spare = n + 4,
                other => {
                    return Err(Error::Corrupt(format!(
                        "destroy_all_for_user: unexpected reply {other:?}"
                    )));
                }
            }
        }
    }

    /// With partitions: when the user now has more than
    /// `SESSION_MAX_PER_USER` live sessions across them, destroys the oldest
    /// (reason `evicted`), never `keep`. Best effort: two logins racing in
    /// different partitions may both see the limit exceeded and both evict,
    /// or briefly leave one session too many.
    async fn enforce_user_limit(&self, user_id: &str, keep: &SessionId) -> Result<Vec<SessionId>> {
        let max = self.config.max_per_user as usize;
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut live: Vec<(i64, SessionId)> = self
            .user_index(user_id)
            .await?
            .into_iter()
            .filter(|(_, _, json)| json.is_some())
            .map(|(id, created, _)| (created, id))
            .collect();
        if live.len() <= max {
            return Ok(Vec::new());
        }
        live.sort();
        let excess = live.len() - max;
        let mut evicted = Vec::new();
        for (_, id) in live.into_iter().filter(|(_, id)| id != keep) {
            if evicted.len() == excess {
                break;
            }
            if self.destroy(&id, DestroyReason::Evicted).await? {
                evicted.push(id);
            }
        }
        Ok(evicted)
    }

    /// A new token whose session id falls in partition `p`.
    fn token_in_partition(&self, p: u32) -> Token {
        loop {
            let token = Token::generate();
            if self.keys.partition_of(&token.session_id()) == p {
                return token;
            }
        }
    }

    /// The reaper's visit of an expiry index entry that has come due,
    /// scored `score` (ms, exactly as the index holds it): appends the
    /// `expired` event for a session past its deadline, unless it was
    /// touched since or another reaper already did. A session still live is
    /// filed again at the right time (after recording its version and user
    /// when its deadline is near, in the lean layout). Returns true when this
    /// call expired it. The event's deadline is the score's whole ms: the
    /// deadline itself, or up to 64 ms before it for an entry of the lean
    /// layout ([`SessionId::expiry_score`]).
    pub async fn expire(&self, id: &SessionId, score: f64) -> Result<bool> {
        self.shared.states.forget(id);
        let meta = Meta::now();
        let deadline_ms = score.floor() as i64;
        let deadline = Timestamp::from_millis(deadline_ms)
            .ok_or_else(|| Error::Corrupt(format!("deadline {deadline_ms} out of range")))?;
        let kind = EventKind::Expired { deadline };
        let event_id = Uuid::now_v7();
        let part = self.keys.for_session(id);
        let inv = script::Expire {
            id,
            score,
            tomb_ms: self.tomb_ms(),
            event_id,
            payload: &kind.payload_json(),
            stamp: meta.stamp(),
        }
        .invocation(part, self.shape());
        match script::run_retrying(&inv, &mut self.conn.clone()).await?.0 {
            Reply::Ok(xid, extra) => {
                self.appended(part);
                let seq = extra.first().and_then(|s| s.parse().ok()).unwrap_or(0);
                let user = extra.get(1).filter(|u| !u.is_empty()).cloned();
                let event = meta.event_with_id(event_id, id, seq, user, kind);
                self.sync(vec![streamed(xid, event)]).await?;
                Ok(true)
            }
            Reply::Look(json) => {
                // Near its deadline: record what `expired` will need.
                let s = super::parse_session(id, &json)?;
                let inv = script::Look {
                    id,
                    seq: s.version(),
                    user: &s.user_key().unwrap_or_default(),
                    tomb_ms: self.tomb_ms(),
                }
                .invocation(part, self.shape());
                match script::run_retrying(&inv, &mut self.conn.clone()).await?.0 {
                    Reply::Ok(..) | Reply::Skip => Ok(false),
                    other => Err(Error::Corrupt(format!("look: unexpected reply {other:?}"))),
                }
            }
            Reply::Skip | Reply::Gone => Ok(false),
            other => Err(Error::Corrupt(format!(
                "expire: unexpected reply {other:?}"
            ))),
        }
    }
}

/// `increment`'s change: the integer at `key` (absent is 0) plus `by`.
fn increment_value(key: &str, v: Option<&Value>, by: i64) -> Result<Option<Value>> {
    let now = match v {
        None => 0,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| Error::InvalidInput(format!("`{key}` holds {v}, not an integer")))?,
    };
    let next = now
        .checked_add(by)
        .ok_or_else(|| Error::InvalidInput(format!("`{key}` would overflow")))?;
    Ok(Some(Value::from(next)))
}
