//! Writing events into the audit database, exactly once in effect, and
//! never a snapshot that is not the fold of its events.
//!
//! [`AuditSink::write`] takes a batch of decoded events (and the dead letters
//! found while decoding it) and, in one transaction:
//!
//! 1. opens the transaction: bounds how long it may sit idle, and, for a
//!    worker that writes under a lease ([`AuditSink::write_fenced`]), checks
//!    that its fencing token is still current; a stale token writes nothing
//!    ([`Commit::Fenced`]);
//! 2. locks the snapshot row of every session of the batch (PostgreSQL; a
//!    placeholder row for a session without one), so that whoever folds a
//!    session (the consumer, another consumer, an app server writing
//!    synchronously) takes turns and reads what the previous one committed;
//!    SQLite has one writer at a time, and every transaction here starts
//!    with a write, which takes that lock;
//! 3. inserts the events, skipping rows already there. Only a true
//!    redelivery (the same `event_id` with the same content) is skipped
//!    silently; the same `event_id` with other content, or a
//!    `(session_id, seq)` already held by another event, becomes a dead
//!    letter whose reason names the id, and so does an `event_id` that
//!    appears twice in one batch with different content;
//! 4. folds each touched session forward with the one fold
//!    ([`Record::apply`]) from what the table holds: from its snapshot when
//!    the batch continues it, from the session's events otherwise (out of
//!    order, a gap filled, an unreadable snapshot row, which is rebuilt from
//!    the log rather than blamed on the incoming events); a fold stops at a
//!    gap and says so ([`BatchOutcome::gaps`]);
//! 5. inserts the dead letters, made storable on both backends (a NUL is
//!    written as `\u0000`, a reason is bounded).
//!
//! The caller acknowledges the stream entries only after this commits. A
//! failure is classified by its cause ([`cause_of`]): the caller isolates
//! the entry at fault, or retries the batch when the connection or the
//! server is at fault.
//!
//! On PostgreSQL, the statements are constant texts over binary arrays
//! (`INSERT … SELECT … FROM unnest(…)`), each request kept under 16 KiB on a
//! connection that may use TLS so that no part of it waits for a delayed ACK
//! (see `postgres` for why, and what the bound costs).
//! Step 3 first runs as a plain insert, the cheapest statement PostgreSQL has
//! for it; when that meets a unique violation the transaction is rolled back
//! and the batch written again with `ON CONFLICT DO NOTHING RETURNING
//! event_id`, and only the events that did not come back are looked up
//! again. After such a batch the next [`CAUTIOUS_BATCHES`] go straight to the
//! checked statement (a worker behind `DB_SESSION_SYNC` sees duplicates in
//! every batch). SQLite uses multi-row `INSERT`s chunked under its
//! bind-parameter limit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Alias, Expr, OnConflict, Query};
use sea_orm::{
    ActiveEnum as _, ColumnTrait as _, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    DbBackend, EntityTrait as _, ExprTrait as _, QueryFilter as _, QueryOrder as _,
    QuerySelect as _, Set,
};
use serde_json::{Map, Value};
use uuid::Uuid;

mod cause;
mod dead_letter_ops;
mod postgres;

pub use cause::{Cause, cause_of, cause_of_sqlite, cause_of_sqlstate, refusal};
pub use dead_letter_ops::{
    DeadLetterFilter, RetryOutcome, discard_dead_letters, list_dead_letters,
};
use postgres::Insert;

use super::entity::session_events::EventSource;
use super::entity::session_snapshots::SnapshotStatus;
use super::entity::{dead_letters, lease_fences, session_events, session_snapshots};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::id::SessionId;
use crate::lease::Fence;
use crate::session::{Record, Status};

/// Rows per multi-row insert: 12 columns × 1000 stays well under both
/// SQLite's 32766 and PostgreSQL's 65535 bind parameters.
const CHUNK: usize = 1000;

/// Batches written with the checked insert after a plain insert met a
/// duplicate, before the sink tries the plain one again.
pub const CAUTIOUS_BATCHES: u32 = 16;

/// How long a transaction of an unfenced writer (an app server writing
/// synchronously, the CLI) may sit idle on PostgreSQL before the server ends
/// it: a process stopped inside one must not hold its locks for ever. A
/// fenced writer uses its lease's TTL instead.
pub const TXN_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The least idle time a fenced transaction is allowed on PostgreSQL: the
/// client folds sessions between statements, which takes a while for large
/// ones on a loaded machine.
pub const FENCED_IDLE_FLOOR: Duration = Duration::from_secs(5);

/// How long a transaction of a worker whose lease runs out after `ttl` may
/// sit idle before PostgreSQL ends it: the lease's TTL, at least
/// [`FENCED_IDLE_FLOOR`]. Fencing does not depend on it (a stale token never
/// commits); it bounds how long a stopped worker's locks hold up its
/// successor.
pub(crate) fn fenced_idle_timeout(ttl: Duration) -> Duration {
    ttl.max(FENCED_IDLE_FLOOR)
}

/// The longest reason a dead letter keeps, in characters: the database's
/// message may quote the refused value.
pub const REASON_CHARS: usize = 2000;

pub use crate::event::Incoming;

/// A stream entry that will not become an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The stream it came from.
    pub stream: String,
    /// Its stream entry id.
    pub stream_id: String,
    /// The raw fields, as a JSON object of field → value.
    pub fields: String,
    /// Why it was set aside.
    pub reason: String,
    /// How often it was delivered.
    pub deliveries: i64,
}

