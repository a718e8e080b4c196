//! The database sweep of overdue sessions: every end in the log, exactly
//! once, even when Redis no longer knows the session.
//!
//! The reaper works from Redis's expiry index and needs the session's ledger
//! to append the `expired` event. Two things leave a live snapshot in the
//! audit database with no end in the log:
//!
//! - the reaper was down longer than `SESSION_TOMBSTONE_TTL` after the
//!   deadline: the ledger is gone, the `expire` script answers `gone` and
//!   drops the index entry;
//! - the deadline passed just before Redis lost its data: replay skips the
//!   session (it is over), and nothing in Redis remembers it.
//!
//! [`OverdueSweeper`] looks at it from the other side: it finds live
//! snapshots whose deadline passed more than a grace period ago and settles
//! each one:
//!
//! - Redis still has the session's ledger, live: the `expired` event goes
//!   through the normal path (the store's `expire`, the same script as every
//!   mutation), after putting the session back into the expiry index if it
//!   had fallen out of it. The audit consumer then moves the snapshot.
//! - Redis has no ledger: the event is written straight into the audit
//!   database (`source` = `fallback`, `stream_id` null, `seq` = the table's
//!   last + 1), but only once the database provably holds everything the
//!   stream had: the audit consumer recorded a complete drain of the
//!   partition's stream (`partition_state.drained_at`) after the deadline
//!   and within the last [`DRAIN_SLACK`]. No event of the session can then
//!   still be on its way, so the seq cannot be one that a stream event
//!   holds.
//! - Otherwise (the key is still there, the ledger says the session ended,
//!   the consumer is behind) it waits for a later sweep.
//!
//! Two sweepers cannot write two `expired` events: the insert claims the
//! unique `(session_id, seq)` and the snapshot moves only from the `seq` and
//! status it was read with, in one transaction.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, Condition, DatabaseConnection, EntityTrait as _,
    QueryFilter as _, QueryOrder as _, QuerySelect as _, Set,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::audit::entity::session_events::{self, EventSource};
use crate::audit::entity::session_snapshots::{self, SnapshotStatus};
use crate::audit::partition::{self, DRAIN_SLACK};
use crate::config::{ConfigError, non_empty, parse};
use crate::error::{Error, Result};
use crate::event::{Event, EventKind, SCHEMA_VERSION};
use crate::id::SessionId;
use crate::recovery::layout;
use crate::session::Record;
use crate::store::SessionStore;
use crate::store::script::Shape;
use crate::time::Timestamp;

/// Settings of the database sweep.
#[derive(Debug, Clone)]
pub struct OverdueConfig {
    /// `REAPER_OVERDUE_INTERVAL_MS` (10000): pause between sweeps.
    pub interval: Duration,
    /// `REAPER_OVERDUE_GRACE_MS` (60000): how long past its deadline a live
    /// snapshot is left to the reaper before the sweep looks at it.
    pub grace: Duration,
    /// Snapshots read per page (500).
    pub batch: u64,
}

impl OverdueConfig {
    /// From the environment.
    pub fn from_env() -> std::result::Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// From a lookup function.
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
    ) -> std::result::Result<Self, ConfigError> {
        let var = non_empty(&get);
        Ok(OverdueConfig {
            interval: Duration::from_millis(parse(
                &var,
                "REAPER_OVERDUE_INTERVAL_MS",
                10_000,
                "milliseconds",
            )?),
            grace: Duration::from_millis(parse(
                &var,
                "REAPER_OVERDUE_GRACE_MS",
                60_000,
                "milliseconds",
            )?),
            batch: 500,
        })
    }
}

impl Default for OverdueConfig {
    fn default() -> Self {
        OverdueConfig {
            interval: Duration::from_secs(10),
            grace: Duration::from_secs(60),
            batch: 500,
        }
    }
}

/// What the sweep did with one overdue session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "snake_case")]
pub enum Settled {
    /// Its `expired` event was appended through Redis (the stream).
    ExpiredInRedis,
    /// Its `expired` event was written into the audit database.
    WrittenToDatabase,
    /// Another sweeper, the reaper or the audit consumer ended it first.
    AlreadyEnded,
    /// Not now; the reason.
    Waiting(String),
}

/// Totals of one sweep.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OverdueSweep {
    /// Overdue snapshots looked at.
    pub examined: u64,
    /// `expired` events appended through Redis.
    pub expired_in_redis: u64,
    /// `expired` events written into the audit database.
    pub written_to_database: u64,
    /// Left for a later sweep.
    pub waiting: u64,
}

/// The database sweep of overdue sessions. See the module docs.
#[derive(Debug, Clone)]
pub struct OverdueSweeper {
    store: SessionStore,
    db: DatabaseConnection,
    cfg: OverdueConfig,
}

impl OverdueSweeper {
    /// A sweeper over this store's Redis and this audit database.
    pub fn new(store: SessionStore, db: DatabaseConnection, cfg: OverdueConfig) -> Self {
        OverdueSweeper { store, db, cfg }
    }

