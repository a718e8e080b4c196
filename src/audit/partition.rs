//! What the audit database knows about Redis, per partition (`partition_state`).
//!
//! Two facts live here, one row per stream:
//!
//! - **The Redis epoch.** Redis keeps a random epoch id beside the data
//!   (`<ns>epoch`). The healer records here the epoch of the data set it made
//!   complete; a Redis whose epoch key is missing or different from this one
//!   lost its data since, and the product is *recovering* until a replay has
//!   put the sessions back and recorded the new epoch. A stream without an
//!   epoch here is a fresh namespace: the first process to see it records
//!   the epoch Redis has (see `store::recovery`).
//! - **The audit consumer's progress.** `drained_at` is the last time the
//!   consumer had committed every entry of the stream; `redis_down_since`
//!   says since when it cannot reach Redis. An app server whose Redis is
//!   unreachable serves from the database only when the database holds
//!   everything Redis had acknowledged before it went away
//!   ([`PartitionState::current_when_redis_left`]).

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ConnectionTrait, EntityTrait as _, Set};

use super::entity::partition_state::{self, ActiveModel, Column, Entity};
use crate::error::Result;

pub use partition_state::Model as PartitionState;

/// How much older than the moment Redis went away the consumer's last drain
/// may be for the database to count as current: the consumer drains at
/// least once per `AUDIT_BLOCK_MS` while it can reach Redis, so this covers
/// blocks up to two seconds plus the commit.
pub const DRAIN_SLACK: chrono::Duration = chrono::Duration::milliseconds(3000);

impl PartitionState {
    /// True when the database held everything the stream had when Redis
    /// became unreachable, as far as the audit consumer can tell: it drained
    /// the stream less than [`DRAIN_SLACK`] before it lost Redis, or (when it
    /// still reaches Redis) less than [`DRAIN_SLACK`] before `now`.
    pub fn current_when_redis_left(&self, now: DateTime<Utc>) -> bool {
        let Some(drained) = self.drained_at else {
            return false;
        };
        let reference = self.redis_down_since.unwrap_or(now).min(now);
        drained >= reference - DRAIN_SLACK
    }
}

/// The row of `stream`, if any.
pub async fn load(db: &impl ConnectionTrait, stream: &str) -> Result<Option<PartitionState>> {
    Ok(Entity::find_by_id(stream.to_owned()).one(db).await?)
}

fn blank(stream: &str, now: DateTime<Utc>) -> ActiveModel {
    ActiveModel {
        stream: Set(stream.to_owned()),
        redis_epoch: Set(None),
        epoch_at: Set(None),
        drained_at: Set(None),
        redis_down_since: Set(None),
        redis_up_at: Set(None),
        updated_at: Set(now),
    }
}

