//! Writing events into the audit database, exactly once in effect.
//!
//! [`AuditSink::write`] takes a batch of decoded events (and the dead letters
//! found while decoding it) and, in one transaction:
//!
//! 1. inserts the events, skipping rows whose `event_id` is already there
//!    (redelivery) — `ON CONFLICT DO NOTHING`;
//! 2. finds events that were skipped because *another* event already holds
//!    their `(session_id, seq)` and records them as dead letters, so neither
//!    side is dropped silently;
//! 3. folds each touched session forward from its snapshot with the one fold
//!    ([`Session::apply`]) and upserts the snapshot only when the new `seq` is
//!    higher than the stored one;
//! 4. inserts the dead letters.
//!
//! The caller acknowledges the stream entries only after this commits.
//!
//! On PostgreSQL, steps 1–3 use constant statements over binary arrays
//! (`INSERT … SELECT … FROM unnest(…)`), each request kept under 16 KiB on a
//! connection that may use TLS so that no part of it waits for a delayed ACK
//! (see [`postgres`](self::postgres) for why, and what the bound costs).
//! Step 1 first runs as a plain insert, the cheapest statement PostgreSQL has
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
use sea_orm::sea_query::{Alias, Expr, OnConflict};
use sea_orm::{
    ColumnTrait as _, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend,
    EntityTrait as _, ExprTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _, Set,
    TransactionTrait as _,
};
use serde_json::{Map, Value};
use uuid::Uuid;

mod postgres;

use postgres::Insert;

use super::entity::session_events::EventSource;
use super::entity::session_snapshots::SnapshotStatus;
use super::entity::{dead_letters, session_events, session_snapshots};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::session::{Session, Status};

/// Rows per multi-row insert: 12 columns × 1000 stays well under both
/// SQLite's 32766 and PostgreSQL's 65535 bind parameters.
const CHUNK: usize = 1000;

/// Batches written with the checked insert after a plain insert met a
/// duplicate, before the sink tries the plain one again.
pub const CAUTIOUS_BATCHES: u32 = 16;

/// One event on its way into the database.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// The stream entry id; `None` for events written in fallback mode.
    pub stream_id: Option<String>,
    /// The decoded event.
    pub event: Event,
}

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