impl DeadLetter {
    /// The session and `seq` the raw fields name, when they are valid ones:
    /// where the entry leaves a gap.
    pub(crate) fn session_and_seq(&self) -> (Option<String>, Option<i64>) {
        let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&self.fields) else {
            return (None, None);
        };
        let session = fields
            .get("session_id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<SessionId>().ok())
            .map(|s| s.as_str().to_owned());
        let seq = fields
            .get("seq")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<i64>().ok())
            .filter(|n| *n >= 1);
        (session, seq)
    }

    /// The same dead letter with every text storable on both backends: no
    /// NUL (PostgreSQL refuses it in text; it is written `\u0000`), and a
    /// reason of at most [`REASON_CHARS`].
    pub fn storable(&self) -> DeadLetter {
        DeadLetter {
            stream: storable_text(&self.stream),
            stream_id: storable_text(&self.stream_id),
            fields: storable_text(&self.fields),
            reason: storable_reason(&self.reason),
            deliveries: self.deliveries,
        }
    }

    /// The last resort when even the storable form is refused: the fields
    /// as one ASCII string (`escape_default`), and the refusal in the reason.
    pub fn escaped(&self, refused: &str) -> DeadLetter {
        let raw: String = self.fields.escape_default().collect();
        DeadLetter {
            stream: self.stream.escape_default().collect(),
            stream_id: self.stream_id.escape_default().collect(),
            fields: serde_json::json!({ "_escaped": raw }).to_string(),
            reason: storable_reason(&format!(
                "{} (stored escaped: {refused})",
                self.reason.escape_default()
            )),
            deliveries: self.deliveries,
        }
    }
}

/// `text` without NUL characters, which PostgreSQL cannot store in text:
/// each is written as the JSON escape `\u0000`.
pub(crate) fn storable_text(text: &str) -> String {
    text.replace('\0', "\\u0000")
}

fn storable_reason(text: &str) -> String {
    let text = storable_text(text);
    match text.char_indices().nth(REASON_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// What one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Events inserted now.
    pub inserted: u64,
    /// Events that were already there, with the same content (redelivered).
    pub duplicates: u64,
    /// Events refused because their `(session_id, seq)` was taken by another
    /// event, or their `event_id` by other content.
    pub seq_conflicts: u64,
    /// Snapshots moved forward (or rebuilt).
    pub snapshots: u64,
    /// Dead letters written (including the conflicts).
    pub dead_letters: u64,
    /// Sessions whose snapshot stops before their newest event in the table
    /// because an earlier `seq` is missing there (an entry still on its way,
    /// or a dead letter to retry).
    pub gaps: u64,
}

impl BatchOutcome {
    /// Adds `other` to these totals.
    pub fn add(&mut self, other: &BatchOutcome) {
        self.inserted += other.inserted;
        self.duplicates += other.duplicates;
        self.seq_conflicts += other.seq_conflicts;
        self.snapshots += other.snapshots;
        self.dead_letters += other.dead_letters;
        self.gaps += other.gaps;
    }
}

/// The result of a fenced write ([`AuditSink::write_fenced`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// Committed.
    Done(BatchOutcome),
    /// Nothing was written: another worker took the lease over and bumped
    /// the token (`current`, `None` when there is none any more).
    Fenced {
        /// The token the database holds.
        current: Option<i64>,
    },
}

/// Whether a write may leave a session's events with a gap in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Whatever the table then holds (the consumer writes what the stream
    /// holds, in its order).
    Any,
    /// Nothing, unless every session of the batch is then folded to its
    /// newest event ([`AuditSink::write_in_order`]).
    NoGap,
}

/// The write side of the audit database.
#[derive(Debug, Clone)]
pub struct AuditSink {
    db: DatabaseConnection,
    session_timeout: Duration,
    stream: String,
    /// The most bytes one PostgreSQL statement sends.
    request_bytes: usize,
    /// Batches left to write with the checked insert before trying a plain
    /// one again; shared by clones.
    cautious: Arc<AtomicU32>,
    /// How long an unfenced transaction may sit idle (PostgreSQL).
    txn_idle_timeout: Duration,
}

/// A snapshot row as loaded: the row, or why it cannot be read.
pub(crate) type Loaded = std::result::Result<session_snapshots::Model, String>;

impl AuditSink {
    /// A sink over an open, migrated database. `session_timeout` turns an
    /// event's time into the session's deadline (`expires_at`); `stream` names
    /// the stream in dead letters.
    pub fn new(
        db: DatabaseConnection,
        session_timeout: Duration,
        stream: impl Into<String>,
    ) -> Self {
        AuditSink {
            request_bytes: postgres::request_bytes(&db),
            db,
            session_timeout,
            stream: stream.into(),
            cautious: Arc::new(AtomicU32::new(0)),
            txn_idle_timeout: TXN_IDLE_TIMEOUT,
        }
    }

    /// How long an unfenced transaction may sit idle before PostgreSQL ends
    /// it ([`TXN_IDLE_TIMEOUT`] unless set).
    pub fn with_txn_idle_timeout(mut self, timeout: Duration) -> Self {
        self.txn_idle_timeout = timeout;
        self
    }

    /// The database.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The stream this sink names in the dead letters it makes.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The most bytes one PostgreSQL statement of the sink sends: 16 KiB on
    /// a connection that may use TLS, much more on one that cannot (see
    /// `postgres`).
    pub fn statement_bytes(&self) -> usize {
        self.request_bytes
    }

    /// Writes a batch in one transaction (see the module docs), unfenced: an
    /// app server writing synchronously, the CLI, tests.
    #[tracing::instrument(skip_all, fields(events = batch.len(), dead = dead.len()), err)]
    pub async fn write(&self, batch: &[Incoming], dead: &[DeadLetter]) -> Result<BatchOutcome> {
        self.write_held(batch, dead, &[]).await
    }

    /// Like [`AuditSink::write`], committing
    /// only while Redis still holds the stream entries the events came from
    /// (`from`, one entry per stream is enough): the check runs after the
    /// events are inserted, just before the commit. [`Error::DataLost`] when Redis lost them meanwhile (it
    /// lost its data set): nothing is written. With [`settle_writes`] run by
    /// whoever restores sessions from this database into Redis, no event of
    /// a lost data set is committed after a restore that could not see it.
    pub async fn write_held(
        &self,
        batch: &[Incoming],
        dead: &[DeadLetter],
        from: &[StreamOrigin],
    ) -> Result<BatchOutcome> {
        match self.write_as(None, batch, dead, from, Order::Any).await? {
            Some(Commit::Done(out)) => Ok(out),
            // Only a fenced write checks a token, and only an ordered one
            // writes nothing.
            Some(Commit::Fenced { .. }) | None => Ok(BatchOutcome::default()),
        }
    }

