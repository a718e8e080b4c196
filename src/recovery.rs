//! Recovery: rebuilding Redis from the audit database, reading a session as
//! it was at any moment, and checking that Redis, the snapshots and the event
//! history agree.
//!
//! - [`replay`] re-materializes every live session (status `live`, deadline
//!   in the future) from its snapshot with its remaining TTL, rebuilds the
//!   ledger and both indexes, and lets versions continue from the database.
//!   It is idempotent and safe while app servers run: the `restore` script
//!   never overwrites a session whose Redis `seq` is the same or newer.
//! - [`state_at`] folds `session_events` up to an instant, without touching
//!   Redis (forensics).
//! - [`verify`] compares the three views and names every divergence; events
//!   still on their way from the stream to the database are reported as lag.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use chrono::{DateTime, Utc};
use redis::AsyncCommands as _;
use sea_orm::{
    ColumnTrait as _, DatabaseConnection, EntityTrait as _, QueryFilter as _, QueryOrder as _,
    QuerySelect as _,
};
use serde::Serialize;
use serde_json::Value;

use crate::audit::entity::session_snapshots::SnapshotStatus;
use crate::audit::entity::{session_events, session_snapshots};
use crate::audit::sink::incoming_from_row;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::id::SessionId;
use crate::session::Session;
use crate::store::SessionStore;
use crate::store::script::{self, Reply};

const PAGE: u64 = 5000;

/// What a replay did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ReplaySummary {
    /// Snapshot rows read.
    pub snapshots: u64,
    /// Sessions written back into Redis.
    pub restored: u64,
    /// Skipped: Redis already holds a newer version.
    pub skipped_newer: u64,
    /// Skipped: Redis already holds this version.
    pub already_current: u64,
    /// Live in the database but past their deadline.
    pub expired_meanwhile: u64,
    /// Ended sessions (destroyed or expired), not restored.
    pub destroyed: u64,
    /// Rows whose session id is not a session id (never written by the
    /// store), left alone.
    pub skipped_invalid: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Snapshot rows per second.
    pub sessions_per_sec: f64,
}

/// Rebuilds Redis from the snapshots. `progress` is called after each page
/// with (rows done, rows total).
pub async fn replay(
    store: &SessionStore,
    db: &DatabaseConnection,
    mut progress: impl FnMut(u64, u64),
) -> Result<ReplaySummary> {
    use sea_orm::PaginatorTrait as _;
    let started = Instant::now();
    let total = session_snapshots::Entity::find().count(db).await?;
    let mut conn = store.connection();
    script::load(&mut conn).await?;
    let keys = store.keys().clone();
    let tomb_ms = store.config().tombstone_ttl.as_millis() as u64;
    let mut summary = ReplaySummary::default();
    let mut after = String::new();
    loop {
        let rows = session_snapshots::Entity::find()
            .filter(session_snapshots::Column::SessionId.gt(after.as_str()))
            .order_by_asc(session_snapshots::Column::SessionId)
            .limit(PAGE)
            .all(db)
            .await?;
        let Some(last) = rows.last() else { break };
        after = last.session_id.clone();
        summary.snapshots += rows.len() as u64;
        // One pipeline per partition: a pipeline stays within one slot.
        let mut pipes: BTreeMap<u32, redis::Pipeline> = BTreeMap::new();
        for r in &rows {
            if r.status != SnapshotStatus::Live {
                summary.destroyed += 1;
                continue;
            }
            let Some(deadline) = r.expires_at else {
                summary.expired_meanwhile += 1;
                continue;
            };
            let Ok(id) = r.session_id.parse::<SessionId>() else {
                summary.skipped_invalid += 1;
                continue;
            };
            let part = keys.for_session(&id);
            let mut cmd = script::evalsha(part, "restore");
            cmd.arg(&r.session_id)
                .arg(&r.state)
                .arg(r.seq)
                .arg(r.user_id.as_deref().unwrap_or(""))
                .arg(deadline.timestamp_millis())
                .arg(tomb_ms);
            pipes
                .entry(part.partition)
                .or_insert_with(redis::pipe)
                .add_command(cmd);
        }
        for pipe in pipes.values() {
            let replies: Vec<Vec<String>> = match pipe.query_async(&mut conn).await {
                Ok(r) => r,
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    script::load(&mut conn).await?;
                    pipe.query_async(&mut conn).await?
                }
                Err(e) => return Err(e.into()),
            };
            for reply in replies {
                match script::decode(reply)? {
                    Reply::Ok(..) => summary.restored += 1,
                    Reply::Newer => summary.skipped_newer += 1,
                    Reply::Current => summary.already_current += 1,
                    Reply::Expired => summary.expired_meanwhile += 1,
                    other => {
                        return Err(Error::Corrupt(format!(
                            "restore: unexpected reply {other:?}"
                        )));
                    }
                }
            }
        }
        progress(summary.snapshots, total);
        if (rows.len() as u64) < PAGE {
            break;
        }
    }
    summary.seconds = started.elapsed().as_secs_f64();
    summary.sessions_per_sec = if summary.seconds > 0.0 {
        summary.snapshots as f64 / summary.seconds
    } else {
        0.0
    };
    Ok(summary)
}

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
fn fold_contiguous(events: &[Event]) -> Option<Session> {
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

/// One disagreement between Redis, the snapshot and the history.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Divergence {
    /// The session.
    pub session_id: String,
    /// `missing` (in Redis), `extra` (only in Redis), `different`, or `lag`.
    pub kind: String,
    /// `_version` in Redis.
    pub redis_version: Option<u64>,
    /// `seq` of the snapshot.
    pub snapshot_version: Option<u64>,
    /// Last contiguous `seq` of the event history.
    pub history_version: Option<u64>,
    /// What differs.
    pub detail: String,
}