    /// One sweep over every partition.
    pub async fn sweep(&self) -> Result<OverdueSweep> {
        self.sweep_on(None).await
    }

    /// One sweep over the sessions of partition `p` (the worker runs one per
    /// partition it holds).
    pub async fn sweep_partition(&self, p: u32) -> Result<OverdueSweep> {
        self.sweep_on(Some(p)).await
    }

    async fn sweep_on(&self, partition: Option<u32>) -> Result<OverdueSweep> {
        use session_snapshots::Column as C;
        let grace = chrono::Duration::from_std(self.cfg.grace).unwrap_or_default();
        let cutoff = Utc::now() - grace;
        let mut totals = OverdueSweep::default();
        // Keyset pages in deadline order: rows that stay live (waiting) are
        // not read twice in one sweep.
        let mut after: Option<(DateTime<Utc>, String)> = None;
        loop {
            let mut q = session_snapshots::Entity::find()
                .filter(C::Status.eq(SnapshotStatus::Live))
                .filter(C::ExpiresAt.lt(cutoff));
            if let Some((t, id)) = &after {
                q = q.filter(
                    Condition::any().add(C::ExpiresAt.gt(*t)).add(
                        Condition::all()
                            .add(C::ExpiresAt.eq(*t))
                            .add(C::SessionId.gt(id.as_str())),
                    ),
                );
            }
            let rows = q
                .order_by_asc(C::ExpiresAt)
                .order_by_asc(C::SessionId)
                .limit(self.cfg.batch)
                .all(&self.db)
                .await?;
            let full = rows.len() as u64 >= self.cfg.batch;
            for row in &rows {
                let Ok(id) = row.session_id.parse::<SessionId>() else {
                    continue;
                };
                if partition.is_some_and(|p| self.store.keys().partition_of(&id) != p) {
                    continue;
                }
                totals.examined += 1;
                match self.settle(row).await {
                    Ok(Settled::ExpiredInRedis) => totals.expired_in_redis += 1,
                    Ok(Settled::WrittenToDatabase) => totals.written_to_database += 1,
                    Ok(Settled::AlreadyEnded) => {}
                    Ok(Settled::Waiting(why)) => {
                        tracing::debug!(session_id = %id, reason = %why, "overdue session left for later");
                        totals.waiting += 1;
                    }
                    Err(e) => {
                        tracing::warn!(session_id = %id, err = %e, "settling an overdue session failed");
                        totals.waiting += 1;
                    }
                }
            }
            match rows.last() {
                Some(last) if full => {
                    after = last.expires_at.map(|t| (t, last.session_id.clone()));
                    if after.is_none() {
                        break;
                    }
                }
                _ => break,
            }
        }
        Ok(totals)
    }

    /// Settles one live snapshot whose deadline has passed (the caller
    /// decides how long ago is enough): appends its `expired` event through
    /// Redis or into the database, exactly once, or says why not now.
    pub async fn settle(&self, snapshot: &session_snapshots::Model) -> Result<Settled> {
        let Some(deadline) = snapshot.expires_at else {
            return Ok(Settled::Waiting("the snapshot has no deadline".to_owned()));
        };
        if snapshot.status != SnapshotStatus::Live {
            return Ok(Settled::AlreadyEnded);
        }
        let id: SessionId = snapshot
            .session_id
            .parse()
            .map_err(|e| Error::InvalidInput(format!("snapshot {:?}: {e}", snapshot.session_id)))?;
        let seq = u64::try_from(snapshot.seq)
            .map_err(|_| Error::Corrupt(format!("snapshot of {id}: seq {}", snapshot.seq)))?;
        let keys = self.store.keys().for_session(&id);
        let mut conn = self.store.connection();
        let shape = Shape::of(self.store.config());
        let view = layout::inspect(&mut conn, keys, shape, id.as_str(), &[]).await?;
        if view.now_ms < deadline.timestamp_millis() {
            return Ok(Settled::Waiting(
                "not past its deadline on Redis's clock".to_owned(),
            ));
        }
        if view.json.is_some() {
            return Ok(Settled::Waiting(
                "Redis still holds the session: its newer events are on their way".to_owned(),
            ));
        }
        match &view.ledger {
            Some(l) if l.live() => {
                let score = match view.expiry {
                    Some(s) => s,
                    None => {
                        // Fallen out of the expiry index: put it back, so
                        // that the one script path appends the end.
                        let d = deadline.timestamp_millis();
                        layout::requeue(&mut conn, keys, shape, id.as_str(), l.seq, d).await?;
                        layout::inspect(&mut conn, keys, shape, id.as_str(), &[])
                            .await?
                            .expiry
                            .unwrap_or(d as f64)
                    }
                };
                if score > view.now_ms as f64 {
                    return Ok(Settled::Waiting(
                        "the expiry index puts its deadline ahead".to_owned(),
                    ));
                }
                if self.store.expire(&id, score).await? {
                    crate::telemetry::metrics().expired.add(1, &[]);
                    Ok(Settled::ExpiredInRedis)
                } else {
                    Ok(Settled::AlreadyEnded)
                }
            }
            Some(l) => Ok(Settled::Waiting(format!(
                "Redis ended it ({} at seq {}); the end is on its way to the database",
                l.status, l.seq
            ))),
            None if view.ledger_raw.is_some() => Ok(Settled::Waiting(
                "its ledger in Redis does not parse".to_owned(),
            )),
            None => {
                let state = partition::load(&self.db, &keys.stream).await?;
                let drained = state.and_then(|s| s.drained_at);
                let now = Utc::now();
                match drained {
                    Some(d) if d >= deadline + DRAIN_SLACK && d >= now - DRAIN_SLACK => {
                        self.write_expired(&id, seq, snapshot, deadline).await
                    }
                    _ => Ok(Settled::Waiting(
                        "the audit consumer has not drained the stream since the deadline"
                            .to_owned(),
                    )),
                }
            }
        }
    }

