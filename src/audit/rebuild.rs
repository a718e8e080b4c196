//! Rebuilding `session_snapshots` from `session_events` alone: the log is the
//! truth, and every snapshot is the fold of its session's events.
//!
//! [`rebuild`] reads the event table once, in `(session_id, seq)` order and
//! pages of [`PAGE`] rows (keyset pagination, so a page never re-reads), folds
//! each session with the one fold ([`Record::apply_mut`]) for as long as its
//! seqs are contiguous from 1, and writes the snapshots in batches (each
//! while the next page is read and folded), overwriting whatever was there
//! and differs from the fold (a damaged row, a lost one, one ahead of its
//! log). A session whose history has a gap is folded up to the gap and
//! reported; `verify` names it and `dead-letters retry` can close it. Running
//! it twice changes nothing the second time.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait as _, Set, Statement, Value,
};
use serde::Serialize;

use super::entity::session_snapshots;
use super::sink::{snapshot_status, stream_id_millis};
use crate::error::{Error, Result};
use crate::event::{Event, EventKind, SCHEMA_VERSION};
use crate::session::{Record, Status};
use crate::time::Timestamp;

/// Event rows read per page.
pub const PAGE: u64 = 20_000;

/// Snapshots written per statement.
const WRITE_BATCH: usize = 2_000;

/// What a rebuild did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RebuildSummary {
    /// Events read.
    pub events: u64,
    /// Sessions folded.
    pub sessions: u64,
    /// Snapshots written because they differed from the fold (or were missing).
    pub rebuilt: u64,
    /// Snapshots that already were the fold of their events.
    pub unchanged: u64,
    /// Sessions whose seqs have a gap: folded up to it.
    pub gapped: u64,
    /// A few of the gapped sessions, for the operator.
    pub gapped_sessions: Vec<String>,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Sessions per second.
    pub sessions_per_sec: f64,
}

/// One session being folded.
struct Folding {
    session_id: String,
    state: Record,
    user_id: Option<String>,
    /// The deadline base of the last event that left the session live.
    live_base: Option<DateTime<Utc>>,
    gap: bool,
}

impl Folding {
    fn new(session_id: String) -> Self {
        Folding {
            session_id,
            state: Record::default(),
            user_id: None,
            live_base: None,
            gap: false,
        }
    }
}

/// One event row, decoded.
struct Row {
    session_id: String,
    seq: i64,
    event_type: String,
    user_id: Option<String>,
    occurred_at: DateTime<Utc>,
    stream_id: Option<String>,
    schema_version: i32,
    payload: String,
}

/// Refolds every snapshot (or only `only`'s) from the event table.
/// `progress` gets (events done, events total) after each page.
pub async fn rebuild(
    db: &DatabaseConnection,
    session_timeout: Duration,
    only: Option<&str>,
    mut progress: impl FnMut(u64, u64),
) -> Result<RebuildSummary> {
    let started = Instant::now();
    let backend = db.get_database_backend();
    let total = count_events(db, only).await?;
    let timeout = chrono::Duration::from_std(session_timeout).unwrap_or(chrono::Duration::MAX);
    let mut summary = RebuildSummary::default();
    let mut after: (String, i64) = (String::new(), 0);
    let mut current: Option<Folding> = None;
    let mut done: Vec<Folding> = Vec::new();
    // One batch is written (in a task of its own) while the next page is
    // read and folded; batches are written one after the other.
    let mut writing: Option<tokio::task::JoinHandle<Result<(u64, u64)>>> = None;
    loop {
        let rows = page(db, backend, &after, only).await?;
        let full = rows.len() as u64 >= PAGE;
        summary.events += rows.len() as u64;
        if let Some(last) = rows.last() {
            after = (last.session_id.clone(), last.seq);
        }
        for row in rows {
            if current
                .as_ref()
                .is_none_or(|f| f.session_id != row.session_id)
            {
                if let Some(f) = current.take() {
                    done.push(f);
                }
                current = Some(Folding::new(row.session_id.clone()));
            }
            let Some(f) = current.as_mut() else { continue };
            fold_row(f, row)?;
        }
        if !full {
            done.extend(current.take());
        }
        if done.len() >= WRITE_BATCH || !full {
            let batch = std::mem::take(&mut done);
            count(&batch, &mut summary);
            finish(writing.take(), &mut summary).await?;
            writing = Some(tokio::spawn(write(db.clone(), batch, timeout)));
        }
        progress(summary.events, total);
        if !full {
            finish(writing.take(), &mut summary).await?;
            break;
        }
    }
    summary.seconds = started.elapsed().as_secs_f64();
    summary.sessions_per_sec = if summary.seconds > 0.0 {
        summary.sessions as f64 / summary.seconds
    } else {
        0.0
    };
    Ok(summary)
}