/// The verdict of [`verify`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VerifyReport {
    /// True when there is no divergence (lag is not a divergence).
    pub ok: bool,
    /// Sessions looked at.
    pub checked: u64,
    /// Sessions whose three views agree.
    pub agree: u64,
    /// Sessions whose newest events are still on their way to the database.
    pub lag: Vec<Divergence>,
    /// Everything else that disagrees.
    pub divergences: Vec<Divergence>,
}

/// Compares live Redis keys, live snapshots and the fold of each session's
/// full history.
pub async fn verify(store: &SessionStore, db: &DatabaseConnection) -> Result<VerifyReport> {
    let keys = store.keys().clone();
    let mut conn = store.connection();
    // Redis: every session key of every partition, in one scan.
    let mut redis_state: HashMap<String, String> = HashMap::new();
    let mut in_stream: HashMap<String, u64> = HashMap::new();
    let mut redis_ids: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for k in conn.scan_all(&keys.session_pattern()).await? {
        if let Some((part, id)) = keys.split_key(&k, |p| &p.session_prefix)
            && id.len() == 64
        {
            redis_ids
                .entry(part.partition)
                .or_default()
                .push(id.to_owned());
        }
    }
    for part in keys.all() {
        let ids = redis_ids
            .get(&part.partition)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for chunk in ids.chunks(1000) {
            let names: Vec<String> = chunk
                .iter()
                .map(|i| format!("{}{i}", part.session_prefix))
                .collect();
            let values: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&names)
                .query_async(&mut conn)
                .await?;
            for (id, v) in chunk.iter().zip(values) {
                if let Some(v) = v {
                    redis_state.insert(id.clone(), v);
                }
            }
        }
        // The stream: the newest seq of each session still in it.
        let mut start = "-".to_owned();
        loop {
            let page: redis::streams::StreamRangeReply =
                conn.xrange_count(&part.stream, &start, "+", 1000).await?;
            let n = page.ids.len();
            for e in &page.ids {
                let sid: Option<String> = e.get("session_id");
                let seq: Option<u64> = e.get::<String>("seq").and_then(|s| s.parse::<u64>().ok());
                if let (Some(sid), Some(seq)) = (sid, seq) {
                    let m = in_stream.entry(sid).or_insert(0);
                    *m = (*m).max(seq);
                }
            }
            match page.ids.last() {
                Some(last) if n == 1000 => start = format!("({}", last.id),
                _ => break,
            }
        }
    }
    // The database: live snapshots, plus the snapshots of every Redis session.
    let now = Utc::now();
    let mut snapshots: HashMap<String, session_snapshots::Model> = HashMap::new();
    let live = session_snapshots::Entity::find()
        .filter(session_snapshots::Column::Status.eq(SnapshotStatus::Live))
        .all(db)
        .await?;
    snapshots.extend(live.into_iter().map(|s| (s.session_id.clone(), s)));
    let missing: Vec<&String> = redis_state
        .keys()
        .filter(|k| !snapshots.contains_key(*k))
        .collect();
    for chunk in missing.chunks(1000) {
        let rows = session_snapshots::Entity::find()
            .filter(session_snapshots::Column::SessionId.is_in(chunk.iter().map(|s| s.as_str())))
            .all(db)
            .await?;
        snapshots.extend(rows.into_iter().map(|s| (s.session_id.clone(), s)));
    }
    let ids: BTreeSet<String> = redis_state
        .keys()
        .chain(snapshots.keys())
        .cloned()
        .collect();
    let mut report = VerifyReport {
        ok: true,
        checked: 0,
        agree: 0,
        lag: Vec::new(),
        divergences: Vec::new(),
    };
    for id in ids {
        let redis = redis_state.get(&id);
        let snap = snapshots.get(&id);
        let redis_session = match redis.map(|j| Session::from_json(j)).transpose() {
            Ok(s) => s,
            Err(e) => {
                report.divergences.push(Divergence {
                    session_id: id.clone(),
                    kind: "different".to_owned(),
                    redis_version: None,
                    snapshot_version: snap.map(|s| s.seq as u64),
                    history_version: None,
                    detail: format!("the Redis value is not session JSON: {e}"),
                });
                report.checked += 1;
                continue;
            }
        };
        // Ended snapshots only matter when Redis still holds the session.
        if redis.is_none() && snap.is_some_and(|s| s.status != SnapshotStatus::Live) {
            continue;
        }
        report.checked += 1;
        let events = session_events::Entity::find()
            .filter(session_events::Column::SessionId.eq(id.as_str()))
            .order_by_asc(session_events::Column::Seq)
            .all(db)
            .await?;
        let events: Vec<Event> = events
            .iter()
            .map(|r| incoming_from_row(r).map(|i| i.event))
            .collect::<Result<_>>()?;
        let history = fold_contiguous(&events);
        let d = |kind: &str, detail: String| Divergence {
            session_id: id.clone(),
            kind: kind.to_owned(),
            redis_version: redis_session.as_ref().map(Session::version),
            snapshot_version: snap.map(|s| s.seq as u64),
            history_version: history.as_ref().map(Session::version),
            detail,
        };
        let snap_seq = snap.map(|s| s.seq as u64);
        // The database's own two views must agree.
        if let (Some(s), Some(h)) = (snap, &history)
            && (s.seq as u64 != h.version() || s.state != h.to_json())
        {
            report.divergences.push(d(
                "different",
                "the snapshot is not the fold of the history".to_owned(),
            ));
            continue;
        }
        match (&redis_session, snap) {
            (Some(r), Some(s)) if r.version() == s.seq as u64 => {
                if s.status != SnapshotStatus::Live {
                    report.divergences.push(d(
                        "different",
                        format!("live in Redis, {:?} in the database", s.status),
                    ));
                } else if redis.map(String::as_str) != Some(s.state.as_str()) {
                    report
                        .divergences
                        .push(d("different", "same version, different JSON".to_owned()));
                } else {
                    report.agree += 1;
                }
            }
            (Some(r), _) if r.version() > snap_seq.unwrap_or(0) => {
                if in_stream.get(&id).is_some_and(|m| *m >= r.version()) {
                    report
                        .lag
                        .push(d("lag", "newer events are still in the stream".to_owned()));
                } else if snap.is_none() {
                    report.divergences.push(d(
                        "extra",
                        "in Redis only, with no events on their way".to_owned(),
                    ));
                } else {
                    report.divergences.push(d(
                        "different",
                        "Redis is ahead of the database and the stream".to_owned(),
                    ));
                }
            }
            (Some(_), _) => {
                report
                    .divergences
                    .push(d("different", "Redis is behind the database".to_owned()));
            }
            (None, Some(s)) => {
                let expiring = s
                    .expires_at
                    .is_none_or(|t| t <= now + chrono::Duration::seconds(1));
                if expiring {
                    // Both agree that it ends now: Redis dropped the key at
                    // its deadline and the reaper has not written `expired`.
                    report.agree += 1;
                } else {
                    report.divergences.push(d(
                        "missing",
                        "live in the database, absent from Redis".to_owned(),
                    ));
                }
            }
            (None, None) => {}
        }
    }
    report.ok = report.divergences.is_empty();
    Ok(report)
}

