//! The store's side of the audit database: synchronous commits, the fallback
//! while Redis is unreachable, and the projection of what the fallback
//! staged once Redis answers again.
//!
//! - **`DB_SESSION_SYNC`.** After Redis took a mutation, its events are
//!   committed to the database before the call returns. When that commit
//!   fails the mutation still succeeded (it is in Redis, and the audit
//!   consumer records it from the stream): the failure is logged and counted,
//!   never returned, so an audit outage neither fails a read nor half-does a
//!   login.
//! - **`DB_SESSION_FALLBACK`.** While Redis is unreachable, reads and writes
//!   go to the database's view of the session ([`crate::audit::outbox`]):
//!   its snapshot folded forward with the events staged for it. The database
//!   stands in for Redis only when it is *current*, otherwise an end that
//!   only Redis knows could be undone and the store answers unavailable:
//!   where an audit consumer runs, when it had drained the stream just
//!   before it lost Redis ([`PartitionState::current_when_redis_left`]);
//!   where none has ever run, when `DB_SESSION_SYNC` committed every
//!   mutation as it was made.
//!   Ending a session and creating one need no such proof: neither can bring
//!   an ended session back.
//! - **Projection.** Staged events live in the database, not in this
//!   process: any store that sees Redis again after a failure (or after a
//!   pause longer than [`CATCH_UP_AFTER`]) and the worker's healer apply them
//!   through the mutation script, oldest first, then delete them.
//!
//! [`PartitionState::current_when_redis_left`]: crate::audit::partition::PartitionState::current_when_redis_left

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::Utc;
use redis::AsyncCommands as _;
use serde::Serialize;

use super::SessionStore;
use super::admit::admit;
use super::script::{self, Operation as _, Reply};
use crate::audit::entity::fallback_events;
use crate::audit::outbox::{self, Staged, View};
use crate::audit::partition::PartitionState;
use crate::audit::{Incoming, partition};
use crate::error::{Error, Result};
use crate::event::{DestroyReason, Event, EventKind};
use crate::id::SessionId;
use crate::keys::Keys;
use crate::session::{Record, Status};

/// A store that has not talked to Redis for this long checks the database
/// for staged events before it serves from Redis again: a pause may hide an
/// outage during which other app servers staged writes.
pub const CATCH_UP_AFTER: Duration = Duration::from_secs(1);

/// The least time between two catch-up attempts of one store while the
/// database cannot be read.
const CATCH_UP_RETRY: Duration = Duration::from_millis(250);

/// How many stream entries before its own a synchronous write that would
/// follow a gap looks through for the events it misses.
const JUST_BEFORE: usize = 256;

/// How long a reading of `partition_state` is trusted.
const TRUST_FOR: Duration = Duration::from_millis(250);

/// How often an app server that uses Redis looks for a partition the
/// database stands in for (see [`SessionStore::fence`]).
const FENCE_EVERY: Duration = Duration::from_millis(250);

/// How long that look waits for the database: one that does not answer by
/// then does not hold the operation up (the audit database failing fails no
/// Redis operation).
const FENCE_WAIT: Duration = Duration::from_millis(250);

/// The longest a mutation waits for its synchronous audit write: as long
/// as the audit database's pool waits for a connection. A database that
/// answers (even slowly, or after a lock wait) gets every event before the
/// mutation returns; one that does not costs each mutation this long, once.
pub(super) const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a synchronous audit write waits while the last one failed.
const SYNC_TIMEOUT_FAILING: Duration = Duration::from_millis(250);

/// Staged rows read per round of a projection.
const PROJECTION_PAGE: u64 = 500;

/// Stream entries read per `XRANGE` while a projection looks for staged
/// events in the stream.
const STREAM_PAGE: usize = 1000;

/// What a projection has read of a partition's stream while it looks for
/// the events it is about to apply: an unsure write's first attempt may
/// have appended one before its connection broke (or an earlier
/// projection, which could not delete its row). Every lookup reads what
/// was appended since the last one, to the stream's end, so each row is
/// checked against the stream as it is then; the span before is read once
/// per page of rows, not once per row (with a row each, a backlog of a
/// hundred staged writes read the same thousands of entries a hundred
/// times, and took twenty seconds to project).
struct StreamSeen {
    /// Where the reading starts: half a minute before the earliest row's
    /// `occurred_at` (the writer's clock; the margin covers clock skew and
    /// the command timeout).
    from_ms: i64,
    /// The last entry read.
    after: Option<String>,
    /// Entry ids by event id.
    ids: std::collections::HashMap<uuid::Uuid, String>,
}

impl StreamSeen {
    fn before(rows: &[fallback_events::Model]) -> Self {
        let earliest = rows
            .iter()
            .map(|r| r.occurred_at.timestamp_millis())
            .min()
            .unwrap_or(0);
        StreamSeen {
            from_ms: (earliest - 30_000).max(0),
            after: None,
            ids: std::collections::HashMap::new(),
        }
    }
}

/// What one projection of staged events did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProjectionSummary {
    /// Events applied to Redis (they reach the audit table through the stream).
    pub projected: u64,
    /// Events of sessions Redis no longer knows at all, written straight to
    /// the audit table after the session's end.
    pub logged_directly: u64,
    /// Events already applied or audited before (a repeated projection).
    pub already_applied: u64,
    /// Events left staged for a later round (their session is past its
    /// deadline in Redis and waits for the reaper, or Redis is behind).
    pub waiting: u64,
}

impl SessionStore {
    pub(super) fn fallback_enabled(&self) -> bool {
        self.config.db_fallback && self.audit.is_some()
    }

    pub(super) fn sync_enabled(&self) -> bool {
        self.config.db_sync && self.audit.is_some()
    }