    /// Like [`AuditSink::write_held`], committing only when the table then
    /// holds each session of the batch without a gap before its newest
    /// event; `None` when it would not: nothing is written. A synchronous
    /// write (`DB_SESSION_SYNC`) that would follow a gap looks for the
    /// missing events first, so that it commits them with its own.
    pub async fn write_in_order(
        &self,
        batch: &[Incoming],
        from: &[StreamOrigin],
    ) -> Result<Option<BatchOutcome>> {
        Ok(
            match self.write_as(None, batch, &[], from, Order::NoGap).await? {
                Some(Commit::Done(out)) => Some(out),
                // Only a fenced write checks a token.
                Some(Commit::Fenced { .. }) => Some(BatchOutcome::default()),
                None => None,
            },
        )
    }

    /// Writes a batch in one transaction that commits only while `fence` is
    /// still the current token of its stream and role; otherwise writes
    /// nothing and returns [`Commit::Fenced`].
    #[tracing::instrument(skip_all, fields(events = batch.len(), dead = dead.len(), token = fence.token), err)]
    pub async fn write_fenced(
        &self,
        fence: &Fence,
        batch: &[Incoming],
        dead: &[DeadLetter],
    ) -> Result<Commit> {
        Ok(self
            .write_as(Some(fence), batch, dead, &[], Order::Any)
            .await?
            .unwrap_or(Commit::Done(BatchOutcome::default())))
    }

    /// [`AuditSink::write_fenced`] with the check of [`AuditSink::write_held`].
    pub async fn write_fenced_held(
        &self,
        fence: &Fence,
        batch: &[Incoming],
        dead: &[DeadLetter],
        from: &[StreamOrigin],
    ) -> Result<Commit> {
        Ok(self
            .write_as(Some(fence), batch, dead, from, Order::Any)
            .await?
            .unwrap_or(Commit::Done(BatchOutcome::default())))
    }

    async fn write_as(
        &self,
        fence: Option<&Fence>,
        batch: &[Incoming],
        dead: &[DeadLetter],
        from: &[StreamOrigin],
        order: Order,
    ) -> Result<Option<Commit>> {
        let held = async |txn: DatabaseTransaction, out: &BatchOutcome| -> Result<bool> {
            if order == Order::NoGap && out.gaps > 0 {
                txn.rollback().await?;
                return Ok(false);
            }
            for o in from {
                match o.held().await {
                    Ok(true) => {}
                    Ok(false) => {
                        txn.rollback().await?;
                        return Err(Error::DataLost {
                            stream_id: o.entry.clone(),
                        });
                    }
                    // Redis does not answer (an outage, a restart): a
                    // restore that comes after this insert waits for this
                    // transaction (`settle_writes`), and one before it would
                    // have needed Redis answering a moment ago. Committing
                    // keeps the write, which the fallback, serving from the
                    // database meanwhile, relies on.
                    Err(e) if e.is_unavailable() => {
                        tracing::debug!(err = %e, "redis does not answer the data-set check; committing");
                    }
                    Err(e) => {
                        txn.rollback().await?;
                        return Err(e);
                    }
                }
            }
            txn.commit().await?;
            Ok(true)
        };
        let (batch, mut refused) = self.dedup(batch);
        refused.extend_from_slice(dead);
        let recorded_at = Utc::now();
        if self.try_plain(&batch) {
            let txn = crate::audit::db::begin(&self.db).await?;
            if let Some(fenced) = self.open(&txn, fence).await? {
                txn.rollback().await?;
                return Ok(Some(fenced));
            }
            match self.write_plain(&txn, &batch, &refused, recorded_at).await {
                Ok(out) => {
                    let written = held(txn, &out).await?;
                    return Ok(written.then_some(Commit::Done(out)));
                }
                Err(e) if postgres::is_unique_violation(&e) => {
                    txn.rollback().await?;
                    self.cautious.store(CAUTIOUS_BATCHES, Ordering::Relaxed);
                    tracing::debug!("batch holds an event already stored; writing it checked");
                }
                Err(e) => return Err(e),
            }
        }
        let txn = crate::audit::db::begin(&self.db).await?;
        if let Some(fenced) = self.open(&txn, fence).await? {
            txn.rollback().await?;
            return Ok(Some(fenced));
        }
        let (mut out, conflicts) = self.write_checked(&txn, &batch, recorded_at).await?;
        refused.extend(conflicts);
        out.dead_letters = insert_dead_letters(&txn, &refused, recorded_at).await?;
        let written = held(txn, &out).await?;
        Ok(written.then_some(Commit::Done(out)))
    }

    /// Opens a transaction: on PostgreSQL bounds its idle time and reads the
    /// fencing token; on SQLite checks the token with a write, which also
    /// takes the database's write lock before anything is read. `Some` when
    /// the token is not `fence`'s any more.
    async fn open(
        &self,
        txn: &DatabaseTransaction,
        fence: Option<&Fence>,
    ) -> Result<Option<Commit>> {
        let stale = |current: Option<i64>| {
            let f = fence?;
            (current != Some(f.token)).then(|| {
                tracing::warn!(
                    stream = %f.stream,
                    token = f.token,
                    current = ?current,
                    "another worker took the lease over; nothing is committed"
                );
                Commit::Fenced { current }
            })
        };
        match txn.get_database_backend() {
            DbBackend::Postgres => {
                let idle = fence.map_or(self.txn_idle_timeout, |f| fenced_idle_timeout(f.ttl));
                let key = fence.map(|f| (f.stream.as_str(), f.role.as_str()));
                let current = postgres::open(txn, idle.as_millis(), key).await?;
                Ok(stale(current))
            }
            _ => {
                let Some(f) = fence else {
                    return Ok(None);
                };
                use lease_fences::Column as C;
                let mut check = Query::update();
                check
                    .table(lease_fences::Entity)
                    .value(C::Token, Expr::col(C::Token))
                    .and_where(Expr::col(C::Stream).eq(f.stream.as_str()))
                    .and_where(Expr::col(C::Role).eq(f.role.as_str()))
                    .and_where(Expr::col(C::Token).eq(f.token));
                if txn.execute(&check).await?.rows_affected() == 1 {
                    return Ok(None);
                }
                let current = lease_fences::Entity::find_by_id((
                    f.stream.clone(),
                    f.role.as_str().to_owned(),
                ))
                .one(txn)
                .await?
                .map(|m| m.token);
                Ok(stale(current))
            }
        }
    }