/// Notices that Redis lost its data and rebuilds it, with no operator.
///
/// The worker keeps a marker key (`<ns>marker`) in Redis. When it is gone,
/// Redis was flushed or restarted empty: the healer sets the `<ns>recovering`
/// flag (app servers then serve misses from the audit snapshots), replays
/// every live session, sets the marker again and clears the flag. The audit
/// consumer re-creates its group by itself when it finds it missing.
#[derive(Debug, Clone)]
pub struct Healer {
    store: SessionStore,
    db: DatabaseConnection,
    interval: std::time::Duration,
}

/// What the healer has done.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct HealerTotals {
    /// Losses of Redis data detected.
    pub losses_detected: u64,
    /// Replays run.
    pub recoveries: u64,
    /// Sessions restored, over all replays.
    pub restored: u64,
}

impl Healer {
    /// A healer checking every `interval` (`HEAL_CHECK_MS`, 1000).
    pub fn new(store: SessionStore, db: DatabaseConnection, interval: std::time::Duration) -> Self {
        Healer {
            store,
            db,
            interval,
        }
    }

    /// Checks the markers once (one per partition); replays when one is
    /// missing. Replay is idempotent, so a loss of some partitions (one shard
    /// of a cluster) replays all and changes only what was lost.
    pub async fn check(&self) -> Result<Option<ReplaySummary>> {
        let keys = self.store.keys().clone();
        let mut conn = self.store.connection();
        let mut lost = 0;
        for part in keys.all() {
            if !conn.exists::<_, bool>(&part.marker).await? {
                lost += 1;
            }
        }
        if lost == 0 {
            return Ok(None);
        }
        tracing::warn!(
            partitions = lost,
            "the Redis marker is missing: Redis lost its data; replaying from the audit database"
        );
        let m = crate::telemetry::metrics();
        m.redis_loss_detected.add(1, &[]);
        m.recovery_runs.add(1, &[]);
        for part in keys.all() {
            let _: () = redis::cmd("SET")
                .arg(&part.recovering)
                .arg(Utc::now().to_rfc3339())
                .arg("PX")
                .arg(600_000)
                .query_async(&mut conn)
                .await?;
        }
        let summary = replay(&self.store, &self.db, |_, _| {}).await?;
        for part in keys.all() {
            let _: () = conn.set(&part.marker, Utc::now().to_rfc3339()).await?;
            let _: () = conn.del(&part.recovering).await?;
        }
        tracing::info!(
            restored = summary.restored,
            seconds = summary.seconds,
            "recovery finished"
        );
        Ok(Some(summary))
    }

    /// Checks until `shutdown` is cancelled.
    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) -> Result<HealerTotals> {
        let mut totals = HealerTotals::default();
        while !shutdown.is_cancelled() {
            match self.check().await {
                Ok(Some(s)) => {
                    totals.losses_detected += 1;
                    totals.recoveries += 1;
                    totals.restored += s.restored;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(err = %e, "recovery check failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
        Ok(totals)
    }
}