    /// How long a call to the audit database on a request's path waits:
    /// less after the last one failed, so that a database that hangs does
    /// not hold every request for the full timeout.
    fn db_wait(&self) -> Duration {
        if self.shared.audit.sync_failing.load(Ordering::Acquire) {
            SYNC_TIMEOUT_FAILING
        } else {
            SYNC_TIMEOUT
        }
    }

    /// The event streams of this store's partitions.
    pub(super) fn streams(&self) -> Vec<&str> {
        self.keys.all().iter().map(|k| k.stream.as_str()).collect()
    }

    pub(super) fn db(&self) -> Result<&sea_orm::DatabaseConnection> {
        self.audit
            .as_ref()
            .map(|a| a.db())
            .ok_or_else(|| Error::InvalidInput("no audit database attached".to_owned()))
    }

    /// Remembers that Redis was unreachable: the next operation that reaches
    /// it first closes the database for writes and projects whatever the
    /// fallback staged meanwhile.
    pub(super) fn note_unavailable(&self) {
        self.shared.audit.suspect.store(true, Ordering::Release);
        if let Ok(mut r) = self.shared.audit.reopened.lock() {
            r.clear();
        }
        if let Ok(mut m) = self.shared.audit.mark_due.lock() {
            m.extend(self.keys.all().iter().map(|k| k.partition));
        }
    }

    /// Takes writes back from the database once Redis answers this store
    /// for `part` (a command on the partition's slot): marks the outage this
    /// store saw in Redis ([`partition::mark_outage`]), then closes the
    /// database for writes if an outage opened it (see
    /// [`partition::reached_redis`]). Unavailable when Redis does not answer.
    async fn reach(&self, part: &Keys) -> Result<()> {
        let due = self
            .shared
            .audit
            .mark_due
            .lock()
            .is_ok_and(|m| m.contains(&part.partition));
        let mut conn = self.conn.clone();
        let reached = if due {
            partition::mark_outage(&mut conn, &part.outage).await
        } else {
            conn.exists::<_, bool>(&part.epoch).await.map(|_| ())
        };
        if let Err(e) = reached {
            let e = Error::from(e);
            if e.is_unavailable() {
                self.note_unavailable();
            }
            return Err(e);
        }
        if due && let Ok(mut m) = self.shared.audit.mark_due.lock() {
            m.remove(&part.partition);
        }
        match partition::reached_redis(self.db()?, &part.stream).await {
            Ok(()) => {
                if let Ok(mut r) = self.shared.audit.reopened.lock() {
                    r.insert(part.partition);
                }
            }
            // Without the database nobody stages anything meanwhile.
            Err(e) => tracing::debug!(err = %e, "recording that redis answers failed"),
        }
        Ok(())
    }

    /// True when this store reported Redis reachable for partition `p` since
    /// it last found Redis unreachable.
    fn reopened(&self, p: u32) -> bool {
        self.shared
            .audit
            .reopened
            .lock()
            .is_ok_and(|r| r.contains(&p))
    }

    /// How long the database must have stood in for Redis (by the same
    /// opening) before this store stages a write or serves a read from it:
    /// longer than an app server that still reaches Redis takes to notice
    /// and close it ([`FENCE_EVERY`] and [`FENCE_WAIT`]) plus the longest
    /// command it may have sent before ([`Config::redis_timeout`]), plus a
    /// second. So no write is acknowledged by the database while another
    /// app server acknowledges writes from Redis.
    ///
    /// [`Config::redis_timeout`]: crate::Config::redis_timeout
    pub(super) fn open_after(&self) -> Duration {
        self.config.redis_timeout + FENCE_EVERY + FENCE_WAIT + Duration::from_secs(1)
    }

    /// Redis is unreachable from here: opens the database for `part` (see
    /// [`partition::open_for_writes`]) and waits until the opening has
    /// stood [`SessionStore::open_after`], measured on this process's clock
    /// from when it first saw that opening. The opening as stored, or `None`
    /// when Redis is back for another process (then nothing may go to the
    /// database: the caller answers with the Redis error).
    async fn await_open(&self, part: &Keys) -> Result<Option<chrono::DateTime<Utc>>> {
        let db = self.db()?;
        let settle = chrono::Duration::from_std(self.settle_window()).unwrap_or_default();
        let open_after = self.open_after();
        let give_up = Instant::now() + open_after * 2;
        loop {
            // An opening already there is read without a lock (the common
            // case during an outage: every request of every app server comes
            // here); only opening one takes the row's lock. A staging
            // transaction checks the opening again under the lock.
            let since = match partition::load(db, &part.stream).await? {
                Some(PartitionState {
                    redis_down_since: Some(since),
                    ..
                }) => Some(since),
                _ => {
                    let txn = crate::audit::db::begin(db).await?;
                    let since = partition::open_for_writes(&txn, &part.stream, settle).await?;
                    txn.commit().await?;
                    since
                }
            };
            let Some(since) = since else {
                if let Ok(mut seen) = self.shared.audit.opened.lock() {
                    seen.remove(&part.partition);
                }
                return Ok(None);
            };
            let Some(stood) = self.opening_stood(part.partition, since) else {
                return Ok(None);
            };
            if stood >= open_after {
                return Ok(Some(since));
            }
            if Instant::now() >= give_up {
                return Ok(None);
            }
            tokio::time::sleep(open_after - stood).await;
        }
    }

    /// How long ago this store first saw the opening `since` of partition
    /// `p` (now, when it is new).
    fn opening_stood(&self, p: u32, since: chrono::DateTime<Utc>) -> Option<Duration> {
        let mut seen = self.shared.audit.opened.lock().ok()?;
        let first = match seen.get(&p) {
            Some((s, at)) if *s == since => *at,
            _ => {
                let now = Instant::now();
                seen.insert(p, (since, now));
                now
            }
        };
        Some(first.elapsed())
    }

