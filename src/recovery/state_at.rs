//! [`state_at`]: sessions as they were at an instant, folded from the
//! audit trail without touching Redis.
//!
//! The audit trail is read row by row without letting one bad row fail the
//! whole query ([`AuditRow`]): a row that does not decode into an event (a
//! `seq` outside the range of sequence numbers, an unknown type, a payload
//! that does not parse) is set aside with the reason, the rest of its
//! session still folds, and the caller is told ([`PointInTimeReport::skipped`]).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait as _, ConnectionTrait, DbErr, EntityTrait as _, FromQueryResult,
    PaginatorTrait as _, QueryFilter as _, QueryOrder as _, QueryResult, QuerySelect as _,
};
use serde::Serialize;
use serde_json::Value;

use crate::audit::Incoming;
use crate::audit::entity::{session_events, session_snapshots};
use crate::audit::sink::incoming_from_row;
use crate::error::Result;
use crate::event::Event;
use crate::session::Record;

/// One session as it was at an instant.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PointInTime {
    /// The session.
    pub session_id: String,
    /// `live`, `destroyed` or `expired` at that instant.
    pub status: String,
    /// The last seq applied.
    pub seq: u64,
    /// The session JSON at that instant.
    pub state: Value,
}

/// An audit row that does not decode into an event, left out of every fold.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SkippedRow {
    /// The session the row names (empty when even that did not read).
    pub session_id: String,
    /// The row's event id (empty when it did not read).
    pub event_id: String,
    /// Why it was left out.
    pub reason: String,
}

/// What [`point_in_time`] found.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PointInTimeReport {
    /// The sessions as they were.
    pub sessions: Vec<PointInTime>,
    /// Rows that were left out because they do not decode.
    pub skipped: Vec<SkippedRow>,
}

/// Which sessions [`state_at`] reads.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// One session.
    pub session_id: Option<String>,
    /// Every session of one user.
    pub user_id: Option<String>,
}

/// Folds each selected session's events that occurred at or before `at`
/// (in `seq` order; the writer's clock decides only where the history is cut).
/// Rows that do not decode are left out (and logged); [`point_in_time`] also
/// returns them.
pub async fn state_at(
    db: &impl ConnectionTrait,
    at: DateTime<Utc>,
    selection: &Selection,
) -> Result<Vec<PointInTime>> {
    let report = point_in_time(db, at, selection).await?;
    for s in &report.skipped {
        tracing::warn!(
            session_id = %s.session_id,
            event_id = %s.event_id,
            reason = %s.reason,
            "audit row skipped"
        );
    }
    Ok(report.sessions)
}

/// [`state_at`], with the rows it had to leave out.
pub async fn point_in_time(
    db: &impl ConnectionTrait,
    at: DateTime<Utc>,
    selection: &Selection,
) -> Result<PointInTimeReport> {
    use session_events::Column as C;
    let mut ids: Option<Vec<String>> = selection.session_id.clone().map(|s| vec![s]);
    if let Some(u) = &selection.user_id {
        let found: Vec<String> = session_events::Entity::find()
            .select_only()
            .column(C::SessionId)
            .distinct()
            .filter(C::UserId.eq(u.as_str()))
            .filter(C::OccurredAt.lte(at))
            .into_tuple()
            .all(db)
            .await?;
        ids = Some(match ids {
            Some(mut one) => {
                one.retain(|s| found.contains(s));
                one
            }
            None => found,
        });
    }
    let mut q = session_events::Entity::find().filter(C::OccurredAt.lte(at));
    if let Some(ids) = &ids {
        if ids.is_empty() {
            return Ok(PointInTimeReport::default());
        }
        q = q.filter(C::SessionId.is_in(ids.iter().map(String::as_str)));
    }
    let rows: Vec<AuditRow> = q
        .order_by_asc(C::SessionId)
        .order_by_asc(C::Seq)
        .into_model::<AuditRow>()
        .all(db)
        .await?;
    let mut by_session: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    let mut skipped = Vec::new();
    for r in rows {
        match r {
            AuditRow::Event { incoming, .. } => by_session
                .entry(incoming.event.session_id.to_string())
                .or_default()
                .push(incoming.event),
            AuditRow::Unreadable(s) => skipped.push(s),
        }
    }
    let sessions = by_session
        .into_iter()
        .filter_map(|(sid, events)| {
            let s = fold_contiguous(&events)?;
            Some(PointInTime {
                session_id: sid,
                status: s.status().as_str().to_owned(),
                seq: s.version(),
                state: serde_json::to_value(&s).unwrap_or(Value::Null),
            })
        })
        .collect();
    Ok(PointInTimeReport { sessions, skipped })
}