fn fold_row(f: &mut Folding, row: Row) -> Result<()> {
    if f.gap {
        return Ok(());
    }
    if row.seq != f.state.version() as i64 + 1 {
        f.gap = true;
        return Ok(());
    }
    let payload: serde_json::Value = serde_json::from_str(&row.payload).map_err(|e| {
        Error::Corrupt(format!(
            "event {} of {}: payload: {e}",
            row.seq, row.session_id
        ))
    })?;
    let payload = crate::event::upcast(row.schema_version as u32, &row.event_type, payload)
        .map_err(|e| Error::Corrupt(format!("event {} of {}: {e}", row.seq, row.session_id)))?;
    let kind = EventKind::from_parts(&row.event_type, payload)
        .map_err(|e| Error::Corrupt(format!("event {} of {}: {e}", row.seq, row.session_id)))?;
    let session_id = row
        .session_id
        .parse()
        .map_err(|e| Error::Corrupt(format!("event of {}: {e}", row.session_id)))?;
    let event = Event {
        event_id: uuid::Uuid::nil(),
        session_id,
        seq: row.seq as u64,
        occurred_at: Timestamp::from_datetime(row.occurred_at),
        user_id: row.user_id.clone(),
        schema: SCHEMA_VERSION,
        kind,
        traceparent: None,
    };
    f.state.apply_mut(&event);
    if f.state.status() == Status::Live {
        f.live_base = Some(
            row.stream_id
                .as_deref()
                .and_then(stream_id_millis)
                .and_then(DateTime::from_timestamp_millis)
                .unwrap_or(row.occurred_at),
        );
    }
    f.user_id = row.user_id;
    Ok(())
}

/// Counts a batch's sessions, and those with a gap, in the summary.
fn count(batch: &[Folding], summary: &mut RebuildSummary) {
    for f in batch {
        summary.sessions += 1;
        if f.gap {
            summary.gapped += 1;
            if summary.gapped_sessions.len() < 20 {
                summary.gapped_sessions.push(f.session_id.clone());
            }
        }
    }
}

/// Waits for a batch's write and counts what it wrote.
async fn finish(
    writing: Option<tokio::task::JoinHandle<Result<(u64, u64)>>>,
    summary: &mut RebuildSummary,
) -> Result<()> {
    let Some(task) = writing else { return Ok(()) };
    let (folded, written) = task
        .await
        .map_err(|e| sea_orm::DbErr::Custom(format!("writing snapshots: {e}")))??;
    summary.rebuilt += written;
    summary.unchanged += folded - written;
    Ok(())
}