    /// Before an operation uses Redis, at most every [`FENCE_EVERY`]: true
    /// when the database stands in for Redis for any partition (a process
    /// found Redis unreachable). The caller then takes Redis back first
    /// (closing the database, projecting what was staged) before it serves
    /// or writes from Redis, as after an outage of its own. A database that
    /// does not answer within [`FENCE_WAIT`] counts as closed.
    async fn fence(&self, now_ms: u64) -> bool {
        let last = self.shared.audit.last_fence_ms.load(Ordering::Acquire);
        if last != 0 && now_ms.saturating_sub(last) < FENCE_EVERY.as_millis() as u64 {
            return false;
        }
        // One look per period, whichever operation comes first.
        if self
            .shared
            .audit
            .last_fence_ms
            .compare_exchange(last, now_ms.max(1), Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        let Ok(db) = self.db() else { return false };
        let streams = self.streams();
        match tokio::time::timeout(FENCE_WAIT, partition::any_open(db, &streams)).await {
            Ok(Ok(open)) => open,
            Ok(Err(e)) => {
                tracing::debug!(err = %e, "looking for a database that stands in for redis failed");
                false
            }
            Err(_) => {
                tracing::debug!("looking for a database that stands in for redis: no answer");
                false
            }
        }
    }

    /// Whether the database may stand in for Redis for partition `part`
    /// (read at most every [`TRUST_FOR`]).
    async fn database_current(&self, part: &Keys) -> bool {
        if let Ok(trust) = self.shared.audit.trust.lock()
            && let Some((at, ok)) = trust.get(&part.partition)
            && at.elapsed() < TRUST_FOR
        {
            return *ok;
        }
        let Ok(db) = self.db() else { return false };
        let ok = match partition::load(db, &part.stream).await {
            // An audit consumer runs (or ran): its progress decides.
            Ok(Some(state)) if state.drained_at.is_some() => {
                state.current_when_redis_left(Utc::now())
            }
            // No consumer has ever drained this stream: with
            // `DB_SESSION_SYNC` every acknowledged mutation was committed
            // before it returned (a failed commit is the documented limit);
            // without it the database may lack any of them.
            Ok(_) => self.config.db_sync,
            Err(e) => {
                tracing::debug!(err = %e, "reading partition_state failed");
                false
            }
        };
        if let Ok(mut trust) = self.shared.audit.trust.lock() {
            trust.insert(part.partition, (Instant::now(), ok));
        }
        ok
    }

    /// The database's view of a session (fallback mode; no proof of
    /// currency needed by itself).
    pub(super) async fn fallback_view(&self, id: &SessionId) -> Result<Option<View>> {
        let db = self.db()?;
        Box::pin(outbox::view(db, id.as_str(), self.config.session_timeout)).await
    }

    /// Redis unreachable: the session from the database's view, when the
    /// database is current; otherwise `redis_err`.
    pub(super) async fn fallback_get(
        &self,
        id: &SessionId,
        redis_err: Error,
    ) -> Result<Option<Record>> {
        let part = self.keys.for_session(id);
        if Box::pin(self.await_open(part)).await?.is_none() {
            tracing::info!(
                session_id = %id,
                "redis unreachable from here but reachable for others; not serving from the database"
            );
            return Err(redis_err);
        }
        if !Box::pin(self.database_current(part)).await {
            tracing::warn!(
                session_id = %id,
                "redis unreachable and the audit database may lag it; not serving from the database"
            );
            return Err(redis_err);
        }
        let view = self.fallback_view(id).await?;
        Ok(view.and_then(|v| admit(&v, Utc::now())))
    }

    /// Redis unreachable: stages `writes` (each with the version its
    /// session's view had) in the database. Writes that could revive an
    /// ended session (anything but a pure end or a new session) need a
    /// current database, else `redis_err`.
    pub(super) async fn fallback_stage(
        &self,
        part: &Keys,
        writes: &[(u64, Event)],
        redis_err: Error,
    ) -> Result<Staged> {
        let new =
            |expected: u64, e: &Event| expected == 0 && matches!(e.kind, EventKind::Created { .. });
        let harmless = writes
            .iter()
            .all(|(x, e)| matches!(e.kind, EventKind::Destroyed { .. }) || new(*x, e));
        let opened = if writes.iter().all(|(x, e)| new(*x, e)) {
            None
        } else {
            match Box::pin(self.await_open(part)).await? {
                Some(since) => Some(since),
                None => return Err(refused(redis_err)),
            }
        };
        if !harmless && !Box::pin(self.database_current(part)).await {
            return Err(redis_err);
        }
        let db = self.db()?;
        // A refused connection sent nothing; any other failure (a timeout,
        // a connection lost after sending) leaves open whether Redis applied
        // the attempt, which the projection then checks in the stream.
        let unsure = redis_err.may_have_applied();
        let out = Box::pin(outbox::stage(db, &part.stream, writes, unsure, opened)).await?;
        if out == Staged::Refused {
            return Err(refused(redis_err));
        }
        if out == Staged::Written {
            self.shared
                .audit
                .fallback_writes
                .fetch_add(writes.len() as u64, Ordering::Relaxed);
            crate::telemetry::metrics()
                .fallback_writes
                .add(writes.len() as u64, &[]);
            self.note_unavailable();
            tracing::warn!(
                events = writes.len(),
                "redis unreachable; staged in the audit database"
            );
        }
        Ok(out)
    }

    /// With `DB_SESSION_SYNC`: commits the events of a mutation that Redis
    /// accepted to the database before the mutation returns (the audit
    /// consumer later finds them there and skips them). A failure is logged
    /// and counted, not returned: the mutation succeeded, and the consumer
    /// records it from the stream. Events that would follow a gap in their
    /// session's trail (an earlier synchronous write failed, or has not
    /// committed yet) are committed with the missing ones when the stream's
    /// last entries hold them ([`crate::audit::AuditSink::write_in_order`]).
    ///
    /// The one error: [`Error::DataLost`], when Redis lost its data set
    /// after it applied the mutation and before the commit (the commit
    /// checks that the stream still holds the events' entries). The mutation
    /// is then gone from Redis and not recorded: it did not happen, and a
    /// session restored from the database meanwhile cannot have missed it.
    pub(super) async fn sync(&self, events: Vec<Incoming>) -> Result<()> {
        if !self.sync_enabled() || events.is_empty() {
            return Ok(());
        }
        Box::pin(self.sync_now(events)).await
    }

    async fn sync_now(&self, events: Vec<Incoming>) -> Result<()> {
        let Some(audit) = &self.audit else {
            return Ok(());
        };
        // One entry per stream: a data set is lost as a whole.
        let mut origins: Vec<crate::audit::StreamOrigin> = Vec::new();
        for i in &events {
            let stream = &self.keys.for_session(&i.event.session_id).stream;
            if !origins.iter().any(|o| o.stream() == stream)
                && let Some(o) =
                    crate::audit::StreamOrigin::of(self.conn.clone(), stream.clone(), i)
            {
                origins.push(o);
            }
        }
        // After a failure, wait less on the next attempts: a database that
        // hangs must not hold every mutation for the full timeout. Every
        // mutation still tries, so nothing acknowledged while the database
        // answers is missing from it.
        let limit = self.db_wait();
        let write = async {
            if let Some(out) = audit.write_in_order(&events, &origins).await? {
                return Ok(out);
            }
            // An earlier event of the session is not in the table yet: most
            // often a concurrent write of the same session whose own commit
            // is a moment behind, or one whose synchronous write failed a
            // moment ago. Its entry is then among the stream's last ones,
            // and committed with these it leaves no gap.
            let mut with = self.just_before(&events).await;
            if !with.is_empty() {
                with.extend(events.iter().cloned());
                if let Some(out) = audit.write_in_order(&with, &origins).await? {
                    return Ok(out);
                }
            }
            // Not found: committed after the gap all the same. The call is
            // acknowledged, so its event must be in the database (a loss of
            // Redis data before the consumer's turn would take it otherwise).
            audit.write_held(&events, &[], &origins).await
        };
        let failure = match tokio::time::timeout(limit, write).await {
            Ok(Ok(_)) => {
                self.shared
                    .audit
                    .sync_failing
                    .store(false, Ordering::Release);
                return Ok(());
            }
            Ok(Err(e @ Error::DataLost { .. })) => {
                tracing::warn!(err = %e, "redis lost the write before it was audited");
                return Err(e);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} ms", limit.as_millis()),
        };
        self.shared
            .audit
            .sync_failing
            .store(true, Ordering::Release);
        crate::telemetry::metrics()
            .audit_sync_failures
            .add(events.len() as u64, &[]);
        tracing::warn!(
            err = %failure,
            events = events.len(),
            "synchronous audit write failed; the audit consumer will record the events from the stream"
        );
        Ok(())
    }

    /// The events of `events`' sessions with a lower `seq` among the
    /// [`JUST_BEFORE`] stream entries before each event's own, oldest
    /// first (nothing when Redis does not answer).
    async fn just_before(&self, events: &[Incoming]) -> Vec<Incoming> {
        let mut found: Vec<Incoming> = Vec::new();
        for i in events {
            let Some(entry) = i.stream_id.as_deref() else {
                continue;
            };
            let stream = &self.keys.for_session(&i.event.session_id).stream;
            let page: redis::RedisResult<redis::streams::StreamRangeReply> = self
                .conn
                .clone()
                .xrevrange_count(stream, format!("({entry}"), "-", JUST_BEFORE)
                .await;
            let Ok(page) = page else { continue };
            for e in page.ids.iter().rev() {
                let Ok(earlier) = crate::audit::consumer::decode_incoming(e) else {
                    continue;
                };
                if earlier.event.session_id == i.event.session_id
                    && earlier.event.seq < i.event.seq
                    && !found
                        .iter()
                        .any(|f| f.event.event_id == earlier.event.event_id)
                {
                    found.push(earlier);
                }
            }
        }
        found.sort_by_key(|f| (f.event.session_id.to_string(), f.event.seq));
        found
    }

    /// Logout everywhere, the second half: ends the sessions of `user_id`
    /// that the audit database knows live and Redis did not end (`ended`):
    /// Redis is recovering, unreachable (`redis_down`), or lost an index
    /// entry. Without the database, what Redis ended is all that can be
    /// done now.
    pub(super) async fn end_sessions_known_to_audit(
        &self,
        user_id: &str,
        reason: DestroyReason,
        mut ended: Vec<SessionId>,
        redis_down: Option<Error>,
    ) -> Result<Vec<SessionId>> {
        let Some(audit) = &self.audit else {
            return Ok(ended);
        };
        let known = match outbox::sessions_of_user(audit.db(), user_id).await {
            Ok(k) => k,
            Err(e) if redis_down.is_none() => {
                tracing::warn!(err = %e, "logout everywhere: the audit database is unreachable; ended the sessions redis holds");
                return Ok(ended);
            }
            Err(e) => return Err(e),
        };
        for sid in known.iter().filter_map(|s| s.parse::<SessionId>().ok()) {
            if ended.contains(&sid) {
                continue;
            }
            if self.destroy(&sid, reason).await? {
                ended.push(sid);
            }
        }
        Ok(ended)
    }

    /// Called before every operation: when this store found Redis
    /// unreachable since, or has not talked to it for [`CATCH_UP_AFTER`],
    /// projects what any app server staged before serving from Redis again.
    /// The common case is two atomic loads.
    pub(super) async fn catch_up(&self) {
        if self.audit.is_none() {
            return;
        }
        let now = self.shared.audit.elapsed_ms();
        let last = self
            .shared
            .audit
            .last_contact_ms
            .swap(now, Ordering::AcqRel);
        let mut suspect = self.shared.audit.suspect.load(Ordering::Acquire);
        let first = !self.shared.audit.epochs_checked.load(Ordering::Acquire);
        // Another process may have found Redis unreachable and be about to
        // stage writes in the database: take Redis back first (close the
        // database) before serving or writing from it.
        if !suspect && !first && Box::pin(self.fence(now)).await {
            tracing::info!(
                "the audit database stands in for redis for another process; taking redis back first"
            );
            self.note_unavailable();
            suspect = true;
        }
        if !suspect && !first && now.saturating_sub(last) < CATCH_UP_AFTER.as_millis() as u64 {
            return;
        }
        Box::pin(self.catch_up_now(now)).await
    }

    async fn catch_up_now(&self, now: u64) {
        let last_try = self.shared.audit.last_catch_up_ms.load(Ordering::Acquire);
        if last_try != 0 && now.saturating_sub(last_try) < CATCH_UP_RETRY.as_millis() as u64 {
            return;
        }
        self.shared
            .audit
            .last_catch_up_ms
            .store(now.max(1), Ordering::Release);
        if !self.shared.audit.epochs_checked.load(Ordering::Acquire) {
            match self.establish_epochs().await {
                Ok(()) => self
                    .shared
                    .audit
                    .epochs_checked
                    .store(true, Ordering::Release),
                Err(e) => tracing::debug!(err = %e, "checking the redis epochs failed"),
            }
        }
        // Redis may be back after an outage this store did not see: close
        // the database for writes before anything here writes to Redis.
        for part in self.keys.all() {
            if let Err(e) = self.reach(part).await {
                tracing::debug!(err = %e, partition = part.partition, "redis does not answer yet");
            }
        }
        match self.project_staged().await {
            Ok(summary) => {
                if summary.waiting == 0 {
                    // Another app server may still stage a write it began
                    // while Redis was away: keep checking each session a
                    // while longer.
                    let grace = self.config.redis_timeout.as_millis() as u64 + 1000;
                    self.shared
                        .audit
                        .guard_until_ms
                        .store(self.shared.audit.elapsed_ms() + grace, Ordering::Release);
                    self.shared.audit.suspect.store(false, Ordering::Release);
                }
                if summary.projected + summary.logged_directly > 0 {
                    tracing::info!(
                        projected = summary.projected,
                        logged_directly = summary.logged_directly,
                        "writes staged during the redis outage are applied"
                    );
                }
            }
            Err(e) => {
                // Until a projection succeeds, each operation checks its
                // session (see `settle`).
                self.shared.audit.suspect.store(true, Ordering::Release);
                tracing::debug!(err = %e, "projecting staged writes failed; will retry");
            }
        }
    }

    /// Before an operation on `id` reaches Redis while this store may be
    /// behind on staged writes (it saw Redis fail and has not projected
    /// everything since, or did so a moment ago): projects the session's
    /// staged events first, so that no read serves and no write overwrites
    /// a state they have not reached yet. An error (unavailable) when they
    /// cannot be projected now; the caller then treats Redis as unreachable
    /// for this session. One database read per operation, only then.
    pub(super) async fn settle(&self, id: &SessionId) -> Result<()> {
        if self.audit.is_none() {
            return Ok(());
        }
        let now = self.shared.audit.elapsed_ms();
        if !self.shared.audit.suspect.load(Ordering::Acquire)
            && now >= self.shared.audit.guard_until_ms.load(Ordering::Acquire)
        {
            return Ok(());
        }
        Box::pin(self.settle_now(id)).await
    }

    /// How long after any process reached Redis again no app server stages
    /// writes of existing sessions in the database: long enough for every
    /// app server's connection to have failed or recovered (twice the
    /// command timeout, plus a second).
    pub(super) fn settle_window(&self) -> Duration {
        self.config.redis_timeout * 2 + Duration::from_secs(1)
    }

    async fn settle_now(&self, id: &SessionId) -> Result<()> {
        let db = self.db()?;
        let part = self.keys.for_session(id);
        if !self.reopened(part.partition) {
            self.reach(part).await?;
        }
        let limit = self.db_wait();
        let checked = match tokio::time::timeout(limit, outbox::has_session(db, id.as_str())).await
        {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
        };
        self.shared
            .audit
            .sync_failing
            .store(checked.is_err(), Ordering::Release);
        match checked {
            Ok(false) => Ok(()),
            // Without the database nothing can be projected, nor staged now;
            // but writes staged before may not be in Redis yet. Redis serves
            // only when it says it holds them: no outage marked since the
            // last projection, and the session not among those a projection
            // left waiting.
            Err(e) => {
                let behind = partition::may_lack_staged(
                    &mut self.conn.clone(),
                    &part.outage,
                    &part.staged,
                    id.as_str(),
                )
                .await?;
                if behind {
                    tracing::warn!(err = %e, session_id = %id, "the audit database cannot tell whether writes staged during a redis outage are applied; not serving from redis");
                    return Err(not_settled(id));
                }
                tracing::debug!(err = %e, "checking staged writes failed; redis holds every staged write");
                Ok(())
            }
            Ok(true) => match self.project_session(id).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(not_settled(id)),
                Err(e) if e.is_unavailable() => Err(e),
                Err(e) => {
                    tracing::warn!(err = %e, session_id = %id, "projecting a session's staged writes failed");
                    Err(not_settled(id))
                }
            },
        }
    }