    /// Appends the `expired` event at `seq + 1` straight into the database
    /// and moves the snapshot, in one transaction; nothing when the session
    /// moved since `snapshot` was read.
    async fn write_expired(
        &self,
        id: &SessionId,
        seq: u64,
        snapshot: &session_snapshots::Model,
        deadline: DateTime<Utc>,
    ) -> Result<Settled> {
        use session_events::Column as E;
        use session_snapshots::Column as S;
        let txn = crate::audit::db::begin(&self.db).await?;
        let last: Option<Option<i64>> = session_events::Entity::find()
            .select_only()
            .column_as(E::Seq.max(), "max_seq")
            .filter(E::SessionId.eq(id.as_str()))
            .into_tuple()
            .one(&txn)
            .await?;
        if last.flatten() != Some(snapshot.seq) {
            txn.rollback().await?;
            return Ok(Settled::Waiting(format!(
                "the audit trail ends at seq {:?}, the snapshot at {}",
                last.flatten(),
                snapshot.seq
            )));
        }
        let state = Record::from_json(&snapshot.state)
            .map_err(|e| Error::Corrupt(format!("snapshot of {id}: {e}")))?;
        let occurred_at = Timestamp::now();
        let event = Event {
            event_id: Uuid::now_v7(),
            session_id: id.clone(),
            seq: seq + 1,
            occurred_at,
            user_id: snapshot.user_id.clone(),
            schema: SCHEMA_VERSION,
            kind: EventKind::Expired {
                deadline: Timestamp::from_datetime(deadline),
            },
            traceparent: None,
        };
        let ended = state.apply(&event);
        let row = session_events::ActiveModel {
            id: Default::default(),
            event_id: Set(event.event_id),
            session_id: Set(id.to_string()),
            seq: Set(event.seq as i64),
            event_type: Set(event.kind.type_name().to_owned()),
            user_id: Set(event.user_id.clone()),
            occurred_at: Set(occurred_at.datetime()),
            recorded_at: Set(Utc::now()),
            stream_id: Set(None),
            schema_version: Set(SCHEMA_VERSION as i32),
            payload: Set(event.kind.payload_json()),
            traceparent: Set(None),
            source: Set(EventSource::Fallback),
        };
        if let Err(e) = row.insert(&txn).await {
            txn.rollback().await?;
            return match e.sql_err() {
                Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) => Ok(Settled::AlreadyEnded),
                _ => Err(e.into()),
            };
        }
        let moved = session_snapshots::Entity::update_many()
            .col_expr(S::State, Expr::value(ended.to_json()))
            .col_expr(S::Seq, Expr::value(event.seq as i64))
            .col_expr(S::Status, Expr::value(SnapshotStatus::Expired))
            .col_expr(S::ExpiresAt, Expr::value(Option::<DateTime<Utc>>::None))
            .col_expr(S::UpdatedAt, Expr::value(Utc::now()))
            .filter(S::SessionId.eq(id.as_str()))
            .filter(S::Seq.eq(snapshot.seq))
            .filter(S::Status.eq(SnapshotStatus::Live))
            .exec(&txn)
            .await?;
        if moved.rows_affected != 1 {
            txn.rollback().await?;
            return Ok(Settled::AlreadyEnded);
        }
        txn.commit().await?;
        crate::telemetry::metrics().expired.add(1, &[]);
        tracing::info!(session_id = %id, seq = event.seq, "expired in the audit database (no ledger left in Redis)");
        Ok(Settled::WrittenToDatabase)
    }

    /// Sweeps partition `p` until `shutdown` is cancelled.
    pub async fn run_partition(self, p: u32, shutdown: CancellationToken) -> Result<u64> {
        let mut total = 0u64;
        while !shutdown.is_cancelled() {
            match self.sweep_partition(p).await {
                Ok(s) => total += s.expired_in_redis + s.written_to_database,
                Err(e) => tracing::warn!(err = %e, "overdue sweep failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.cfg.interval) => {}
            }
        }
        Ok(total)
    }
}