/// What one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Events inserted now.
    pub inserted: u64,
    /// Events that were already there (redelivered).
    pub duplicates: u64,
    /// Events refused because their `(session_id, seq)` was taken by another event.
    pub seq_conflicts: u64,
    /// Snapshots moved forward.
    pub snapshots: u64,
    /// Dead letters written (including the seq conflicts).
    pub dead_letters: u64,
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
}

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
        }
    }

    /// The database.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The most bytes one PostgreSQL statement of the sink sends: 16 KiB on
    /// a connection that may use TLS, much more on one that cannot (see
    /// [`postgres`](self::postgres)).
    pub fn statement_bytes(&self) -> usize {
        self.request_bytes
    }

    /// Writes a batch in one transaction (see the module docs).
    #[tracing::instrument(skip_all, fields(events = batch.len(), dead = dead.len()), err)]
    pub async fn write(&self, batch: &[Incoming], dead: &[DeadLetter]) -> Result<BatchOutcome> {
        // The same event twice in one batch would be one row anyway.
        let mut seen = HashSet::new();
        let batch: Vec<&Incoming> = batch
            .iter()
            .filter(|i| seen.insert(i.event.event_id))
            .collect();
        let recorded_at = Utc::now();
        if self.try_plain(&batch) {
            let txn = self.db.begin().await?;
            match self.write_plain(&txn, &batch, dead, recorded_at).await {
                Ok(out) => {
                    txn.commit().await?;
                    return Ok(out);
                }
                Err(e) if postgres::is_unique_violation(&e) => {
                    txn.rollback().await?;
                    self.cautious.store(CAUTIOUS_BATCHES, Ordering::Relaxed);
                    tracing::debug!("batch holds an event already stored; writing it checked");
                }
                Err(e) => return Err(e),
            }
        }
        let txn = self.db.begin().await?;
        let out = self.write_checked(&txn, &batch, dead, recorded_at).await?;
        txn.commit().await?;
        Ok(out)
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
    /// redeliveries count as duplicates, seq conflicts become dead letters.
    async fn write_checked(
        &self,
        txn: &DatabaseTransaction,
        batch: &[&Incoming],
        dead: &[DeadLetter],
        recorded_at: DateTime<Utc>,
    ) -> Result<BatchOutcome> {
        let mut out = BatchOutcome::default();
        let present = if txn.get_database_backend() == DbBackend::Postgres {
            let bound = self.request_bytes;
            let statements = postgres::event_statements(batch, recorded_at, bound, Insert::Checked);
            let mut present = postgres::insert_checked(txn, statements).await?;
            out.inserted = present.len() as u64;
            // Only rows that were not inserted can be redeliveries or
            // seq conflicts; tell them apart by their event id.
            let skipped: Vec<Uuid> = batch
                .iter()
                .map(|i| i.event.event_id)
                .filter(|id| !present.contains(id))
                .collect();
            if !skipped.is_empty() {
                present.extend(postgres::present_event_ids(txn, &skipped, bound).await?);
            }
            present
        } else {
            for chunk in batch.chunks(CHUNK) {
                let rows = chunk.iter().map(|i| event_row(i, recorded_at));
                let n = session_events::Entity::insert_many(rows)
                    .on_conflict(OnConflict::new().do_nothing().to_owned())
                    .exec_without_returning(txn)
                    .await?;
                out.inserted += n;
            }
            // Which events are now in the table, under which event id per place?
            let mut present: HashSet<Uuid> = HashSet::new();
            for chunk in batch.chunks(CHUNK) {
                let ids: Vec<Uuid> = chunk.iter().map(|i| i.event.event_id).collect();
                let found: Vec<Uuid> = session_events::Entity::find()
                    .select_only()
                    .column(session_events::Column::EventId)
                    .filter(session_events::Column::EventId.is_in(ids))
                    .into_tuple()
                    .all(txn)
                    .await?;
                present.extend(found);
            }
            present
        };
        let mut dead: Vec<DeadLetter> = dead.to_vec();
        let mut accepted: Vec<&Incoming> = Vec::with_capacity(batch.len());
        for &i in batch {
            if present.contains(&i.event.event_id) {
                accepted.push(i);
            } else {
                out.seq_conflicts += 1;
                dead.push(DeadLetter {
                    stream: self.stream.clone(),
                    stream_id: i
                        .stream_id
                        .clone()
                        .unwrap_or_else(|| format!("fallback-{}", i.event.event_id)),
                    fields: fields_json(&i.event),
                    reason: format!(
                        "seq {} of session {} is already held by another event",
                        i.event.seq, i.event.session_id
                    ),
                    deliveries: 1,
                });
            }
        }
        out.duplicates = (accepted.len() as u64).saturating_sub(out.inserted);
        out.snapshots = self.advance_snapshots(txn, &accepted).await?;
        out.dead_letters = insert_dead_letters(txn, &dead, recorded_at).await?;
        Ok(out)
    }

    /// The plain-insert path on PostgreSQL (see the module docs). Every event
    /// of `batch` goes in or the statement fails, so the newest `seq` of each
    /// session after the insert is known before it runs: the snapshots are
    /// read first, and the fold runs while PostgreSQL inserts the events.
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
        let (upserts, behind) = planned?;
        Ok(BatchOutcome {
            inserted,
            duplicates: 0,
            seq_conflicts: 0,
            snapshots: self.finish_snapshots(txn, upserts, behind, now).await?,
            dead_letters: insert_dead_letters(txn, dead, recorded_at).await?,
        })
    }

    /// Folds every session of the batch forward from its snapshot.
    async fn advance_snapshots(
        &self,
        txn: &DatabaseTransaction,
        batch: &[&Incoming],
    ) -> Result<u64> {
        let by_session = by_session(batch);
        let ids: Vec<&str> = by_session.keys().copied().collect();
        let postgres = txn.get_database_backend() == DbBackend::Postgres;
        // The newest seq each session has in the table now (this batch
        // included): a batch that is contiguous but not the newest (an older
        // entry claimed late, a synchronous write racing the consumer) must
        // still fold up to it.
        let (snapshots, newest) = if postgres {
            postgres::load_sessions(txn, &ids, self.request_bytes).await?
        } else {
            let mut snapshots: HashMap<String, session_snapshots::Model> = HashMap::new();
            for chunk in ids.chunks(CHUNK) {
                let rows = session_snapshots::Entity::find()
                    .filter(session_snapshots::Column::SessionId.is_in(chunk.iter().copied()))
                    .all(txn)
                    .await?;
                snapshots.extend(rows.into_iter().map(|r| (r.session_id.clone(), r)));
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
            (snapshots, newest)
        };
        let now = Utc::now();
        let (upserts, behind) = self.plan_snapshots(by_session, &snapshots, &newest, now)?;
        self.finish_snapshots(txn, upserts, behind, now).await
    }

    /// Adds the sessions folded from the table (`behind`) to the planned
    /// `upserts`, and writes them all. Returns how many were written.
    async fn finish_snapshots(
        &self,
        txn: &DatabaseTransaction,
        mut upserts: Vec<session_snapshots::Model>,
        behind: Vec<Behind<'_>>,
        now: DateTime<Utc>,
    ) -> Result<u64> {
        upserts.extend(self.fold_from_table(txn, behind, now).await?);
        let n = upserts.len() as u64;
        if txn.get_database_backend() == DbBackend::Postgres {
            postgres::upsert_snapshots(txn, &upserts, now, self.request_bytes).await?;
            return Ok(n);
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
        Ok(n)
    }

    /// Folds the sessions whose new events continue their snapshot and are
    /// the newest the table holds; the others (out of order, or newer events
    /// already committed) are returned to be folded from the table.
    fn plan_snapshots<'a>(
        &self,
        by_session: BTreeMap<&'a str, Vec<&'a Incoming>>,
        snapshots: &HashMap<String, session_snapshots::Model>,
        newest: &HashMap<String, i64>,
        now: DateTime<Utc>,
    ) -> Result<(Vec<session_snapshots::Model>, Vec<Behind<'a>>)> {
        let mut upserts = Vec::with_capacity(by_session.len());
        let mut behind = Vec::new();
        for (sid, mut events) in by_session {
            events.sort_by_key(|i| i.event.seq);
            let (state, from) = match snapshots.get(sid) {
                Some(s) => (
                    Session::from_json(&s.state)
                        .map_err(|e| Error::Corrupt(format!("snapshot of {sid}: {e}")))?
                        .with_status(status_of(s.status)),
                    s.seq as u64,
                ),
                None => (Session::default(), 0),
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
                upserts.extend(self.fold_run(sid, state, pending, now));
            } else {
                behind.push(Behind { sid, state, from });
            }
        }
        Ok((upserts, behind))
    }

    /// Folds `run` (oldest first) onto `state` up to the first gap; the new
    /// snapshot, or `None` when nothing applied.
    fn fold_run<'a>(
        &self,
        sid: &str,
        mut state: Session,
        run: impl IntoIterator<Item = &'a Incoming>,
        now: DateTime<Utc>,
    ) -> Option<session_snapshots::Model> {
        let mut last: Option<&Incoming> = None;
        let mut deadline_from: Option<&Incoming> = None;
        for i in run {
            if i.event.seq != state.version() + 1 {
                break;
            }
            state.apply_mut(&i.event);
            if state.status() == Status::Live {
                deadline_from = Some(i);
            }
            last = Some(i);
        }
        let last = last?;
        let expires_at = match (state.status(), deadline_from) {
            (Status::Live, Some(i)) => Some(self.deadline(i)),
            _ => None,
        };
        Some(session_snapshots::Model {
            session_id: sid.to_owned(),
            user_id: state.user_id().or_else(|| last.event.user_id.clone()),
            state: state.to_json(),
            seq: state.version() as i64,
            status: snapshot_status(state.status()),
            expires_at,
            updated_at: now,
        })
    }

    /// Folds each session of `behind` from the events the table holds after
    /// its snapshot (this transaction's included).
    async fn fold_from_table(
        &self,
        txn: &DatabaseTransaction,
        behind: Vec<Behind<'_>>,
        now: DateTime<Utc>,
    ) -> Result<Vec<session_snapshots::Model>> {
        let mut upserts = Vec::with_capacity(behind.len());
        for b in behind {
            let run = self.history_after(txn, b.sid, b.from).await?;
            upserts.extend(self.fold_run(b.sid, b.state, &run, now));
        }
        Ok(upserts)
    }

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
        rows.into_iter().map(|r| incoming_from_row(&r)).collect()
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

