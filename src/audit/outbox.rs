//! The fallback outbox: mutations an app server accepted while Redis was
//! unreachable, staged in `fallback_events` until they are projected
//! through Redis.
//!
//! While Redis is away, the database's view of a session ([`View`]) is its
//! snapshot folded forward with the events staged for it. A mutation in
//! fallback mode stages its event against that view's version, in one
//! transaction; `(session_id, seq)` is unique among staged events, so two app
//! servers writing one session at once conflict instead of losing an update.
//!
//! Staged events are durable the moment the mutation returns: they live in
//! the database, not in the memory of the app server that wrote them. Once
//! Redis answers, any process (an app server, the worker) projects them: each
//! event, with its own id, is applied through the mutation script on top of
//! what Redis holds, where it takes its final `seq` (after the stream's own
//! events for that session, which is the split-brain rule), and its row is
//! deleted. From there the audit consumer records it like any other event,
//! with `source = fallback`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait as _, ConnectionTrait, DatabaseConnection, EntityTrait as _, QueryFilter as _,
    QueryOrder as _, QuerySelect as _, Set,
};

use super::entity::session_snapshots::{self, SnapshotStatus};
use super::entity::{fallback_events, session_events};
use super::sink::status_of;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::session::{Record, Status};

/// The database's view of one session while Redis is away.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// The snapshot folded forward with the staged events, status included.
    pub session: Record,
    /// When the session runs out, while it is live.
    pub deadline: Option<DateTime<Utc>>,
    /// The snapshot row, if the database has one.
    pub snapshot: Option<session_snapshots::Model>,
    /// The newest `seq` the event table holds for the session (0 for none).
    pub newest_logged: u64,
    /// The staged events, oldest first.
    pub staged: Vec<Event>,
}

impl View {
    /// The snapshot's `seq` (0 without a snapshot).
    pub(crate) fn snapshot_seq(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.seq.max(0) as u64)
    }

    /// True when the event table holds events the snapshot has not folded:
    /// a gap (an event missing or set aside), or an audit write in progress.
    /// Such a view is not a session anyone may be served.
    pub(crate) fn behind_the_log(&self) -> bool {
        self.newest_logged > self.snapshot_seq()
    }
}

fn timeout(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// The view of `session_id`, or `None` when the database knows nothing of
/// it. `session_timeout` turns a staged event's time into a deadline.
///
/// The snapshot, the staged rows and the newest logged seq are read in one
/// read transaction (`REPEATABLE READ` on PostgreSQL; on SQLite every read
/// transaction is a snapshot), so that an audit commit landing between the
/// reads cannot make a live session look behind its log.
pub async fn view(
    db: &sea_orm::DatabaseConnection,
    session_id: &str,
    session_timeout: Duration,
) -> Result<Option<View>> {
    use sea_orm::{AccessMode, IsolationLevel};
    let txn = match db.get_database_backend() {
        sea_orm::DbBackend::Postgres => {
            crate::audit::db::begin_with(
                db,
                Some(IsolationLevel::RepeatableRead),
                Some(AccessMode::ReadOnly),
            )
            .await?
        }
        _ => crate::audit::db::begin(db).await?,
    };
    let view = view_in(&txn, session_id, session_timeout).await;
    txn.commit().await?;
    view
}

async fn view_in(
    db: &impl ConnectionTrait,
    session_id: &str,
    session_timeout: Duration,
) -> Result<Option<View>> {
    let snapshot = session_snapshots::Entity::find_by_id(session_id.to_owned())
        .one(db)
        .await?;
    let staged_rows = fallback_events::Entity::find()
        .filter(fallback_events::Column::SessionId.eq(session_id))
        .order_by_asc(fallback_events::Column::Seq)
        .all(db)
        .await?;
    if snapshot.is_none() && staged_rows.is_empty() {
        return Ok(None);
    }
    let newest_logged: Option<i64> = session_events::Entity::find()
        .select_only()
        .column_as(session_events::Column::Seq.max(), "newest")
        .filter(session_events::Column::SessionId.eq(session_id))
        .into_tuple()
        .one(db)
        .await?
        .flatten();
    let (mut session, mut deadline) = match &snapshot {
        Some(s) => (
            Record::from_json(&s.state)
                .map_err(|e| Error::Corrupt(format!("snapshot of {session_id}: {e}")))?
                .with_status(status_of(s.status)),
            s.expires_at,
        ),
        None => (Record::default().with_status(Status::Destroyed), None),
    };
    let mut staged = Vec::with_capacity(staged_rows.len());
    for row in &staged_rows {
        let event = event_of(row)?;
        if matches!(event.kind, crate::event::EventKind::Created { .. }) || session.version() > 0 {
            session.apply_mut(&event);
            if session.status() == Status::Live {
                deadline = Some(event.occurred_at.datetime() + timeout(session_timeout));
            }
        }
        staged.push(event);
    }
    if session.status() != Status::Live {
        deadline = None;
    }
    Ok(Some(View {
        session,
        deadline,
        snapshot,
        newest_logged: newest_logged.unwrap_or(0).max(0) as u64,
        staged,
    }))
}

/// The event a staged row holds.
pub(crate) fn event_of(row: &fallback_events::Model) -> Result<Event> {
    let mut fields = std::collections::HashMap::with_capacity(9);
    fields.insert("event_id".to_owned(), row.event_id.to_string());
    fields.insert("session_id".to_owned(), row.session_id.clone());
    fields.insert("seq".to_owned(), row.seq.to_string());
    fields.insert("type".to_owned(), row.event_type.clone());
    fields.insert(
        "occurred_at".to_owned(),
        crate::time::Timestamp::from_datetime(row.occurred_at).to_string(),
    );
    fields.insert(
        "user_id".to_owned(),
        row.user_id.clone().unwrap_or_default(),
    );
    fields.insert("schema".to_owned(), row.schema_version.to_string());
    fields.insert("payload".to_owned(), row.payload.clone());
    if let Some(tp) = &row.traceparent {
        fields.insert("traceparent".to_owned(), tp.clone());
    }
    Event::from_fields(&fields)
        .map_err(|e| Error::Corrupt(format!("staged event {}: {e}", row.event_id)))
}

/// What [`stage`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staged {
    /// The events are committed: the mutation is durable.
    Written,
    /// A session moved on (another writer staged first, or it ended): fold
    /// again on a fresh [`view`].
    Conflict,
    /// Redis is back for other processes (see
    /// `partition::open_for_writes`):
    /// nothing was staged; the write must go to Redis.
    Refused,
}

