//! The mutations: create, update, touch, switch_platform, rotate, destroy,
//! destroy_all_for_user, and the reaper's expire.
//!
//! Each one folds in Rust, runs the script once, and then (with
//! `DB_SESSION_SYNC`) commits the events it appended to the audit database.
//! When Redis cannot be reached and `DB_SESSION_FALLBACK` is on, the same
//! events are appended to the audit database instead, against the snapshot's
//! version.

use std::time::Duration;

use rand::Rng as _;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::SessionStore;
use super::script::{self, Reply};
use crate::audit::Incoming;
use crate::audit::sink::FallbackOutcome;
use crate::error::{Error, Result};
use crate::event::{DestroyReason, Event, EventKind, Platform, SCHEMA_VERSION};
use crate::id::{SessionId, Token};
use crate::keys::Keys;
use crate::session::{Changes, NewSession, RESERVED_KEYS, Session, user_id_of};
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
    pub session: Session,
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

    fn push(&self, inv: &mut redis::ScriptInvocation<'_>) {
        inv.arg(self.occurred_at.to_string())
            .arg(SCHEMA_VERSION)
            .arg(self.traceparent.as_deref().unwrap_or(""));
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

/// Where a write ended up.
enum Written {
    /// Redis took it; the stream id.
    Redis(String),
    /// The audit database took it (fallback).
    Database,
    /// The version moved on; the current state when the session still lives.
    Conflict(Option<Session>),
    /// No live session.
    Gone,
}

impl SessionStore {
    fn ttl_ms(&self) -> u64 {
        self.config.session_timeout.as_millis() as u64
    }

    fn tomb_ms(&self) -> u64 {
        self.config.tombstone_ttl.as_millis() as u64
    }

    fn checked_json(&self, session: &Session) -> Result<String> {
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
                status: status.as_str().to_owned(),
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
    async fn replicate(&self, part: &Keys) -> Result<()> {
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

    /// Runs a script invocation; when Redis is unreachable and the fallback is
    /// on, appends the events `fallback` builds (each with the version it was
    /// folded on) to the audit database instead. They are built only then.
    async fn run_or_fallback(
        &self,
        part: &Keys,
        inv: &redis::ScriptInvocation<'_>,
        fallback: impl FnOnce() -> Vec<(u64, Event)>,
    ) -> Result<std::result::Result<Reply, FallbackOutcome>> {
        match script::run(inv, &mut self.conn.clone()).await {
            Ok(r) => {
                if matches!(r, Reply::Ok(..)) {
                    self.replicate(part).await?;
                }
                self.project_pending().await;
                Ok(Ok(r))
            }
            Err(e) if e.is_unavailable() && self.fallback_enabled() => {
                let events = fallback();
                Ok(Err(self.fallback_append(&events).await?))
            }
            Err(e) => Err(e),
        }
    }

    /// Creates a session and returns its token, once. When the user already
    /// has `SESSION_MAX_PER_USER` sessions, the oldest is destroyed with
    /// reason `evicted` in the same atomic step.
    #[tracing::instrument(skip_all, fields(session_id), err)]
    pub async fn create(&self, new: NewSession) -> Result<Created> {
        let started = std::time::Instant::now();
        let result: Result<Created> = async { self.create_inner(new.fields, None).await }.await;
        crate::telemetry::record_operation("create", started, &result);
        result
    }

    async fn create_inner(
        &self,
        fields: Map<String, Value>,
        rotated_from: Option<(SessionId, Session, DestroyReason)>,
    ) -> Result<Created> {
        if let Some(k) = fields.keys().find(|k| RESERVED_KEYS.contains(&k.as_str())) {
            return Err(Error::InvalidInput(format!(
                "`{k}` is maintained by the store"
            )));
        }
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
                    rotated_from: rotated_from.as_ref().map(|r| r.0.clone()),
                },
            );
            let session = Session::default().apply(&created);
            let json = self.checked_json(&session)?;
            let spare_ids = ids(spare);
            let part = self.keys.for_session(&id);
            let mut inv;
            let mut ended_old = None;
            match &rotated_from {
                None => {
                    inv = script::invocation(part, "create");
                    inv.arg(id.as_str())
                        .arg(&json)
                        .arg(self.ttl_ms())
                        .arg(self.tomb_ms())
                        .arg(user.as_deref().unwrap_or(""))
                        .arg(script_limit)
                        .arg(created.event_id.to_string())
                        .arg(created.kind.payload_json());
                }
                Some((old, current, reason)) => {
                    inv = script::invocation(part, "rotate");
                    let end = meta.event(
                        old,
                        current.version() + 1,
                        current.user_id(),
                        EventKind::Destroyed { reason: *reason },
                    );
                    inv.arg(old.as_str())
                        .arg(current.version())
                        .arg(id.as_str())
                        .arg(&json)
                        .arg(self.ttl_ms())
                        .arg(self.tomb_ms())
                        .arg(user.as_deref().unwrap_or(""))
                        .arg(script_limit)
                        .arg(end.event_id.to_string())
                        .arg(end.kind.payload_json())
                        .arg(created.event_id.to_string())
                        .arg(created.kind.payload_json());
                    ended_old = Some((current.version(), end));
                }
            }
            meta.push(&mut inv);
            inv.arg(&spare_ids);
            match self
                .run_or_fallback(part, &inv, || {
                    let mut events: Vec<(u64, Event)> = ended_old.iter().cloned().collect();
                    events.push((0, created.clone()));
                    events
                })
                .await?
            {
                Ok(Reply::Ok(xid, extra)) => {
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
                    if partitioned && let Some(u) = user.as_deref() {
                        evicted.extend(Box::pin(self.enforce_user_limit(u, &id)).await?);
                    }
                    return Ok(Created {
                        token,
                        session_id: id,
                        session,
                        evicted,
                    });
                }
                Ok(Reply::NeedIds(n)) => spare = n,
                Ok(Reply::Exists) => continue,
                Ok(Reply::Conflict(_)) | Err(FallbackOutcome::Conflict(_)) => {
                    return Err(Error::Conflict {
                        session_id: rotated_from.map(|r| r.0).unwrap_or(id),
                        attempts: 1,
                    });
                }
                Err(FallbackOutcome::Written) => {
                    return Ok(Created {
                        token,
                        session_id: id,
                        session,
                        evicted: Vec::new(),
                    });
                }
                Ok(Reply::Missing | Reply::Ended(_)) => {
                    let old = rotated_from.map(|r| r.0).unwrap_or(id);
                    return Err(self.missing(&old).await);
                }
                Ok(other) => {
                    return Err(Error::Corrupt(format!(
                        "create: unexpected reply {other:?}"
                    )));
                }
            }
        }
    }

    /// One attempt at writing a folded event (Redis, or the database in
    /// fallback mode).
    async fn write_once(
        &self,
        id: &SessionId,
        current: &Session,
        next: &Session,
        event: &Event,
        meta: &Meta,
    ) -> Result<Written> {
        let json = self.checked_json(next)?;
        let part = self.keys.for_session(id);
        let mut inv = script::invocation(part, "write");
        inv.arg(id.as_str())
            .arg(current.version())
            .arg(&json)
            .arg(self.ttl_ms())
            .arg(self.tomb_ms())
            .arg(event.user_id.as_deref().unwrap_or(""))
            .arg(event.kind.type_name())
            .arg(event.event_id.to_string())
            .arg(event.kind.payload_json());
        meta.push(&mut inv);
        Ok(
            match self
                .run_or_fallback(part, &inv, || vec![(current.version(), event.clone())])
                .await?
            {
                Ok(Reply::Ok(xid, _)) => Written::Redis(xid),
                Ok(Reply::Conflict(Some(json))) => {
                    Written::Conflict(Some(super::parse_session(id, &json)?))
                }
                Ok(Reply::Conflict(None) | Reply::Missing | Reply::Ended(_)) => Written::Gone,
                Ok(other) => {
                    return Err(Error::Corrupt(format!("write: unexpected reply {other:?}")));
                }
                Err(FallbackOutcome::Written) => Written::Database,
                Err(FallbackOutcome::Conflict(state)) => match state {
                    Some(s) => Written::Conflict(Some(s)),
                    None => match self.fallback_get(id).await? {
                        Some(s) => Written::Conflict(Some(s)),
                        None => Written::Gone,
                    },
                },
            },
        )
    }

    /// The common loop of `update` and `switch_platform`: fold the change on
    /// the current state, write it if the version still matches, otherwise
    /// fold again on the state the script returned.
    async fn write(
        &self,
        id: &SessionId,
        mut current: Session,
        change: impl Fn(&Session) -> EventKind,
    ) -> Result<Session> {
        let attempts = self.config.max_retries.max(1);
        for attempt in 1..=attempts {
            let meta = Meta::now();
            let draft = meta.event(id, current.version() + 1, None, change(&current));
            let next = current.apply(&draft);
            let event = Event {
                user_id: next.user_id(),
                ..draft
            };
            match self.write_once(id, &current, &next, &event, &meta).await? {
                Written::Redis(xid) => {
                    self.sync(vec![streamed(xid, event)]).await?;
                    return Ok(next);
                }
                Written::Database => return Ok(next),
                Written::Conflict(Some(s)) => {
                    current = s;
                    let m = crate::telemetry::metrics();
                    m.conflicts.add(1, &[]);
                    m.retries.add(1, &[]);
                    Self::backoff(attempt).await;
                }
                Written::Conflict(None) | Written::Gone => {
                    return Err(self.missing(id).await);
                }
            }
        }
        Err(Error::Conflict {
            session_id: id.clone(),
            attempts,
        })
    }

    async fn current(&self, id: &SessionId) -> Result<Session> {
        match self.get(id).await? {
            Some(s) => Ok(s),
            None => Err(self.missing(id).await),
        }
    }

    /// Sets and removes application keys: one `updated` event. Keys the store
    /// maintains (`_version`, `_last_updated`, `created_at`,
    /// `last_activity`) are refused. Concurrent updates of different keys all
    /// survive.
    #[tracing::instrument(skip_all, fields(session_id = %id), err)]
    pub async fn update(&self, id: &SessionId, changes: Changes) -> Result<Session> {
        let started = std::time::Instant::now();
        let result = match self.current(id).await {
            Ok(current) => self.update_in(id, current, changes).await,
            Err(e) => Err(e),
        };
        crate::telemetry::record_operation("update", started, &result);
        result
    }

    /// Like [`SessionStore::update`], folding on a state the caller already
    /// read (a web request's session), which saves the `GET`. When the
    /// session moved on since, the script returns its current state and the
    /// change is folded again on top of it, as with `update`.
    #[tracing::instrument(skip_all, fields(session_id = %id), err)]
    pub async fn update_from(
        &self,
        id: &SessionId,
        current: Session,
        changes: Changes,
    ) -> Result<Session> {
        let started = std::time::Instant::now();
        let result = self.update_in(id, current, changes).await;
        crate::telemetry::record_operation("update", started, &result);
        result
    }

    async fn update_in(
        &self,
        id: &SessionId,
        current: Session,
        changes: Changes,
    ) -> Result<Session> {
        if let Some(k) = changes.reserved_key() {
            return Err(Error::InvalidInput(format!(
                "`{k}` is maintained by the store"
            )));
        }
        self.write(id, current, |_| EventKind::Updated {
            set: changes.set.clone(),
            unset: changes.unset.clone(),
        })
        .await
    }

    /// Appends a `touched` event now, refreshing `last_activity` and the TTL.
    #[tracing::instrument(skip_all, fields(session_id = %id), err)]
    pub async fn touch(&self, id: &SessionId) -> Result<Session> {
        let started = std::time::Instant::now();
        let result: Result<Session> = async {
            let current = self.current(id).await?;
            self.touch_at(id, current).await
        }
        .await;
        crate::telemetry::record_operation("touch", started, &result);
        result
    }

    /// Touch with one attempt: a conflict means another write just refreshed
    /// the session, which is all a touch wants.
    pub(super) async fn touch_at(&self, id: &SessionId, current: Session) -> Result<Session> {
        let meta = Meta::now();
        let kind = EventKind::Touched {
            last_activity: meta.occurred_at,
        };
        let event = meta.event(id, current.version() + 1, current.user_id(), kind);
        let next = current.apply(&event);
        match self.write_once(id, &current, &next, &event, &meta).await? {
            Written::Redis(xid) => {
                self.sync(vec![streamed(xid, event)]).await?;
                Ok(next)
            }
            Written::Database => Ok(next),
            Written::Conflict(_) => {
                crate::telemetry::metrics().conflicts.add(1, &[]);
                Err(Error::Conflict {
                    session_id: id.clone(),
                    attempts: 1,
                })
            }
            Written::Gone => Err(self.missing(id).await),
        }
    }

    /// Moves the session to another platform connection: one
    /// `platform_switched` event.
    #[tracing::instrument(skip_all, fields(session_id = %id), err)]
    pub async fn switch_platform(&self, id: &SessionId, platform: Platform) -> Result<Session> {
        let started = std::time::Instant::now();
        let result: Result<Session> = async {
            let current = self.current(id).await?;
            self.write(id, current, |_| {
                EventKind::PlatformSwitched(platform.clone())
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
                let mut fields = current.app_fields();
                for k in &changes.unset {
                    fields.remove(k);
                }
                for (k, v) in &changes.set {
                    fields.insert(k.clone(), v.clone());
                }
                match self
                    .create_inner(fields, Some((id.clone(), current, DestroyReason::Rotated)))
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
    #[tracing::instrument(skip_all, fields(session_id = %id, reason = reason.as_str()), err)]
    pub async fn destroy(&self, id: &SessionId, reason: DestroyReason) -> Result<bool> {
        let started = std::time::Instant::now();
        let result: Result<bool> = async {
            let attempts = self.config.max_retries.max(1);
            for attempt in 1..=attempts {
                let meta = Meta::now();
                let kind = EventKind::Destroyed { reason };
                let event_id = Uuid::now_v7();
                let part = self.keys.for_session(id);
                let mut inv = script::invocation(part, "end");
                inv.arg(id.as_str())
                    .arg(-1)
                    .arg("destroyed")
                    .arg("destroyed")
                    .arg(self.tomb_ms())
                    .arg(event_id.to_string())
                    .arg(kind.payload_json());
                meta.push(&mut inv);
                let reply = match script::run(&inv, &mut self.conn.clone()).await {
                    // In fallback mode the end is checked against the snapshot.
                    Err(e) if e.is_unavailable() && self.fallback_enabled() => {
                        let Some(current) = self.fallback_get(id).await? else {
                            return Ok(false);
                        };
                        let event = meta.event_with_id(
                            event_id,
                            id,
                            current.version() + 1,
                            current.user_id(),
                            kind,
                        );
                        match self.fallback_append(&[(current.version(), event)]).await? {
                            FallbackOutcome::Written => return Ok(true),
                            FallbackOutcome::Conflict(_) => {
                                Self::backoff(attempt).await;
                                continue;
                            }
                        }
                    }
                    other => other?,
                };
                self.project_pending().await;
                return match reply {
                    Reply::Ok(xid, extra) => {
                        self.replicate(part).await?;
                        let seq = extra.first().and_then(|s| s.parse().ok()).unwrap_or(0);
                        let user = extra.get(1).filter(|u| !u.is_empty()).cloned();
                        let event = meta.event_with_id(event_id, id, seq, user, kind);
                        self.sync(vec![streamed(xid, event)]).await?;
                        Ok(true)
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
    /// destroyed. Returns the ids that were ended. Within one partition this
    /// is one atomic step; with several partitions, each partition is one
    /// atomic step and they run in turn, so a session created in a partition
    /// already passed survives (as it would if it had been created just after
    /// the call).
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
            let mut ended = Vec::new();
            for part in self.keys.all() {
                match self.destroy_user_in(part, user_id, reason).await? {
                    Some(ids) => ended.extend(ids),
                    None => {
                        // Redis unreachable: best effort, one session at a
                        // time, from the snapshots.
                        let live = match &self.audit {
                            Some(a) => a.live_sessions_of(user_id).await?,
                            None => Vec::new(),
                        };
                        for sid in live.iter().filter_map(|s| s.parse::<SessionId>().ok()) {
                            if self.destroy(&sid, reason).await? {
                                ended.push(sid);
                            }
                        }
                        return Ok(ended);
                    }
                }
            }
            Ok(ended)
        }
        .await;
        crate::telemetry::record_operation("destroy_all_for_user", started, &result);
        result
    }

    /// Ends the user's sessions in one partition, atomically. `None` when
    /// Redis is unreachable and the fallback should take over.
    async fn destroy_user_in(
        &self,
        part: &Keys,
        user_id: &str,
        reason: DestroyReason,
    ) -> Result<Option<Vec<SessionId>>> {
        let mut spare = 4;
        loop {
            let meta = Meta::now();
            let spare_ids = ids(spare);
            let mut inv = script::invocation(part, "destroy_user");
            inv.arg(user_id)
                .arg(self.tomb_ms())
                .arg(EventKind::Destroyed { reason }.payload_json());
            meta.push(&mut inv);
            inv.arg(&spare_ids);
            let reply = match script::run(&inv, &mut self.conn.clone()).await {
                Err(e) if e.is_unavailable() && self.fallback_enabled() => return Ok(None),
                other => other?,
            };
            self.project_pending().await;
            match reply {
                Reply::Ok(_, entries) => {
                    self.replicate(part).await?;
                    let events = meta.composed(&entries, &spare_ids, Some(user_id), reason);
                    self.sync(events).await?;
                    return Ok(Some(first_ids(&entries)));
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

    /// Appends the `expired` event for a session whose deadline (`deadline_ms`,
    /// its score in the expiry index) has passed, unless it was touched since
    /// or another reaper already did. Returns true when this call expired it.
    pub async fn expire(&self, id: &SessionId, deadline_ms: i64) -> Result<bool> {
        let meta = Meta::now();
        let deadline = Timestamp::from_millis(deadline_ms)
            .ok_or_else(|| Error::Corrupt(format!("deadline {deadline_ms} out of range")))?;
        let kind = EventKind::Expired { deadline };
        let event_id = Uuid::now_v7();
        let mut inv = script::invocation(self.keys.for_session(id), "expire");
        inv.arg(id.as_str())
            .arg(deadline_ms)
            .arg(self.tomb_ms())
            .arg(event_id.to_string())
            .arg(kind.payload_json());
        meta.push(&mut inv);
        match script::run(&inv, &mut self.conn.clone()).await? {
            Reply::Ok(xid, extra) => {
                let seq = extra.first().and_then(|s| s.parse().ok()).unwrap_or(0);
                let user = extra.get(1).filter(|u| !u.is_empty()).cloned();
                let event = meta.event_with_id(event_id, id, seq, user, kind);
                self.sync(vec![streamed(xid, event)]).await?;
                Ok(true)
            }
            Reply::Skip | Reply::Gone => Ok(false),
            other => Err(Error::Corrupt(format!(
                "expire: unexpected reply {other:?}"
            ))),
        }
    }
}