    /// The batch without repeated event ids: the same event twice is one
    /// row; the same id with other content is a dead letter (the first in
    /// stream order is kept).
    fn dedup<'a>(&self, batch: &'a [Incoming]) -> (Vec<&'a Incoming>, Vec<DeadLetter>) {
        let mut first: HashMap<Uuid, &Incoming> = HashMap::with_capacity(batch.len());
        let mut kept = Vec::with_capacity(batch.len());
        let mut refused = Vec::new();
        for i in batch {
            match first.get(&i.event.event_id) {
                None => {
                    first.insert(i.event.event_id, i);
                    kept.push(i);
                }
                Some(prev) if prev.event == i.event => {}
                Some(prev) => refused.push(self.conflict(
                    i,
                    format!(
                        "event_id {} appears twice in one batch with different content \
                         (kept: session {}, seq {}, {})",
                        i.event.event_id,
                        prev.event.session_id,
                        prev.event.seq,
                        prev.event.kind.type_name()
                    ),
                )),
            }
        }
        (kept, refused)
    }

    /// A dead letter for an event refused in favour of another one.
    fn conflict(&self, i: &Incoming, reason: String) -> DeadLetter {
        DeadLetter {
            stream: self.stream.clone(),
            stream_id: i
                .stream_id
                .clone()
                .unwrap_or_else(|| format!("fallback-{}", i.event.event_id)),
            fields: fields_json(&i.event),
            reason,
            deliveries: 1,
        }
    }

    /// Whether to try `batch` with a plain insert first (see the module docs).
    fn try_plain(&self, batch: &[&Incoming]) -> bool {
        if batch.is_empty() || self.db.get_database_backend() != DbBackend::Postgres {
            return false;
        }
        self.cautious
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_err()
    }

    /// Writes `batch` (distinct event ids) skipping rows already taken:
    /// redeliveries of the same content count as duplicates; other content
    /// under a stored id and seq conflicts are returned as dead letters.
    async fn write_checked(
        &self,
        txn: &DatabaseTransaction,
        batch: &[&Incoming],
        recorded_at: DateTime<Utc>,
    ) -> Result<(BatchOutcome, Vec<DeadLetter>)> {
        let mut out = BatchOutcome::default();
        let by_session = by_session(batch);
        let ids: Vec<&str> = by_session.keys().copied().collect();
        let placeholders = self.lock_sessions(txn, &ids).await?;
        // The rows each event id holds after the insert, for the events
        // that may not have gone in.
        let (inserted, stored) = if txn.get_database_backend() == DbBackend::Postgres {
            let bound = self.request_bytes;
            let statements = postgres::event_statements(batch, recorded_at, bound, Insert::Checked);
            let inserted = postgres::insert_checked(txn, statements).await?;
            let skipped: Vec<Uuid> = batch
                .iter()
                .map(|i| i.event.event_id)
                .filter(|id| !inserted.contains(id))
                .collect();
            out.inserted = inserted.len() as u64;
            let stored = postgres::stored_events(txn, &skipped, bound).await?;
            (Some(inserted), stored)
        } else {
            for chunk in batch.chunks(CHUNK) {
                let rows = chunk.iter().map(|i| event_row(i, recorded_at));
                out.inserted += session_events::Entity::insert_many(rows)
                    .on_conflict(OnConflict::new().do_nothing().to_owned())
                    .exec_without_returning(txn)
                    .await?;
            }
            let all: Vec<Uuid> = batch.iter().map(|i| i.event.event_id).collect();
            (None, stored_events(txn, &all).await?)
        };
        let mut refused = Vec::new();
        let mut accepted: Vec<&Incoming> = Vec::with_capacity(batch.len());
        for &i in batch {
            let id = i.event.event_id;
            if inserted.as_ref().is_some_and(|ins| ins.contains(&id)) {
                accepted.push(i);
                continue;
            }
            match stored.get(&id) {
                Some(row) if same_event(row, &i.event) => accepted.push(i),
                Some(row) => {
                    out.seq_conflicts += 1;
                    refused.push(self.conflict(
                        i,
                        format!(
                            "event_id {id} is already stored with other content (session {}, \
                             seq {}, {}); only a redelivery of the same event may reuse it",
                            row.session_id, row.seq, row.event_type
                        ),
                    ));
                }
                None => {
                    out.seq_conflicts += 1;
                    refused.push(self.conflict(
                        i,
                        format!(
                            "seq {} of session {} is already held by another event \
                             (event_id {id} refused)",
                            i.event.seq, i.event.session_id
                        ),
                    ));
                }
            }
        }
        out.duplicates = (accepted.len() as u64).saturating_sub(out.inserted);
        // Every placeholder not replaced goes, those of sessions whose
        // events were all refused included.
        let (snapshots, gaps) = self.advance_locked(txn, &accepted, &placeholders).await?;
        out.snapshots = snapshots;
        out.gaps = gaps;
        Ok((out, refused))
    }

    /// The plain-insert path on PostgreSQL (see the module docs). Every event
    /// of `batch` goes in or the statement fails, so the newest `seq` of each
    /// session after the insert is known before it runs: the snapshots are
    /// locked and read first, and the fold runs while PostgreSQL inserts the
    /// events.
    async fn write_plain(
        &self,
        txn: &DatabaseTransaction,
        batch: &[&Incoming],
        dead: &[DeadLetter],
        recorded_at: DateTime<Utc>,
    ) -> Result<BatchOutcome> {
        let bound = self.request_bytes;
        let by_session = by_session(batch);
        let ids: Vec<&str> = by_session.keys().copied().collect();
        let placeholders = self.lock_sessions(txn, &ids).await?;
        // The insert's arrays are built while the snapshots are read.
        let (loaded, statements) = tokio::join!(postgres::load_sessions(txn, &ids, bound), async {
            postgres::event_statements(batch, recorded_at, bound, Insert::Plain)
        });
        let (snapshots, mut newest) = loaded?;
        for i in batch {
            let n = newest.entry(i.event.session_id.to_string()).or_insert(0);
            *n = Ord::max(*n, i.event.seq as i64);
        }
        let now = Utc::now();
        let (inserted, planned) = tokio::join!(postgres::insert_plain(txn, statements), async {
            self.plan_snapshots(by_session, &snapshots, &newest, now)
        });
        let inserted = inserted?;
        let (snapshots, gaps) = self
            .finish_snapshots(txn, planned, &placeholders, now)
            .await?;
        Ok(BatchOutcome {
            inserted,
            duplicates: 0,
            seq_conflicts: 0,
            snapshots,
            dead_letters: insert_dead_letters(txn, dead, recorded_at).await?,
            gaps,
        })
    }

    /// Locks the snapshot rows of `ids` (sorted) for this transaction
    /// (PostgreSQL; see the module docs). Returns the sessions that got a
    /// placeholder row, which must be replaced or deleted before the commit.
    async fn lock_sessions(
        &self,
        txn: &DatabaseTransaction,
        ids: &[&str],
    ) -> Result<HashSet<String>> {
        if ids.is_empty() || txn.get_database_backend() != DbBackend::Postgres {
            return Ok(HashSet::new());
        }
        postgres::lock_sessions(txn, ids, Utc::now(), self.request_bytes).await
    }

    async fn delete_placeholders(&self, txn: &DatabaseTransaction, ids: &[String]) -> Result<()> {
        if ids.is_empty() || txn.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        postgres::delete_snapshots(txn, ids, postgres::PLACEHOLDER_SEQ, self.request_bytes).await
    }

    /// Folds every session of the batch forward, its snapshot row locked:
    /// returns the snapshots written and the sessions held at a gap.
    async fn advance_locked(
        &self,
        txn: &DatabaseTransaction,
        batch: &[&Incoming],
        placeholders: &HashSet<String>,
    ) -> Result<(u64, u64)> {
        let by_session = by_session(batch);
        let ids: Vec<&str> = by_session.keys().copied().collect();
        // The newest seq each session has in the table now (this batch
        // included): a batch that is contiguous but not the newest (an older
        // entry claimed late, a synchronous write racing the consumer) must
        // still fold up to it.
        let (snapshots, newest) = self.load(txn, &ids).await?;
        let now = Utc::now();
        let planned = self.plan_snapshots(by_session, &snapshots, &newest, now);
        self.finish_snapshots(txn, planned, placeholders, now).await
    }

    /// Each session's snapshot (or why its row cannot be read) and the
    /// newest `seq` the table holds for it.
    async fn load(
        &self,
        txn: &DatabaseTransaction,
        ids: &[&str],
    ) -> Result<(HashMap<String, Loaded>, HashMap<String, i64>)> {
        if txn.get_database_backend() == DbBackend::Postgres {
            return postgres::load_sessions(txn, ids, self.request_bytes).await;
        }
        use session_snapshots::Column as C;
        type Row = (
            String,
            Option<String>,
            String,
            i64,
            String,
            Option<DateTime<Utc>>,
            DateTime<Utc>,
        );
        let mut snapshots: HashMap<String, Loaded> = HashMap::new();
        for chunk in ids.chunks(CHUNK) {
            let rows: Vec<Row> = session_snapshots::Entity::find()
                .select_only()
                .columns([
                    C::SessionId,
                    C::UserId,
                    C::State,
                    C::Seq,
                    C::Status,
                    C::ExpiresAt,
                    C::UpdatedAt,
                ])
                .filter(C::SessionId.is_in(chunk.iter().copied()))
                .into_tuple()
                .all(txn)
                .await?;
            for (session_id, user_id, state, seq, status, expires_at, updated_at) in rows {
                let loaded = match SnapshotStatus::try_from_value(&status) {
                    Ok(status) => Ok(session_snapshots::Model {
                        session_id: session_id.clone(),
                        user_id,
                        state,
                        seq,
                        status,
                        expires_at,
                        updated_at,
                    }),
                    Err(e) => Err(format!("status {status:?}: {e}")),
                };
                snapshots.insert(session_id, loaded);
            }
        }
        let mut newest: HashMap<String, i64> = HashMap::new();
        for chunk in ids.chunks(CHUNK) {
            let rows: Vec<(String, Option<i64>)> = session_events::Entity::find()
                .select_only()
                .column(session_events::Column::SessionId)
                .column_as(session_events::Column::Seq.max(), "max_seq")
                .filter(session_events::Column::SessionId.is_in(chunk.iter().copied()))
                .group_by(session_events::Column::SessionId)
                .into_tuple()
                .all(txn)
                .await?;
            newest.extend(rows.into_iter().filter_map(|(s, m)| Some((s, m?))));
        }
        Ok((snapshots, newest))
    }

    /// Adds the sessions folded from the table to the planned upserts,
    /// replaces unreadable snapshot rows, writes them all and deletes the
    /// placeholders nothing replaced. Returns how many snapshots were written
    /// and how many sessions are held at a gap.
    async fn finish_snapshots(
        &self,
        txn: &DatabaseTransaction,
        planned: Plan<'_>,
        placeholders: &HashSet<String>,
        now: DateTime<Utc>,
    ) -> Result<(u64, u64)> {
        let Plan {
            mut upserts,
            behind,
        } = planned;
        let mut repairs = Vec::new();
        let mut gaps = 0;
        for b in behind {
            let run = self.history_after(txn, b.sid, b.from).await?;
            let (model, gap) = self.fold_run(b.sid, b.state, &run, now);
            gaps += u64::from(gap);
            if let Some(m) = model {
                if b.repair {
                    repairs.push(m.session_id.clone());
                }
                upserts.push(m);
            }
        }
        let written: HashSet<&str> = upserts.iter().map(|m| m.session_id.as_str()).collect();
        let leftover: Vec<String> = placeholders
            .iter()
            .filter(|s| !written.contains(s.as_str()))
            .cloned()
            .collect();
        let n = upserts.len() as u64;
        if txn.get_database_backend() == DbBackend::Postgres {
            if !repairs.is_empty() {
                postgres::delete_snapshots(txn, &repairs, i64::MAX, self.request_bytes).await?;
            }
            postgres::upsert_snapshots(txn, &upserts, now, self.request_bytes).await?;
            self.delete_placeholders(txn, &leftover).await?;
            return Ok((n, gaps));
        }
        for chunk in repairs.chunks(CHUNK) {
            session_snapshots::Entity::delete_many()
                .filter(session_snapshots::Column::SessionId.is_in(chunk.iter().cloned()))
                .exec(txn)
                .await?;
        }
        for chunk in upserts.chunks(CHUNK) {
            use session_snapshots::Column as C;
            let on_conflict = OnConflict::column(C::SessionId)
                .update_columns([
                    C::UserId,
                    C::State,
                    C::Seq,
                    C::Status,
                    C::ExpiresAt,
                    C::UpdatedAt,
                ])
                .action_and_where(
                    Expr::col((session_snapshots::Entity, C::Seq))
                        .lt(Expr::col((Alias::new("excluded"), C::Seq))),
                )
                .to_owned();
            let rows = chunk.iter().map(|m| session_snapshots::ActiveModel {
                session_id: Set(m.session_id.clone()),
                user_id: Set(m.user_id.clone()),
                state: Set(m.state.clone()),
                seq: Set(m.seq),
                status: Set(m.status),
                expires_at: Set(m.expires_at),
                updated_at: Set(m.updated_at),
            });
            session_snapshots::Entity::insert_many(rows)
                .on_conflict(on_conflict)
                .exec_without_returning(txn)
                .await?;
        }
        Ok((n, gaps))
    }

    /// Folds the sessions whose new events continue their snapshot and are
    /// the newest the table holds; the others (out of order, newer events
    /// already committed, an unreadable snapshot) are left to be folded from
    /// the table.
    fn plan_snapshots<'a>(
        &self,
        by_session: BTreeMap<&'a str, Vec<&'a Incoming>>,
        snapshots: &HashMap<String, Loaded>,
        newest: &HashMap<String, i64>,
        now: DateTime<Utc>,
    ) -> Plan<'a> {
        let mut upserts = Vec::with_capacity(by_session.len());
        let mut behind = Vec::new();
        for (sid, mut events) in by_session {
            events.sort_by_key(|i| i.event.seq);
            let (state, from) = match snapshots.get(sid).map(readable) {
                Some(Ok(s)) => s,
                Some(Err(why)) => {
                    // The log is the truth: rebuild the snapshot from it.
                    tracing::warn!(
                        session_id = sid,
                        why = %why,
                        "the snapshot cannot be read; rebuilding it from the session's events"
                    );
                    behind.push(Behind {
                        sid,
                        state: Record::default(),
                        from: 0,
                        repair: true,
                    });
                    continue;
                }
                None => (Record::default(), 0),
            };
            let pending: Vec<&Incoming> =
                events.into_iter().filter(|i| i.event.seq > from).collect();
            let table_newest = newest.get(sid).copied().unwrap_or(0) as u64;
            if pending.is_empty() && table_newest <= from {
                continue;
            }
            let contiguous = pending
                .iter()
                .enumerate()
                .all(|(k, i)| i.event.seq == from + 1 + k as u64);
            let batch_newest = pending.last().map_or(from, |i| i.event.seq);
            if contiguous && batch_newest == table_newest {
                upserts.extend(self.fold_run(sid, state, pending, now).0);
            } else {
                behind.push(Behind {
                    sid,
                    state,
                    from,
                    repair: false,
                });
            }
        }
        Plan { upserts, behind }
    }

    /// Folds `run` (oldest first) onto `state` up to the first gap; the new
    /// snapshot (`None` when nothing applied), and whether a gap stopped it
    /// before the end of `run`.
    fn fold_run<'a>(
        &self,
        sid: &str,
        mut state: Record,
        run: impl IntoIterator<Item = &'a Incoming>,
        now: DateTime<Utc>,
    ) -> (Option<session_snapshots::Model>, bool) {
        let mut last: Option<&Incoming> = None;
        let mut deadline_from: Option<&Incoming> = None;
        let mut gap = false;
        for i in run {
            if i.event.seq <= state.version() {
                continue;
            }
            if i.event.seq != state.version() + 1 {
                tracing::info!(
                    session_id = sid,
                    at = state.version(),
                    next = i.event.seq,
                    "the snapshot stops at a gap: seq {} is not in the table (yet)",
                    state.version() + 1
                );
                gap = true;
                break;
            }
            state.apply_mut(&i.event);
            if state.status() == Status::Live {
                deadline_from = Some(i);
            }
            last = Some(i);
        }
        let Some(last) = last else {
            return (None, gap);
        };
        let expires_at = match (state.status(), deadline_from) {
            (Status::Live, Some(i)) => Some(self.deadline(i)),
            _ => None,
        };
        let model = session_snapshots::Model {
            session_id: sid.to_owned(),
            user_id: state.user_key().or_else(|| last.event.user_id.clone()),
            state: state.to_json(),
            seq: state.version() as i64,
            status: snapshot_status(state.status()),
            expires_at,
            updated_at: now,
        };
        (Some(model), gap)
    }

    /// The session's events after `after` in `seq` order, as the table holds
    /// them (this transaction's included), up to the first row that cannot
    /// be read: the fold stops there, and the row is named in the log.
    async fn history_after(
        &self,
        txn: &DatabaseTransaction,
        session_id: &str,
        after: u64,
    ) -> Result<Vec<Incoming>> {
        let rows = session_events::Entity::find()
            .filter(session_events::Column::SessionId.eq(session_id))
            .filter(session_events::Column::Seq.gt(after as i64))
            .order_by_asc(session_events::Column::Seq)
            .all(txn)
            .await?;
        let mut run = Vec::with_capacity(rows.len());
        for r in &rows {
            match incoming_from_row(r) {
                Ok(i) => run.push(i),
                Err(e) => {
                    tracing::warn!(
                        session_id,
                        seq = r.seq,
                        err = %e,
                        "an audit row cannot be read; the snapshot stops before it"
                    );
                    break;
                }
            }
        }
        Ok(run)
    }

    /// When a session written by this event runs out: Redis's clock at the
    /// append (the stream id's milliseconds) plus the timeout. Events written
    /// without a stream id use the writer's clock.
    pub fn deadline(&self, i: &Incoming) -> DateTime<Utc> {
        let base = i
            .stream_id
            .as_deref()
            .and_then(stream_id_millis)
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or_else(|| i.event.occurred_at.datetime());
        base + chrono::Duration::from_std(self.session_timeout).unwrap_or_default()
    }
}