/// Stages events in one transaction, each checked against the version its
/// session's view had when the caller folded it (`expected`; 0 for a new
/// session). The event's `seq` must be `expected + 1`.
/// `unsure`: the Redis attempt before failed without saying whether Redis
/// applied it (see [`fallback_events::Model::unsure`]). Writes other than the
/// creation of new sessions are staged only while the database is open for
/// writes by the opening `opened` the caller waited out (see
/// `partition::open_for_writes`); without one, only new sessions are.
pub async fn stage(
    db: &DatabaseConnection,
    stream: &str,
    writes: &[(u64, Event)],
    unsure: bool,
    opened: Option<chrono::DateTime<Utc>>,
) -> Result<Staged> {
    let txn = crate::audit::db::begin(db).await?;
    let only_new = writes.iter().all(|(expected, e)| {
        *expected == 0 && matches!(e.kind, crate::event::EventKind::Created { .. })
    });
    let open = match opened {
        Some(since) => super::partition::still_open(&txn, stream, since).await?,
        None => false,
    };
    if !only_new && !open {
        txn.rollback().await?;
        return Ok(Staged::Refused);
    }
    let recorded_at = Utc::now();
    for (expected, event) in writes {
        let sid = event.session_id.as_str();
        let snapshot = session_snapshots::Entity::find_by_id(sid.to_owned())
            .one(&txn)
            .await?;
        let staged_max: Option<i64> = fallback_events::Entity::find()
            .select_only()
            .column_as(fallback_events::Column::Seq.max(), "newest")
            .filter(fallback_events::Column::SessionId.eq(sid))
            .into_tuple()
            .one(&txn)
            .await?
            .flatten();
        let snapshot_seq = snapshot.as_ref().map_or(0, |s| s.seq.max(0) as u64);
        let version = snapshot_seq.max(staged_max.unwrap_or(0).max(0) as u64);
        let ended = staged_max.is_none()
            && snapshot
                .as_ref()
                .is_some_and(|s| s.status != SnapshotStatus::Live);
        if version != *expected || event.seq != expected + 1 || ended {
            txn.rollback().await?;
            return Ok(Staged::Conflict);
        }
        let row = fallback_events::ActiveModel {
            id: Default::default(),
            event_id: Set(event.event_id),
            stream: Set(stream.to_owned()),
            session_id: Set(sid.to_owned()),
            seq: Set(event.seq as i64),
            event_type: Set(event.kind.type_name().to_owned()),
            user_id: Set(event.user_id.clone()),
            occurred_at: Set(event.occurred_at.datetime()),
            schema_version: Set(event.schema as i32),
            payload: Set(event.kind.payload_json()),
            traceparent: Set(event.traceparent.clone()),
            unsure: Set(unsure),
            recorded_at: Set(recorded_at),
        };
        if let Err(e) = fallback_events::Entity::insert(row)
            .exec_without_returning(&txn)
            .await
        {
            txn.rollback().await?;
            return match e.sql_err() {
                Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) => Ok(Staged::Conflict),
                _ => Err(e.into()),
            };
        }
    }
    txn.commit().await?;
    Ok(Staged::Written)
}

