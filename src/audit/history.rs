//! Reading the audit trail: a session's history, or a user's over a time range.

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait as _, DatabaseConnection, EntityTrait as _, QueryFilter as _, QueryOrder as _,
    QuerySelect as _,
};
use serde::Serialize;
use serde_json::Value;

use super::entity::session_events;
use crate::error::Result;
use crate::time::Timestamp;

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    /// One session's events, in `seq` order.
    pub session_id: Option<String>,
    /// One user's events, in time order.
    pub user_id: Option<String>,
    /// Events that occurred at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// Events that occurred before this instant.
    pub until: Option<DateTime<Utc>>,
    /// At most this many rows (0 = no limit).
    pub limit: u64,
}

/// One row of the audit trail.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryRow {
    /// The session.
    pub session_id: String,
    /// Its place in the session's history.
    pub seq: i64,
    /// `created`, `updated`, …
    pub event_type: String,
    /// The writer's clock.
    pub occurred_at: String,
    /// The user after the event.
    pub user_id: Option<String>,
    /// The payload object.
    pub payload: Value,
    /// The event's idempotency key.
    pub event_id: String,
    /// The stream entry id (`null` for fallback writes).
    pub stream_id: Option<String>,
    /// `stream` or `fallback`.
    pub source: String,
    /// When the audit database recorded it.
    pub recorded_at: String,
    /// The trace of the request that caused it.
    pub traceparent: Option<String>,
}

/// Reads the audit trail.
pub async fn history(db: &DatabaseConnection, q: &HistoryQuery) -> Result<Vec<HistoryRow>> {
    use session_events::Column as C;
    let mut sel = session_events::Entity::find();
    if let Some(s) = &q.session_id {
        sel = sel.filter(C::SessionId.eq(s.as_str()));
    }
    if let Some(u) = &q.user_id {
        sel = sel.filter(C::UserId.eq(u.as_str()));
    }
    if let Some(t) = q.since {
        sel = sel.filter(C::OccurredAt.gte(t));
    }
    if let Some(t) = q.until {
        sel = sel.filter(C::OccurredAt.lt(t));
    }
    sel = if q.session_id.is_some() {
        sel.order_by_asc(C::Seq)
    } else {
        sel.order_by_asc(C::OccurredAt)
            .order_by_asc(C::SessionId)
            .order_by_asc(C::Seq)
    };
    if q.limit > 0 {
        sel = sel.limit(q.limit);
    }
    let rows = sel.all(db).await?;
    Ok(rows
        .into_iter()
        .map(|r| HistoryRow {
            payload: serde_json::from_str(&r.payload).unwrap_or(Value::String(r.payload.clone())),
            session_id: r.session_id,
            seq: r.seq,
            event_type: r.event_type,
            occurred_at: Timestamp::from_datetime(r.occurred_at).to_string(),
            user_id: r.user_id,
            event_id: r.event_id.to_string(),
            stream_id: r.stream_id,
            source: match r.source {
                session_events::EventSource::Stream => "stream".to_owned(),
                session_events::EventSource::Fallback => "fallback".to_owned(),
            },
            recorded_at: Timestamp::from_datetime(r.recorded_at).to_string(),
            traceparent: r.traceparent,
        })
        .collect())
}

/// The rows as a readable table.
pub fn render_table(rows: &[HistoryRow]) -> String {
    let mut out = format!(
        "{:<16}  {:>5}  {:<17}  {:<32}  {:<8}  {}\n",
        "SESSION", "SEQ", "TYPE", "OCCURRED_AT", "USER", "PAYLOAD"
    );
    for r in rows {
        let mut payload = r.payload.to_string();
        if payload.len() > 100 {
            let cut = (0..=97)
                .rev()
                .find(|i| payload.is_char_boundary(*i))
                .unwrap_or(0);
            payload.truncate(cut);
            payload.push('…');
        }
        out.push_str(&format!(
            "{:<16}  {:>5}  {:<17}  {:<32}  {:<8}  {}\n",
            &r.session_id[..r.session_id.len().min(16)],
            r.seq,
            r.event_type,
            r.occurred_at,
            r.user_id.as_deref().unwrap_or("-"),
            payload
        ));
    }
    out
}