    /// Applies every event staged in the database (by any process) to
    /// Redis, oldest first, and deletes it. Safe to run in several processes
    /// at once: each event is applied at most once.
    pub async fn project_staged(&self) -> Result<ProjectionSummary> {
        let mut summary = ProjectionSummary::default();
        let db = self.db()?.clone();
        // Read before the database: a mark set after this read (a later
        // outage) is not cleared by this projection.
        let mut marks = Vec::with_capacity(self.keys.all().len());
        for part in self.keys.all() {
            let mut conn = self.conn.clone();
            marks.push(partition::OutageMarks::read(&mut conn, &part.outage, &part.staged).await?);
        }
        let streams = self.streams();
        let any = outbox::has_pending(&db, &streams).await?;
        for (part, marks) in self.keys.all().iter().zip(&marks) {
            let blocked = if any {
                self.project_partition(&db, part, &mut summary).await?
            } else {
                BTreeSet::new()
            };
            marks
                .settle(&mut self.conn.clone(), &part.outage, &part.staged, &blocked)
                .await?;
        }
        crate::telemetry::metrics()
            .fallback_projected
            .add(summary.projected + summary.logged_directly, &[]);
        Ok(summary)
    }

    /// Projects every staged row of one partition, oldest first; returns
    /// the sessions whose rows wait. Each session's rows stay in order: one
    /// that waits holds back the session's later ones.
    async fn project_partition(
        &self,
        db: &sea_orm::DatabaseConnection,
        part: &Keys,
        summary: &mut ProjectionSummary,
    ) -> Result<BTreeSet<String>> {
        let mut blocked: BTreeSet<String> = BTreeSet::new();
        let mut after = 0i64;
        loop {
            let rows = outbox::pending(db, &part.stream, after, PROJECTION_PAGE).await?;
            let Some(last) = rows.last() else { break };
            after = last.id;
            let full = rows.len() as u64 >= PROJECTION_PAGE;
            let mut seen = StreamSeen::before(&rows);
            for row in rows {
                if blocked.contains(&row.session_id) {
                    summary.waiting += 1;
                    continue;
                }
                let projected = match self.project_row(db, &row, &mut seen).await {
                    Ok(p) => p,
                    Err(e) if e.is_unavailable() || matches!(e, Error::Database(_)) => {
                        return Err(e);
                    }
                    // One row's own trouble holds back its session only,
                    // not every other session's staged writes.
                    Err(e) => {
                        tracing::warn!(err = %e, session_id = %row.session_id, "projecting a staged write failed; it waits");
                        Projected::Waiting
                    }
                };
                let done = match &projected {
                    Projected::Waiting => false,
                    p => self.finish_row(db, row.id, p).await?,
                };
                match projected {
                    _ if !done => {
                        summary.waiting += 1;
                        blocked.insert(row.session_id.clone());
                    }
                    Projected::Applied(_) => summary.projected += 1,
                    Projected::Logged => summary.logged_directly += 1,
                    Projected::AlreadyThere(_) => summary.already_applied += 1,
                    Projected::Waiting => {}
                }
            }
            if !full {
                break;
            }
        }
        Ok(blocked)
    }