/// A session whose snapshot must be folded from the table.
struct Behind<'a> {
    sid: &'a str,
    state: Session,
    from: u64,
}

/// The batch's events per session.
fn by_session<'a>(batch: &[&'a Incoming]) -> BTreeMap<&'a str, Vec<&'a Incoming>> {
    let mut out: BTreeMap<&str, Vec<&Incoming>> = BTreeMap::new();
    for i in batch {
        out.entry(i.event.session_id.as_str()).or_default().push(i);
    }
    out
}

/// Inserts dead letters, skipping any already recorded; returns how many
/// went in.
async fn insert_dead_letters(
    txn: &DatabaseTransaction,
    dead: &[DeadLetter],
    recorded_at: DateTime<Utc>,
) -> Result<u64> {
    let mut total = 0;
    for chunk in dead.chunks(CHUNK) {
        let rows = chunk.iter().map(|d| dead_letters::ActiveModel {
            id: Default::default(),
            stream: Set(d.stream.clone()),
            stream_id: Set(d.stream_id.clone()),
            fields: Set(d.fields.clone()),
            reason: Set(d.reason.clone()),
            deliveries: Set(d.deliveries),
            recorded_at: Set(recorded_at),
        });
        total += dead_letters::Entity::insert_many(rows)
            .on_conflict(OnConflict::new().do_nothing().to_owned())
            .exec_without_returning(txn)
            .await?;
    }
    Ok(total)
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
pub fn snapshot_status(s: Status) -> SnapshotStatus {
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

/// What a fallback append found.
#[derive(Debug, Clone, PartialEq)]
pub enum FallbackOutcome {
    /// The events are committed.
    Written,
    /// The session moved on: its current state (`None` when it has ended or
    /// does not exist).
    Conflict(Option<Session>),
}

/// A session as the audit database knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSession {
    /// The folded state, with its status.
    pub session: Session,
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
                session: Session::from_json(&r.state)
                    .map_err(|e| Error::Corrupt(format!("snapshot of {session_id}: {e}")))?
                    .with_status(status_of(r.status)),
                expires_at: r.expires_at,
            })
        })
        .transpose()
    }

    /// Live snapshots of one user.
    pub async fn live_sessions_of(&self, user_id: &str) -> Result<Vec<String>> {
        let rows: Vec<String> = session_snapshots::Entity::find()
            .select_only()
            .column(session_snapshots::Column::SessionId)
            .filter(session_snapshots::Column::UserId.eq(user_id))
            .filter(session_snapshots::Column::Status.eq(SnapshotStatus::Live))
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows)
    }

    /// Fallback mode (Redis unreachable): appends events straight to the
    /// database, each checked against the snapshot's `seq` (`expected`, 0 for
    /// a new session), in one transaction. `source` is `fallback` and
    /// `stream_id` is null. A concurrent writer makes it a conflict, never a
    /// lost update.
    pub async fn append_fallback(&self, writes: &[(u64, Event)]) -> Result<FallbackOutcome> {
        let txn = self.db.begin().await?;
        for (expected, event) in writes {
            let row = session_snapshots::Entity::find_by_id(event.session_id.to_string())
                .one(&txn)
                .await?;
            let current = row.as_ref().map_or(0, |r| r.seq as u64);
            let live = row
                .as_ref()
                .is_none_or(|r| r.status == SnapshotStatus::Live);
            if current != *expected || !live {
                let state = match row {
                    Some(r) if r.status == SnapshotStatus::Live => {
                        Session::from_json(&r.state).ok()
                    }
                    _ => None,
                };
                txn.rollback().await?;
                return Ok(FallbackOutcome::Conflict(state));
            }
            let incoming = Incoming {
                stream_id: None,
                event: event.clone(),
            };
            let inserted = session_events::Entity::insert(event_row(&incoming, Utc::now()))
                .exec_without_returning(&txn)
                .await;
            if let Err(e) = inserted {
                txn.rollback().await?;
                return match e.sql_err() {
                    Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) => {
                        Ok(FallbackOutcome::Conflict(None))
                    }
                    _ => Err(e.into()),
                };
            }
            self.advance_snapshots(&txn, &[&incoming]).await?;
        }
        txn.commit().await?;
        Ok(FallbackOutcome::Written)
    }
}