/// A snapshot row's state and `seq`, or why it cannot be used.
fn readable(loaded: &Loaded) -> std::result::Result<(Record, u64), String> {
    let s = loaded.as_ref().map_err(Clone::clone)?;
    let state = Record::from_json(&s.state).map_err(|e| format!("state: {e}"))?;
    if s.seq < 1 || state.version() != s.seq as u64 {
        return Err(format!(
            "seq {} but the state says version {}",
            s.seq,
            state.version()
        ));
    }
    Ok((state.with_status(status_of(s.status)), s.seq as u64))
}

/// The snapshots folded from the batch, and the sessions to fold from the
/// table.
struct Plan<'a> {
    upserts: Vec<session_snapshots::Model>,
    behind: Vec<Behind<'a>>,
}

/// A session whose snapshot must be folded from the table.
struct Behind<'a> {
    sid: &'a str,
    state: Record,
    from: u64,
    /// Its snapshot row cannot be read: replace it.
    repair: bool,
}

/// The batch's events per session, sessions in order.
fn by_session<'a>(batch: &[&'a Incoming]) -> BTreeMap<&'a str, Vec<&'a Incoming>> {
    let mut out: BTreeMap<&str, Vec<&Incoming>> = BTreeMap::new();
    for i in batch {
        out.entry(i.event.session_id.as_str()).or_default().push(i);
    }
    out
}