    /// Projects the staged events of one session (before a read or an end
    /// that needs them in Redis).
    pub(super) async fn project_session(&self, id: &SessionId) -> Result<bool> {
        let db = self.db()?.clone();
        let rows = {
            use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _, QueryOrder as _};
            fallback_events::Entity::find()
                .filter(fallback_events::Column::SessionId.eq(id.as_str()))
                .order_by_asc(fallback_events::Column::Id)
                .all(&db)
                .await?
        };
        let mut seen = StreamSeen::before(&rows);
        for row in rows {
            let projected = self.project_row(&db, &row, &mut seen).await?;
            if matches!(projected, Projected::Waiting)
                || !self.finish_row(&db, row.id, &projected).await?
            {
                return Ok(false);
            }
        }
        let part = self.keys.for_session(id);
        if let Err(e) =
            partition::applied_staged(&mut self.conn.clone(), &part.staged, id.as_str()).await
        {
            // The next projection forgets it.
            tracing::debug!(err = %e, "recording a session's staged writes applied failed");
        }
        Ok(true)
    }

    /// After a staged event reached Redis (or was found there): records it
    /// in the audit table, then deletes its row. Until the event is in the
    /// audit table the row is the write's durable copy, so a loss of Redis
    /// data right after the projection loses nothing (invariant 12). False
    /// when Redis lost the event before it was recorded: the row stays, and
    /// the next projection applies it on the restored session.
    async fn finish_row(
        &self,
        db: &sea_orm::DatabaseConnection,
        row: i64,
        projected: &Projected,
    ) -> Result<bool> {
        let reached = match projected {
            Projected::Applied(i) | Projected::AlreadyThere(Some(i)) => Some(i),
            _ => None,
        };
        if let (Some(i), Some(audit)) = (reached, &self.audit) {
            let stream = &self.keys.for_session(&i.event.session_id).stream;
            let origin = crate::audit::StreamOrigin::of(self.conn.clone(), stream.clone(), i);
            match audit
                .write_held(std::slice::from_ref(i), &[], origin.as_slice())
                .await
            {
                Ok(_) => {}
                Err(Error::DataLost { .. }) => {
                    tracing::warn!(session_id = %i.event.session_id, "redis lost a projected write before it was audited; projecting it again");
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
        outbox::remove(db, row).await?;
        Ok(true)
    }

    /// Applies one staged event to Redis (see [`ProjectionSummary`]).
    async fn project_row(
        &self,
        db: &sea_orm::DatabaseConnection,
        row: &fallback_events::Model,
        seen: &mut StreamSeen,
    ) -> Result<Projected> {
        if outbox::logged(db, row.event_id).await? {
            return Ok(Projected::AlreadyThere(None));
        }
        let staged = outbox::event_of(row)?;
        let id = staged.session_id.clone();
        let part = self.keys.for_session(&id);
        // Already in Redis: the attempt before the fallback was applied
        // after all (an `unsure` row), or an earlier projection applied it
        // and could not delete its row (the database failed right after),
        // and the audit consumer has not recorded it yet. Applying it again
        // would log it twice and, for a change of keys, set them back to
        // what they were when it was staged.
        if let Some(entry) = self.in_stream(part, seen, row.event_id).await? {
            // Recorded from the stream's own entry, with the seq Redis gave
            // it (an entry that does not decode is the consumer's to
            // dead-letter).
            let found = crate::audit::consumer::decode_incoming(&entry).ok();
            return Ok(Projected::AlreadyThere(found));
        }
        if outbox::logged(db, row.event_id).await? {
            return Ok(Projected::AlreadyThere(None));
        }
        let ends = matches!(
            staged.kind,
            EventKind::Destroyed { .. } | EventKind::Expired { .. }
        );
        for _ in 0..16 {
            let json: Option<String> = self.conn.clone().get(part.session(&id)).await?;
            let current = match json {
                Some(j) => Some(super::parse_session(&id, &j)?),
                None => None,
            };
            let base = match (&current, &staged.kind) {
                (Some(c), _) => c.clone(),
                (None, EventKind::Created { .. }) => Record::default(),
                (None, _) => {
                    // Redis lacks the session: bring its database state back
                    // first (under the one rule), or log the event after
                    // the end when the session has ended everywhere.
                    match self.restore_base(db, &id, &staged).await? {
                        Base::Restored => continue,
                        Base::EndedInRedis => Record::default().with_status(Status::Destroyed),
                        Base::Waiting(why) => return Ok(waiting(&id, why)),
                        Base::Gone => return self.log_after_end(db, &id, staged, ends).await,
                    }
                }
            };
            let event = Event {
                seq: base.version() + 1,
                ..staged.clone()
            };
            let next = base.apply(&event);
            let status_after = next.status();
            let json = if status_after == Status::Live {
                next.to_json()
            } else {
                String::new()
            };
            let user = next
                .user_key()
                .or_else(|| staged.user_id.clone())
                .unwrap_or_default();
            let inv = script::Apply {
                id: &id,
                // Folded on an end Redis held a moment ago: only that end
                // may take the event (after it); were the tombstone gone
                // meanwhile, a base of 0 would start the session over.
                base: if base.status() == Status::Live {
                    base.version()
                } else {
                    script::ENDED_BASE
                },
                json: &json,
                ttl_ms: self.config.session_timeout.as_millis() as u64,
                tomb_ms: self.config.tombstone_ttl.as_millis() as u64,
                user: &user,
                old_user: &base.user_key().unwrap_or_default(),
                kind: staged.kind.type_name(),
                status_after: status_after.as_str(),
                event_id: staged.event_id,
                payload: &staged.kind.payload_json(),
                stamp: script::Stamp {
                    occurred_at: staged.occurred_at,
                    schema: staged.schema,
                    traceparent: staged.traceparent.as_deref(),
                },
            }
            .invocation(part, self.shape());
            match script::run_retrying(&inv, &mut self.conn.clone()).await?.0 {
                Reply::Ok(xid, extra) => {
                    // Recorded as the stream holds it, which is what the
                    // audit consumer will deliver: the seq Redis gave it
                    // (after an end: the end's + 1), the ledger's user.
                    let entry: redis::RedisResult<redis::streams::StreamRangeReply> = self
                        .conn
                        .clone()
                        .xrange_count(&part.stream, &xid, &xid, 1)
                        .await;
                    let appended = entry.ok().and_then(|r| r.ids.into_iter().next());
                    let incoming =
                        match appended.map(|e| crate::audit::consumer::decode_incoming(&e)) {
                            Some(Ok(i)) => i,
                            _ => Incoming {
                                stream_id: Some(xid),
                                event: Event {
                                    seq: extra
                                        .first()
                                        .and_then(|s| s.parse().ok())
                                        .unwrap_or(event.seq),
                                    ..event
                                },
                            },
                        };
                    return Ok(Projected::Applied(incoming));
                }
                Reply::Applied => return Ok(Projected::AlreadyThere(None)),
                Reply::Conflict(_) => continue,
                Reply::Missing => {
                    return Ok(waiting(
                        &id,
                        "redis holds no live session (past its deadline)",
                    ));
                }
                other => {
                    return Err(Error::Corrupt(format!(
                        "projection: unexpected reply {other:?}"
                    )));
                }
            }
        }
        Ok(waiting(
            &id,
            "the session kept changing under the projection",
        ))
    }

    /// The entry of the partition's stream that holds `event_id`, if any
    /// (see [`StreamSeen`]). A rare path: only for staged events. An entry
    /// trimmed since was audited, which the caller checks after this.
    async fn in_stream(
        &self,
        part: &Keys,
        seen: &mut StreamSeen,
        event_id: uuid::Uuid,
    ) -> Result<Option<redis::streams::StreamId>> {
        let mut conn = self.conn.clone();
        loop {
            let start = match &seen.after {
                Some(last) => format!("({last}"),
                None => seen.from_ms.to_string(),
            };
            let page: redis::streams::StreamRangeReply = conn
                .xrange_count(&part.stream, &start, "+", STREAM_PAGE)
                .await?;
            let full = page.ids.len() == STREAM_PAGE;
            for e in page.ids {
                if let Some(id) = e
                    .get::<String>("event_id")
                    .and_then(|v| uuid::Uuid::parse_str(&v).ok())
                {
                    seen.ids.insert(id, e.id.clone());
                }
                seen.after = Some(e.id);
            }
            if !full {
                break;
            }
        }
        let Some(xid) = seen.ids.get(&event_id) else {
            return Ok(None);
        };
        let entry: redis::streams::StreamRangeReply =
            conn.xrange_count(&part.stream, xid, xid, 1).await?;
        Ok(entry.ids.into_iter().next())
    }

    /// Puts a session Redis lacks back from the database, for a staged event
    /// to be applied on top.
    async fn restore_base(
        &self,
        db: &sea_orm::DatabaseConnection,
        id: &SessionId,
        staged: &Event,
    ) -> Result<Base> {
        let snapshot = {
            use sea_orm::EntityTrait as _;
            crate::audit::entity::session_snapshots::Entity::find_by_id(id.as_str().to_owned())
                .one(db)
                .await?
        };
        let Some(snapshot) = snapshot else {
            // No snapshot: the session was created by a staged event that is
            // not projected yet (an earlier row), or never audited.
            return Ok(Base::Waiting("the session has no snapshot"));
        };
        let live = snapshot.status == crate::audit::entity::session_snapshots::SnapshotStatus::Live;
        if !live {
            let ledger: Option<String> = self.conn.clone().get(self.keys.ledger(id)).await?;
            return Ok(if ledger.is_some() {
                Base::EndedInRedis
            } else {
                Base::Gone
            });
        }
        // The staged write kept the session alive past its snapshot's
        // deadline: it was used then.
        let refreshed = staged.occurred_at.datetime()
            + chrono::Duration::from_std(self.config.session_timeout).unwrap_or_default();
        let deadline = snapshot.expires_at.map_or(refreshed, |d| d.max(refreshed));
        match self
            .restore_snapshot(
                id,
                &snapshot.state,
                snapshot.seq.max(0) as u64,
                snapshot.user_id.as_deref(),
                deadline,
                live,
            )
            .await?
        {
            Reply::Ok(..) | Reply::Current => Ok(Base::Restored),
            Reply::Ended(_) => Ok(Base::EndedInRedis),
            Reply::Newer | Reply::Expired => {
                let ledger: Option<String> = self.conn.clone().get(self.keys.ledger(id)).await?;
                Ok(if ledger.is_some() {
                    Base::Waiting("redis holds a newer or expired state of the session")
                } else {
                    Base::Gone
                })
            }
            other => Err(Error::Corrupt(format!(
                "restore: unexpected reply {other:?}"
            ))),
        }
    }

    /// Runs the `restore` operation for a session's database state: `live`
    /// false (an ended snapshot) is never restored and answers `Skip`.
    pub(crate) async fn restore_snapshot(
        &self,
        id: &SessionId,
        state: &str,
        seq: u64,
        user: Option<&str>,
        deadline: chrono::DateTime<Utc>,
        live: bool,
    ) -> Result<Reply> {
        if !live {
            return Ok(Reply::Skip);
        }
        let part = self.keys.for_session(id);
        let tomb_ms = self.config.tombstone_ttl.as_millis() as u64;
        let mut behind: Option<Record> = None;
        loop {
            let inv = script::Restore {
                id,
                state,
                seq,
                user: user.unwrap_or(""),
                deadline_ms: deadline.timestamp_millis(),
                tomb_ms,
                behind: behind.as_ref(),
            }
            .invocation(part, self.shape());
            let reply = script::run_retrying(&inv, &mut self.conn.clone()).await?.0;
            match reply {
                // Redis holds an older state: once more, naming its user.
                Reply::Behind(json) if behind.is_none() => {
                    behind = Some(super::parse_session(id, &json)?);
                }
                other => return Ok(other),
            }
        }
    }

    /// A staged event of a session Redis no longer knows at all (its
    /// tombstone is gone too), which ended in the database: the event is
    /// written straight to the audit table after the session's last event
    /// (an end is not written twice).
    async fn log_after_end(
        &self,
        db: &sea_orm::DatabaseConnection,
        id: &SessionId,
        staged: Event,
        ends: bool,
    ) -> Result<Projected> {
        let Some(view) = outbox::view(db, id.as_str(), self.config.session_timeout).await? else {
            return Ok(waiting(id, "the database has no view of the session"));
        };
        let ended = view.snapshot.as_ref().is_some_and(|s| {
            s.status != crate::audit::entity::session_snapshots::SnapshotStatus::Live
        });
        if !ended {
            // Live in the database but gone from Redis without a trace:
            // wait for the expiry sweep to end it.
            return Ok(waiting(
                id,
                "live in the database, gone from redis: the expiry sweep ends it",
            ));
        }
        if ends {
            return Ok(Projected::AlreadyThere(None));
        }
        let Some(audit) = &self.audit else {
            return Ok(waiting(id, "no audit database"));
        };
        let event = Event {
            seq: view.newest_logged + 1,
            ..staged
        };
        audit
            .write(
                &[Incoming {
                    stream_id: None,
                    event,
                }],
                &[],
            )
            .await?;
        Ok(Projected::Logged)
    }
}

/// Redis is back for other processes: a write staged now could diverge
/// from theirs. Not acknowledged; the client retries.
fn refused(redis_err: Error) -> Error {
    tracing::info!("redis unreachable from here but reachable for others; not staging");
    redis_err
}

/// The error of an operation whose session still has staged writes that
/// cannot be applied to Redis yet: Redis counts as unreachable for it.
fn not_settled(id: &SessionId) -> Error {
    tracing::debug!(session_id = %id, "staged writes of the session wait; using the database");
    Error::unavailable(
        "the session has writes staged during an outage that Redis does not have yet",
    )
}

/// A staged event left for a later round, and why (logged: a write that
/// waits long keeps its session on the database's view).
fn waiting(id: &SessionId, why: &'static str) -> Projected {
    tracing::info!(session_id = %id, why, "a staged write waits");
    Projected::Waiting
}

/// What became of one staged event.
enum Projected {
    /// Applied to Redis now: the event as appended to the stream.
    Applied(Incoming),
    /// Written straight to the audit table after the session's end.
    Logged,
    /// Applied before: the stream's entry when it still holds one (it may
    /// not be recorded yet), `None` when the audit table has it.
    AlreadyThere(Option<Incoming>),
    /// Left staged for a later round.
    Waiting,
}

/// Where the base of a projection stands after [`SessionStore::restore_base`].
enum Base {
    Restored,
    EndedInRedis,
    /// Not now, and why.
    Waiting(&'static str),
    Gone,
}