/// The oldest staged rows of `stream` after row `after`, at most `limit`.
pub async fn pending(
    db: &impl ConnectionTrait,
    stream: &str,
    after: i64,
    limit: u64,
) -> Result<Vec<fallback_events::Model>> {
    Ok(fallback_events::Entity::find()
        .filter(fallback_events::Column::Stream.eq(stream))
        .filter(fallback_events::Column::Id.gt(after))
        .order_by_asc(fallback_events::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// True when any of `streams` has staged rows.
pub(crate) async fn has_pending(db: &impl ConnectionTrait, streams: &[&str]) -> Result<bool> {
    let one: Option<i64> = fallback_events::Entity::find()
        .select_only()
        .column(fallback_events::Column::Id)
        .filter(fallback_events::Column::Stream.is_in(streams.iter().copied()))
        .limit(1)
        .into_tuple()
        .one(db)
        .await?;
    Ok(one.is_some())
}

/// True when `session_id` has staged rows.
pub(crate) async fn has_session(db: &impl ConnectionTrait, session_id: &str) -> Result<bool> {
    let one: Option<i64> = fallback_events::Entity::find()
        .select_only()
        .column(fallback_events::Column::Id)
        .filter(fallback_events::Column::SessionId.eq(session_id))
        .limit(1)
        .into_tuple()
        .one(db)
        .await?;
    Ok(one.is_some())
}

/// Deletes a staged row once its event is in Redis (or in the event table).
pub async fn remove(db: &impl ConnectionTrait, id: i64) -> Result<()> {
    fallback_events::Entity::delete_many()
        .filter(fallback_events::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

/// True when the event table already holds `event_id`.
pub async fn logged(db: &impl ConnectionTrait, event_id: uuid::Uuid) -> Result<bool> {
    let one: Option<i64> = session_events::Entity::find()
        .select_only()
        .column(session_events::Column::Id)
        .filter(session_events::Column::EventId.eq(event_id))
        .into_tuple()
        .one(db)
        .await?;
    Ok(one.is_some())
}

/// Sessions of `user_id` that the database knows live: live snapshots, and
/// sessions created by staged events. For logging a user out everywhere
/// while Redis cannot tell (recovering, unreachable).
pub(crate) async fn sessions_of_user(
    db: &impl ConnectionTrait,
    user_id: &str,
) -> Result<Vec<String>> {
    let mut ids: Vec<String> = session_snapshots::Entity::find()
        .select_only()
        .column(session_snapshots::Column::SessionId)
        .filter(session_snapshots::Column::UserId.eq(user_id))
        .filter(session_snapshots::Column::Status.eq(SnapshotStatus::Live))
        .into_tuple()
        .all(db)
        .await?;
    let staged: Vec<String> = fallback_events::Entity::find()
        .select_only()
        .column(fallback_events::Column::SessionId)
        .distinct()
        .filter(fallback_events::Column::UserId.eq(user_id))
        .into_tuple()
        .all(db)
        .await?;
    ids.extend(staged);
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// How many rows are staged in `streams`, for operators (`stats`).
pub async fn count(db: &impl ConnectionTrait, streams: &[&str]) -> Result<u64> {
    let n: Option<i64> = fallback_events::Entity::find()
        .select_only()
        .column_as(fallback_events::Column::Id.count(), "n")
        .filter(fallback_events::Column::Stream.is_in(streams.iter().copied()))
        .into_tuple()
        .one(db)
        .await?;
    Ok(n.unwrap_or(0).max(0) as u64)
}