/// The audit consumer committed every entry of `stream` that existed at
/// `at` and reaches Redis: records `drained_at` and clears
/// `redis_down_since`.
pub(crate) async fn record_drained(
    db: &impl ConnectionTrait,
    stream: &str,
    at: DateTime<Utc>,
) -> Result<()> {
    let mut row = blank(stream, Utc::now());
    row.drained_at = Set(Some(at));
    row.redis_up_at = Set(Some(at));
    Entity::insert(row)
        .on_conflict(
            OnConflict::column(Column::Stream)
                .update_columns([
                    Column::DrainedAt,
                    Column::RedisDownSince,
                    Column::RedisUpAt,
                    Column::UpdatedAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// The audit consumer cannot reach Redis since `since`: recorded unless an
/// earlier moment already is.
pub(crate) async fn record_redis_down(
    db: &impl ConnectionTrait,
    stream: &str,
    since: DateTime<Utc>,
) -> Result<()> {
    let mut row = blank(stream, Utc::now());
    row.redis_down_since = Set(Some(since));
    Entity::insert(row)
        .on_conflict(
            OnConflict::column(Column::Stream)
                .value(
                    Column::RedisDownSince,
                    Expr::cust(
                        "COALESCE(\"partition_state\".\"redis_down_since\", \
                         \"excluded\".\"redis_down_since\")",
                    ),
                )
                .update_column(Column::UpdatedAt)
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// A process reaches Redis while the database is open for writes (an
/// outage is over, for it): closes the database for writes (clears
/// `redis_down_since`) and records `redis_up_at`, before it writes to Redis
/// itself. Does nothing when the database is not open. Serialized with
/// [`open_for_writes`] by the row, so a write staged before is visible to
/// the caller afterwards, and none is staged after.
pub(crate) async fn reached_redis(db: &impl ConnectionTrait, stream: &str) -> Result<()> {
    use sea_orm::sea_query::{Expr, Value};
    use sea_orm::{ColumnTrait as _, QueryFilter as _};
    let now = Utc::now();
    Entity::update_many()
        .col_expr(
            Column::RedisDownSince,
            Expr::value(Value::ChronoDateTimeUtc(None)),
        )
        .col_expr(Column::RedisUpAt, Expr::value(now))
        .col_expr(Column::UpdatedAt, Expr::value(now))
        .filter(Column::Stream.eq(stream))
        .filter(Column::RedisDownSince.is_not_null())
        .exec(db)
        .await?;
    Ok(())
}

/// Whether the database stands in for Redis for `stream`, and since when:
/// `Some(since)`, the row's `redis_down_since` as stored, while Redis is
/// known unreachable (a process found it so), `None` while it is back for
/// others (a process reported it reachable less than `settle` ago). When
/// neither holds, the caller opens it: `redis_down_since` becomes now.
///
/// Open is not yet usable: an app server that still reaches Redis looks for
/// an open row every moment and closes it ([`reached_redis`]) before it uses
/// Redis again, so a process stages writes (or serves reads) only once the
/// same opening has stood longer than that look takes (see
/// `store::fallback`). Locks the row on PostgreSQL, so that it and
/// [`reached_redis`] are serialized.
pub(crate) async fn open_for_writes(
    txn: &impl ConnectionTrait,
    stream: &str,
    settle: chrono::Duration,
) -> Result<Option<DateTime<Utc>>> {
    let now = Utc::now();
    let row = locked(txn, stream).await?;
    if let Some(since) = row.as_ref().and_then(|r| r.redis_down_since) {
        return Ok(Some(since));
    }
    if row
        .as_ref()
        .and_then(|r| r.redis_up_at)
        .is_some_and(|up| now - up < settle)
    {
        return Ok(None);
    }
    let mut fresh = blank(stream, now);
    fresh.redis_down_since = Set(Some(now));
    Entity::insert(fresh)
        .on_conflict(
            OnConflict::column(Column::Stream)
                .update_columns([Column::RedisDownSince, Column::UpdatedAt])
                .to_owned(),
        )
        .exec_without_returning(txn)
        .await?;
    // As stored (a database may keep less precision than the clock).
    Ok(locked(txn, stream).await?.and_then(|r| r.redis_down_since))
}

/// Inside a staging transaction: true while the database still stands in
/// for Redis by the opening `since` that the caller waited out (nobody
/// reported Redis reachable since). Locks the row like [`open_for_writes`].
pub(crate) async fn still_open(
    txn: &impl ConnectionTrait,
    stream: &str,
    since: DateTime<Utc>,
) -> Result<bool> {
    let row = locked(txn, stream).await?;
    Ok(row.and_then(|r| r.redis_down_since) == Some(since))
}

/// True when the database stands in for Redis for any of `streams`.
pub(crate) async fn any_open(db: &impl ConnectionTrait, streams: &[&str]) -> Result<bool> {
    use sea_orm::{ColumnTrait as _, QueryFilter as _, QuerySelect as _};
    let one: Option<String> = Entity::find()
        .select_only()
        .column(Column::Stream)
        .filter(Column::Stream.is_in(streams.iter().copied()))
        .filter(Column::RedisDownSince.is_not_null())
        .limit(1)
        .into_tuple()
        .one(db)
        .await?;
    Ok(one.is_some())
}

/// The row of `stream`, locked for the transaction on PostgreSQL.
async fn locked(txn: &impl ConnectionTrait, stream: &str) -> Result<Option<PartitionState>> {
    use sea_orm::{QueryFilter as _, QuerySelect as _};
    let mut q = Entity::find().filter(sea_orm::ColumnTrait::eq(&Column::Stream, stream));
    if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
        q = q.lock_exclusive();
    }
    Ok(q.one(txn).await?)
}

/// Records `epoch` as the Redis data set this database knows complete.
pub(crate) async fn record_epoch(
    db: &impl ConnectionTrait,
    stream: &str,
    epoch: &str,
) -> Result<()> {
    let now = Utc::now();
    let mut row = blank(stream, now);
    row.redis_epoch = Set(Some(epoch.to_owned()));
    row.epoch_at = Set(Some(now));
    Entity::insert(row)
        .on_conflict(
            OnConflict::column(Column::Stream)
                .update_columns([Column::RedisEpoch, Column::EpochAt, Column::UpdatedAt])
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// Records `epoch` only when the database knows no epoch for `stream` yet (a
/// fresh namespace); returns the epoch the database holds afterwards.
pub(crate) async fn adopt_epoch(
    db: &impl ConnectionTrait,
    stream: &str,
    epoch: &str,
) -> Result<Option<String>> {
    let now = Utc::now();
    let mut row = blank(stream, now);
    row.redis_epoch = Set(Some(epoch.to_owned()));
    row.epoch_at = Set(Some(now));
    Entity::insert(row)
        .on_conflict(
            OnConflict::column(Column::Stream)
                .value(
                    Column::RedisEpoch,
                    Expr::cust(
                        "COALESCE(\"partition_state\".\"redis_epoch\", \"excluded\".\"redis_epoch\")",
                    ),
                )
                .value(
                    Column::EpochAt,
                    Expr::cust(
                        "COALESCE(\"partition_state\".\"epoch_at\", \"excluded\".\"epoch_at\")",
                    ),
                )
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(load(db, stream).await?.and_then(|r| r.redis_epoch))
}

/// Marks in Redis that an outage was seen on the partition whose outage key
/// is `key`: writes staged in the database meanwhile may not be in Redis
/// yet. Set (one random member per mark) by a process that reaches Redis
/// again after it found it unreachable, before it closes the database for
/// writes; it lets a process that cannot read the database tell whether
/// Redis may be behind it. See [`OutageMarks`].
pub(crate) async fn mark_outage(
    redis: &mut impl redis::aio::ConnectionLike,
    key: &str,
) -> redis::RedisResult<()> {
    redis::cmd("SADD")
        .arg(key)
        .arg(uuid::Uuid::new_v4().simple().to_string())
        .query_async(redis)
        .await
}

/// What Redis says of a partition's staged writes, read before a projection
/// (`<ns>outage`: the marks of outages not projected since; `<ns>staged`:
/// the sessions whose staged writes a projection left waiting).
#[derive(Debug, Default)]
pub(crate) struct OutageMarks {
    marks: Vec<String>,
    waiting: Vec<String>,
}

impl OutageMarks {
    /// Reads both sets.
    pub(crate) async fn read(
        redis: &mut impl redis::aio::ConnectionLike,
        outage: &str,
        staged: &str,
    ) -> redis::RedisResult<Self> {
        let (marks, waiting): (Vec<String>, Vec<String>) = redis::pipe()
            .cmd("SMEMBERS")
            .arg(outage)
            .cmd("SMEMBERS")
            .arg(staged)
            .query_async(redis)
            .await?;
        Ok(OutageMarks { marks, waiting })
    }

    /// After a projection that read every staged row of the partition:
    /// records the sessions it left `waiting`, forgets the ones it no longer
    /// found waiting, then clears the marks read before it (a mark set since,
    /// for a later outage, stays).
    pub(crate) async fn settle(
        &self,
        redis: &mut impl redis::aio::ConnectionLike,
        outage: &str,
        staged: &str,
        waiting: &std::collections::BTreeSet<String>,
    ) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        if !waiting.is_empty() {
            pipe.cmd("SADD").arg(staged).arg(waiting).ignore();
        }
        let done: Vec<&String> = self
            .waiting
            .iter()
            .filter(|id| !waiting.contains(*id))
            .collect();
        if !done.is_empty() {
            pipe.cmd("SREM").arg(staged).arg(done).ignore();
        }
        if !self.marks.is_empty() {
            pipe.cmd("SREM").arg(outage).arg(&self.marks).ignore();
        }
        if pipe.cmd_iter().next().is_none() {
            return Ok(());
        }
        pipe.query_async(redis).await
    }
}

/// Whether Redis may lack writes staged for `session_id`: an outage is
/// marked and not projected since, or a projection left the session's
/// staged writes waiting.
pub(crate) async fn may_lack_staged(
    redis: &mut impl redis::aio::ConnectionLike,
    outage: &str,
    staged: &str,
    session_id: &str,
) -> redis::RedisResult<bool> {
    let (marked, waiting): (bool, bool) = redis::pipe()
        .cmd("EXISTS")
        .arg(outage)
        .cmd("SISMEMBER")
        .arg(staged)
        .arg(session_id)
        .query_async(redis)
        .await?;
    Ok(marked || waiting)
}

/// Forgets that `session_id` had staged writes waiting (they are applied).
pub(crate) async fn applied_staged(
    redis: &mut impl redis::aio::ConnectionLike,
    staged: &str,
    session_id: &str,
) -> redis::RedisResult<()> {
    redis::cmd("SREM")
        .arg(staged)
        .arg(session_id)
        .query_async(redis)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(drained: Option<i64>, down: Option<i64>) -> PartitionState {
        let t = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).expect("in range");
        PartitionState {
            stream: "s".to_owned(),
            redis_epoch: None,
            epoch_at: None,
            drained_at: drained.map(t),
            redis_down_since: down.map(t),
            redis_up_at: None,
            updated_at: t(0),
        }
    }

    #[test]
    fn the_database_is_current_only_when_drained_just_before_redis_left() {
        let now = DateTime::from_timestamp(1_800_000_100, 0).expect("in range");
        // Never drained: nothing proves the database current.
        assert!(!state(None, Some(50)).current_when_redis_left(now));
        // Drained one second before the consumer lost Redis.
        assert!(state(Some(49), Some(50)).current_when_redis_left(now));
        // Drained a minute before (the database was down, or lagging).
        assert!(!state(Some(-10), Some(50)).current_when_redis_left(now));
        // The consumer still reaches Redis and drained a moment ago.
        assert!(state(Some(99), None).current_when_redis_left(now));
        // ... or long ago: it is stuck, the database may lag.
        assert!(!state(Some(60), None).current_when_redis_left(now));
    }
}