/// The rows the table holds under the event ids `ids` (SQLite).
async fn stored_events(
    txn: &DatabaseTransaction,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, session_events::Model>> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(CHUNK) {
        let rows = session_events::Entity::find()
            .filter(session_events::Column::EventId.is_in(chunk.iter().copied()))
            .all(txn)
            .await?;
        out.extend(rows.into_iter().map(|r| (r.event_id, r)));
    }
    Ok(out)
}

/// True when the stored row is the same event as `e` (a redelivery):
/// compared as decoded events, so that the payload's formatting and the
/// stream id (a fallback event that later reached the stream) do not count.
fn same_event(row: &session_events::Model, e: &Event) -> bool {
    incoming_from_row(row).is_ok_and(|stored| stored.event == *e)
}

/// Inserts dead letters, made storable, skipping any already recorded;
/// returns how many went in.
async fn insert_dead_letters(
    txn: &DatabaseTransaction,
    dead: &[DeadLetter],
    recorded_at: DateTime<Utc>,
) -> Result<u64> {
    let mut total = 0;
    for chunk in dead.chunks(CHUNK) {
        let rows = chunk.iter().map(|d| {
            let (session_id, seq) = d.session_and_seq();
            let d = d.storable();
            dead_letters::ActiveModel {
                id: Default::default(),
                stream: Set(d.stream),
                stream_id: Set(d.stream_id),
                fields: Set(d.fields),
                reason: Set(d.reason),
                deliveries: Set(d.deliveries),
                recorded_at: Set(recorded_at),
                session_id: Set(session_id),
                seq: Set(seq),
                discarded_at: Set(None),
            }
        });
        total += dead_letters::Entity::insert_many(rows)
            .on_conflict(OnConflict::new().do_nothing().to_owned())
            .exec_without_returning(txn)
            .await?;
    }
    Ok(total)
}