/// Writes the folded sessions whose snapshot differs from the fold: one
/// upsert per chunk that leaves a row alone when it already holds the fold
/// (so nothing is read first, and a second run writes nothing). Returns the
/// sessions folded (with at least one event) and the snapshots written.
async fn write(
    db: DatabaseConnection,
    done: Vec<Folding>,
    timeout: chrono::Duration,
) -> Result<(u64, u64)> {
    let now = Utc::now();
    let models: Vec<session_snapshots::ActiveModel> = done
        .into_iter()
        .filter(|f| f.state.version() > 0)
        .map(|f| {
            let status = f.state.status();
            session_snapshots::ActiveModel {
                user_id: Set(f.state.user_key().or(f.user_id)),
                state: Set(f.state.to_json()),
                seq: Set(f.state.version() as i64),
                status: Set(snapshot_status(status)),
                expires_at: Set(match (status, f.live_base) {
                    (Status::Live, Some(base)) => Some(base + timeout),
                    _ => None,
                }),
                updated_at: Set(now),
                session_id: Set(f.session_id),
            }
        })
        .collect();
    let folded = models.len() as u64;
    if folded == 0 {
        return Ok((0, 0));
    }
    use session_snapshots::Column as C;
    let differs = sea_orm::sea_query::Expr::cust(
        r#""session_snapshots"."state" IS DISTINCT FROM "excluded"."state"
           OR "session_snapshots"."seq" IS DISTINCT FROM "excluded"."seq"
           OR "session_snapshots"."status" IS DISTINCT FROM "excluded"."status"
           OR "session_snapshots"."user_id" IS DISTINCT FROM "excluded"."user_id"
           OR "session_snapshots"."expires_at" IS DISTINCT FROM "excluded"."expires_at""#,
    );
    let txn = crate::audit::db::begin(&db).await?;
    let mut written = 0;
    let mut models = models.into_iter().peekable();
    while models.peek().is_some() {
        let chunk: Vec<_> = models.by_ref().take(1000).collect();
        written += session_snapshots::Entity::insert_many(chunk)
            .on_conflict(
                OnConflict::column(C::SessionId)
                    .update_columns([
                        C::UserId,
                        C::State,
                        C::Seq,
                        C::Status,
                        C::ExpiresAt,
                        C::UpdatedAt,
                    ])
                    .action_and_where(differs.clone())
                    .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
    }
    txn.commit().await?;
    Ok((folded, written))
}

async fn count_events(db: &DatabaseConnection, only: Option<&str>) -> Result<u64> {
    use sea_orm::{ColumnTrait as _, PaginatorTrait as _, QueryFilter as _};
    let mut q = super::entity::session_events::Entity::find();
    if let Some(id) = only {
        q = q.filter(super::entity::session_events::Column::SessionId.eq(id));
    }
    Ok(q.count(db).await?)
}

/// The next page of event rows after `after`, in `(session_id, seq)` order.
async fn page(
    db: &DatabaseConnection,
    backend: DbBackend,
    after: &(String, i64),
    only: Option<&str>,
) -> Result<Vec<Row>> {
    let (sql, values): (String, Vec<Value>) = match (backend, only) {
        (DbBackend::Postgres, None) => (
            format!(
                r#"SELECT "session_id", "seq", "event_type", "user_id", "occurred_at", "stream_id", "schema_version", "payload"
                   FROM "session_events" WHERE ("session_id", "seq") > ($1, $2)
                   ORDER BY "session_id", "seq" LIMIT {PAGE}"#
            ),
            vec![after.0.clone().into(), after.1.into()],
        ),
        (DbBackend::Postgres, Some(id)) => (
            format!(
                r#"SELECT "session_id", "seq", "event_type", "user_id", "occurred_at", "stream_id", "schema_version", "payload"
                   FROM "session_events" WHERE "session_id" = $1 AND "seq" > $2
                   ORDER BY "seq" LIMIT {PAGE}"#
            ),
            vec![id.to_owned().into(), after.1.into()],
        ),
        (_, None) => (
            format!(
                r#"SELECT "session_id", "seq", "event_type", "user_id", "occurred_at", "stream_id", "schema_version", "payload"
                   FROM "session_events" WHERE ("session_id", "seq") > (?, ?)
                   ORDER BY "session_id", "seq" LIMIT {PAGE}"#
            ),
            vec![after.0.clone().into(), after.1.into()],
        ),
        (_, Some(id)) => (
            format!(
                r#"SELECT "session_id", "seq", "event_type", "user_id", "occurred_at", "stream_id", "schema_version", "payload"
                   FROM "session_events" WHERE "session_id" = ? AND "seq" > ?
                   ORDER BY "seq" LIMIT {PAGE}"#
            ),
            vec![id.to_owned().into(), after.1.into()],
        ),
    };
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Row {
                session_id: r.try_get_by_index(0)?,
                seq: r.try_get_by_index(1)?,
                event_type: r.try_get_by_index(2)?,
                user_id: r.try_get_by_index(3)?,
                occurred_at: r.try_get_by_index(4)?,
                stream_id: r.try_get_by_index(5)?,
                schema_version: r.try_get_by_index(6)?,
                payload: r.try_get_by_index(7)?,
            })
        })
        .collect()
}
