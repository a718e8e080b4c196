//! [`state_at`]: sessions as they were at an instant, folded from the
//! audit trail without touching Redis.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait as _, DatabaseConnection, EntityTrait as _, QueryFilter as _, QueryOrder as _,
    QuerySelect as _,
};
use serde::Serialize;
use serde_json::Value;

use crate::audit::entity::session_events;
use crate::audit::sink::incoming_from_row;
use crate::error::Result;
use crate::event::Event;
use crate::session::Session;

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
pub async fn state_at(
    db: &DatabaseConnection,
    at: DateTime<Utc>,
    selection: &Selection,
) -> Result<Vec<PointInTime>> {
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
            return Ok(Vec::new());
        }
        q = q.filter(C::SessionId.is_in(ids.iter().map(String::as_str)));
    }
    let rows = q
        .order_by_asc(C::SessionId)
        .order_by_asc(C::Seq)
        .all(db)
        .await?;
    let mut by_session: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for r in &rows {
        by_session
            .entry(r.session_id.clone())
            .or_default()
            .push(incoming_from_row(r)?.event);
    }
    Ok(by_session
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
        .collect())
}

/// Folds events from seq 1 for as long as they are contiguous.
pub(super) fn fold_contiguous(events: &[Event]) -> Option<Session> {
    let mut state: Option<Session> = None;
    for e in events {
        let next_seq = state.as_ref().map_or(1, |s| s.version() + 1);
        if e.seq != next_seq {
            break;
        }
        state = Some(state.unwrap_or_default().apply(e));
    }
    state
}