/// The stream entry a batch came from, checked by [`AuditSink::write_held`]
/// before the batch commits: Redis still holds it (with the same
/// `event_id`) unless it lost the data set the batch was written to or read
/// from.
#[derive(Debug, Clone)]
pub struct StreamOrigin {
    redis: crate::conn::RedisConn,
    stream: String,
    entry: String,
    event_id: Uuid,
}

impl StreamOrigin {
    /// Entry `entry` of `stream`, which carries event `event_id`.
    pub fn new(
        redis: crate::conn::RedisConn,
        stream: impl Into<String>,
        entry: impl Into<String>,
        event_id: Uuid,
    ) -> Self {
        StreamOrigin {
            redis,
            stream: stream.into(),
            entry: entry.into(),
            event_id,
        }
    }

    /// The entry an incoming event came from in `stream`; `None` for an
    /// event that has no stream entry (written in fallback mode).
    pub fn of(
        redis: crate::conn::RedisConn,
        stream: impl Into<String>,
        i: &Incoming,
    ) -> Option<Self> {
        let entry = i.stream_id.clone()?;
        Some(Self::new(redis, stream, entry, i.event.event_id))
    }

    /// The stream.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// True while Redis holds the entry with its event.
    pub async fn held(&self) -> Result<bool> {
        let found: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.stream)
            .arg(&self.entry)
            .arg(&self.entry)
            .query_async(&mut self.redis.clone())
            .await?;
        let want = self.event_id.to_string();
        Ok(found.ids.iter().any(|e| {
            e.id == self.entry && e.get::<String>("event_id").as_deref() == Some(want.as_str())
        }))
    }
}

/// Waits until every audit transaction that had inserted events when this
/// was called has ended, committed or not. Run before a session is restored
/// from this database into Redis: an event of the lost data set whose
/// commit was under way is then either visible to the restore, or refused
/// by its own check ([`AuditSink::write_held`]), which runs after its insert
/// and so after this barrier. PostgreSQL: a `SHARE` lock on `session_events`
/// (it conflicts with the inserts' `ROW EXCLUSIVE`), taken and released;
/// SQLite: a write, which waits for the database's one writer.
pub async fn settle_writes(db: &DatabaseConnection) -> Result<()> {
    let txn = crate::audit::db::begin(db).await?;
    match txn.get_database_backend() {
        DbBackend::Postgres => {
            txn.execute_unprepared("SET LOCAL lock_timeout = '5s'")
                .await?;
            txn.execute_unprepared("LOCK TABLE session_events IN SHARE MODE")
                .await?;
        }
        _ => {
            txn.execute_unprepared("DELETE FROM session_events WHERE 1 = 0")
                .await?;
        }
    }
    txn.commit().await?;
    Ok(())
}

