//! [`verify`]: Redis, the snapshots and the event history compared.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::Utc;
use redis::AsyncCommands as _;
use sea_orm::{
    ColumnTrait as _, DatabaseConnection, EntityTrait as _, QueryFilter as _, QueryOrder as _,
};
use serde::Serialize;

use crate::audit::entity::session_snapshots::SnapshotStatus;
use crate::audit::entity::{session_events, session_snapshots};
use crate::audit::sink::incoming_from_row;
use crate::error::Result;
use crate::event::Event;
use crate::session::Session;
use crate::store::SessionStore;

use super::state_at::fold_contiguous;

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
