//! What an operator does with dead letters (`vedfolnir-sessions dead-letters
//! list | retry | discard`): see them, write them once the cause is fixed,
//! or set them aside explicitly.
//!
//! A retry decodes the raw fields again (a newer build may now read a type
//! or a schema an older one refused) and writes the event with its original
//! `event_id`, `seq` and stream id through the same transaction as the
//! consumer's (snapshot lock, duplicate and conflict checks, the fold from
//! the table), so the session's snapshot moves past the gap. The dead letter
//! is deleted in that transaction when the event is in; otherwise it is kept
//! with the new reason.

use chrono::Utc;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait as _, DatabaseConnection, EntityTrait as _, QueryFilter as _, QueryOrder as _,
    QuerySelect as _,
};

use super::{AuditSink, Cause, Incoming, cause_of, refusal, storable_reason};
use crate::audit::entity::dead_letters;
use crate::error::Result;
use crate::event::Event;

/// Which dead letters to list.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    /// Only these rows (by `id`); all when empty.
    pub ids: Vec<i64>,
    /// Only those of this stream.
    pub stream: Option<String>,
    /// Only those of this session.
    pub session_id: Option<String>,
    /// Include the discarded ones (only those named by `ids` otherwise).
    pub discarded: bool,
    /// At most this many (0: all).
    pub limit: u64,
}

/// The dead letters `filter` selects, oldest first.
pub async fn list_dead_letters(
    db: &DatabaseConnection,
    filter: &DeadLetterFilter,
) -> Result<Vec<dead_letters::Model>> {
    use dead_letters::Column as C;
    let mut q = dead_letters::Entity::find().order_by_asc(C::Id);
    if !filter.ids.is_empty() {
        q = q.filter(C::Id.is_in(filter.ids.iter().copied()));
    } else if !filter.discarded {
        q = q.filter(C::DiscardedAt.is_null());
    }
    if let Some(stream) = &filter.stream {
        q = q.filter(C::Stream.eq(stream.as_str()));
    }
    if let Some(session) = &filter.session_id {
        q = q.filter(C::SessionId.eq(session.as_str()));
    }
    if filter.limit > 0 {
        q = q.limit(filter.limit);
    }
    Ok(q.all(db).await?)
}

/// Marks the dead letters `ids` as discarded (now); returns how many were
/// not discarded yet.
pub async fn discard_dead_letters(db: &DatabaseConnection, ids: &[i64]) -> Result<u64> {
    use dead_letters::Column as C;
    let mut n = 0;
    for chunk in ids.chunks(500) {
        n += dead_letters::Entity::update_many()
            .col_expr(C::DiscardedAt, Expr::value(Utc::now()))
            .filter(C::Id.is_in(chunk.iter().copied()))
            .filter(C::DiscardedAt.is_null())
            .exec(db)
            .await?
            .rows_affected;
    }
    Ok(n)
}

/// What a retry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The event is in the table now; the dead letter is gone.
    Written,
    /// The same event was already there; the dead letter is gone.
    Duplicate,
    /// Still refused; the dead letter is kept with this reason.
    Kept {
        /// The new reason.
        reason: String,
    },
}

/// Decodes a dead letter's raw fields (a JSON object of strings).
fn decode_fields(fields: &str) -> std::result::Result<Event, String> {
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(fields).map_err(|e| format!("the raw fields are not JSON: {e}"))?;
    if map.contains_key("_escaped") {
        return Err("the raw fields were stored escaped and cannot be decoded".to_owned());
    }
    let mut out = std::collections::HashMap::with_capacity(map.len());
    for (k, v) in map {
        match v {
            serde_json::Value::String(s) => {
                out.insert(k, s);
            }
            _ => return Err(format!("field `{k}` is not a string")),
        }
    }
    Event::from_fields(&out).map_err(|e| e.to_string())
}

impl AuditSink {
    /// Retries one dead letter (see the module docs). A failure of the
    /// connection or the server is an error, and the dead letter stays as it
    /// was.
    pub async fn retry_dead_letter(&self, row: &dead_letters::Model) -> Result<RetryOutcome> {
        let event = match decode_fields(&row.fields) {
            Ok(e) => e,
            Err(reason) => return self.keep(row, reason).await,
        };
        let stream_id = (!row.stream_id.starts_with("fallback-")).then(|| row.stream_id.clone());
        let incoming = Incoming { stream_id, event };
        let txn = crate::audit::db::begin(&self.db).await?;
        self.open(&txn, None).await?;
        match self.write_checked(&txn, &[&incoming], Utc::now()).await {
            Ok((out, refused)) => {
                if let Some(r) = refused.into_iter().next() {
                    txn.rollback().await?;
                    return self.keep(row, r.reason).await;
                }
                dead_letters::Entity::delete_by_id(row.id)
                    .exec(&txn)
                    .await?;
                txn.commit().await?;
                Ok(if out.inserted > 0 {
                    RetryOutcome::Written
                } else {
                    RetryOutcome::Duplicate
                })
            }
            Err(e) if cause_of(&e) == Cause::Entry => {
                txn.rollback().await?;
                self.keep(row, refusal(&e)).await
            }
            Err(e) => Err(e),
        }
    }

    /// Keeps the dead letter with its new reason.
    async fn keep(&self, row: &dead_letters::Model, reason: String) -> Result<RetryOutcome> {
        let reason = storable_reason(&reason);
        dead_letters::Entity::update_many()
            .col_expr(dead_letters::Column::Reason, Expr::value(reason.clone()))
            .filter(dead_letters::Column::Id.eq(row.id))
            .exec(&self.db)
            .await?;
        Ok(RetryOutcome::Kept { reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_fields_decode_again() {
        assert!(decode_fields("nope").is_err());
        assert!(decode_fields(r#"{"_escaped":"x"}"#).is_err());
        assert!(decode_fields(r#"{"seq":1}"#).is_err_and(|e| e.contains("not a string")));
        let e = crate::event::Event {
            event_id: uuid::Uuid::now_v7(),
            session_id: "ab".repeat(32).parse().expect("id"),
            seq: 2,
            occurred_at: crate::time::Timestamp::now(),
            user_id: None,
            schema: crate::event::SCHEMA_VERSION,
            kind: crate::event::EventKind::Destroyed {
                reason: crate::event::DestroyReason::Logout,
            },
            traceparent: None,
        };
        assert_eq!(decode_fields(&super::super::fields_json(&e)), Ok(e));
    }
}