/// The milliseconds part of a stream id (`1732780800000-0`).
pub fn stream_id_millis(id: &str) -> Option<i64> {
    id.split('-').next()?.parse().ok()
}

fn event_row(i: &Incoming, recorded_at: DateTime<Utc>) -> session_events::ActiveModel {
    let e = &i.event;
    session_events::ActiveModel {
        id: Default::default(),
        event_id: Set(e.event_id),
        session_id: Set(e.session_id.to_string()),
        seq: Set(e.seq as i64),
        event_type: Set(e.kind.type_name().to_owned()),
        user_id: Set(e.user_id.clone()),
        occurred_at: Set(e.occurred_at.datetime()),
        recorded_at: Set(recorded_at),
        stream_id: Set(i.stream_id.clone()),
        schema_version: Set(e.schema as i32),
        payload: Set(e.kind.payload_json()),
        traceparent: Set(e.traceparent.clone()),
        source: Set(if i.stream_id.is_some() {
            EventSource::Stream
        } else {
            EventSource::Fallback
        }),
    }
}

/// Rebuilds an event from its audit row.
pub fn incoming_from_row(r: &session_events::Model) -> Result<Incoming> {
    let mut fields = HashMap::with_capacity(9);
    fields.insert("event_id".to_owned(), r.event_id.to_string());
    fields.insert("session_id".to_owned(), r.session_id.clone());
    fields.insert("seq".to_owned(), r.seq.to_string());
    fields.insert("type".to_owned(), r.event_type.clone());
    fields.insert(
        "occurred_at".to_owned(),
        crate::time::Timestamp::from_datetime(r.occurred_at).to_string(),
    );
    fields.insert("user_id".to_owned(), r.user_id.clone().unwrap_or_default());
    fields.insert("schema".to_owned(), r.schema_version.to_string());
    fields.insert("payload".to_owned(), r.payload.clone());
    if let Some(tp) = &r.traceparent {
        fields.insert("traceparent".to_owned(), tp.clone());
    }
    let event = Event::from_fields(&fields)
        .map_err(|e| Error::Corrupt(format!("audit row {}: {e}", r.event_id)))?;
    Ok(Incoming {
        stream_id: r.stream_id.clone(),
        event,
    })
}

pub(crate) fn fields_json(e: &Event) -> String {
    let m: Map<String, Value> = e
        .to_fields()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Value::String(v)))
        .collect();
    Value::Object(m).to_string()
}

/// The snapshot column's value for a fold status.
pub(crate) fn snapshot_status(s: Status) -> SnapshotStatus {
    match s {
        Status::Live => SnapshotStatus::Live,
        Status::Destroyed => SnapshotStatus::Destroyed,
        Status::Expired => SnapshotStatus::Expired,
    }
}

/// The fold status of a snapshot column's value.
pub fn status_of(s: SnapshotStatus) -> Status {
    match s {
        SnapshotStatus::Live => Status::Live,
        SnapshotStatus::Destroyed => Status::Destroyed,
        SnapshotStatus::Expired => Status::Expired,
    }
}

/// Runs a statement-free round trip to tell "the database is down" from "this
/// batch is bad".
pub async fn reachable(db: &impl ConnectionTrait) -> bool {
    db.execute_unprepared("SELECT 1").await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(fields: &str, reason: &str) -> DeadLetter {
        DeadLetter {
            stream: "s".to_owned(),
            stream_id: "1-0".to_owned(),
            fields: fields.to_owned(),
            reason: reason.to_owned(),
            deliveries: 1,
        }
    }

    #[test]
    fn dead_letters_are_made_storable() {
        let d = letter(r#"{"event_id":"a\u0000b"}"#, "found `\0` at 1").storable();
        assert!(!d.reason.contains('\0'));
        assert_eq!(d.reason, "found `\\u0000` at 1");
        let long = letter("{}", &"é".repeat(REASON_CHARS + 10)).storable();
        assert_eq!(long.reason.chars().count(), REASON_CHARS + 1);
        let escaped = letter("{\"k\":\"\0\u{7f}é\"}", "r\0").escaped("54000");
        assert!(escaped.fields.is_ascii() && !escaped.fields.contains('\0'));
        assert!(escaped.reason.contains("54000"));
        assert!(serde_json::from_str::<Value>(&escaped.fields).is_ok());
    }

    #[test]
    fn a_dead_letter_names_its_session_and_seq_when_valid() {
        let sid = "ab".repeat(32);
        let d = letter(&format!(r#"{{"session_id":"{sid}","seq":"7"}}"#), "");
        assert_eq!(d.session_and_seq(), (Some(sid), Some(7)));
        let d = letter(r#"{"session_id":"nope","seq":"18446744073709551615"}"#, "");
        assert_eq!(d.session_and_seq(), (None, None));
        assert_eq!(letter("not json", "").session_and_seq(), (None, None));
    }
}

/// A session as the audit database knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSession {
    /// The folded state, with its status.
    pub session: Record,
    /// When it runs out, for live sessions.
    pub expires_at: Option<DateTime<Utc>>,
}

impl AuditSink {
    /// The snapshot of one session.
    pub async fn snapshot(&self, session_id: &str) -> Result<Option<StoredSession>> {
        let row = session_snapshots::Entity::find_by_id(session_id.to_owned())
            .one(&self.db)
            .await?;
        row.map(|r| {
            Ok(StoredSession {
                session: Record::from_json(&r.state)
                    .map_err(|e| Error::Corrupt(format!("snapshot of {session_id}: {e}")))?
                    .with_status(status_of(r.status)),
                expires_at: r.expires_at,
            })
        })
        .transpose()
    }
}