/// True when the audit database knows the session at all: an event row
/// (readable or not) or a snapshot.
pub async fn session_known(db: &impl ConnectionTrait, session_id: &str) -> Result<bool> {
    let events = session_events::Entity::find()
        .filter(session_events::Column::SessionId.eq(session_id))
        .count(db)
        .await?;
    if events > 0 {
        return Ok(true);
    }
    let snapshots = session_snapshots::Entity::find()
        .filter(session_snapshots::Column::SessionId.eq(session_id))
        .count(db)
        .await?;
    Ok(snapshots > 0)
}

/// Folds events from seq 1 for as long as they are contiguous.
pub(super) fn fold_contiguous(events: &[Event]) -> Option<Record> {
    fold_run(events.iter()).map(|(s, _)| s)
}

/// Folds events (in `seq` order) from seq 1 for as long as they are
/// contiguous; the state and how many events it took.
pub(super) fn fold_run<'a>(events: impl IntoIterator<Item = &'a Event>) -> Option<(Record, usize)> {
    let mut state: Option<Record> = None;
    let mut n = 0;
    for e in events {
        let next_seq = state.as_ref().map_or(1, |s| s.version() + 1);
        if e.seq != next_seq {
            break;
        }
        state = Some(state.unwrap_or_default().apply(e));
        n += 1;
    }
    state.map(|s| (s, n))
}

/// One `session_events` row as the readers of the audit trail take it: the
/// event, or why the row is not one. Decoding never fails the query.
#[derive(Debug, Clone)]
pub(crate) enum AuditRow {
    /// A row that decodes.
    Event {
        /// The event and its stream id.
        incoming: Incoming,
        /// When the audit database recorded it.
        recorded_at: DateTime<Utc>,
    },
    /// A row that does not.
    Unreadable(SkippedRow),
}

impl FromQueryResult for AuditRow {
    fn from_query_result(res: &QueryResult, pre: &str) -> std::result::Result<Self, DbErr> {
        let model = match session_events::Model::from_query_result(res, pre) {
            Ok(m) => m,
            Err(e) => {
                return Ok(AuditRow::Unreadable(SkippedRow {
                    session_id: res.try_get::<String>(pre, "session_id").unwrap_or_default(),
                    event_id: res
                        .try_get::<uuid::Uuid>(pre, "event_id")
                        .map(|u| u.to_string())
                        .unwrap_or_default(),
                    reason: format!("the row does not read: {e}"),
                }));
            }
        };
        let unreadable = |reason: String| {
            AuditRow::Unreadable(SkippedRow {
                session_id: model.session_id.clone(),
                event_id: model.event_id.to_string(),
                reason,
            })
        };
        if model.seq < 1 {
            // What an older build stored for a stream entry whose seq was
            // above the i64 range: the u64 wrapped to a negative number.
            return Ok(unreadable(format!(
                "seq {} is not a sequence number (as u64: {})",
                model.seq, model.seq as u64
            )));
        }
        Ok(match incoming_from_row(&model) {
            Ok(incoming) => AuditRow::Event {
                incoming,
                recorded_at: model.recorded_at,
            },
            Err(e) => unreadable(e.to_string()),
        })
    }
}
