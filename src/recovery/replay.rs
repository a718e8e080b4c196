//! [`replay`]: rebuilding Redis from the audit snapshots.

use std::collections::BTreeMap;
use std::time::Instant;

use chrono::Utc;
use sea_orm::{
    ColumnTrait as _, DatabaseConnection, EntityTrait as _, QueryFilter as _, QueryOrder as _,
    QuerySelect as _,
};
use serde::Serialize;

use crate::audit::entity::session_snapshots;
use crate::audit::entity::session_snapshots::SnapshotStatus;
use crate::error::{Error, Result};
use crate::id::SessionId;
use crate::store::SessionStore;
use crate::store::script::{self, Operation as _, Reply};

/// Snapshot rows per page (one pipeline per partition and page).
pub const PAGE: u64 = 5000;

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
    /// Live snapshots that Redis knows ended (a tombstone), not restored.
    pub ended_in_redis: u64,
    /// Live snapshots behind the event table (an event after the snapshot's
    /// seq: a gap to repair, see `verify`), not restored: the session's true
    /// state is not known, and restoring an older one could undo an end.
    pub behind_log: u64,
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
    // Every commit of an event of the lost data set is now either visible
    // here or refused by its own check (see `settle_writes`).
    crate::audit::settle_writes(db).await?;
    let total = session_snapshots::Entity::find().count(db).await?;
    let mut conn = store.connection();
    script::load(&mut conn).await?;
    let keys = store.keys().clone();
    let tomb_ms = store.config().tombstone_ttl.as_millis() as u64;
    let shape = script::Shape::of(store.config());
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
        let newest = newest_seqs(
            db,
            rows.iter()
                .filter(|r| r.status == SnapshotStatus::Live)
                .map(|r| r.session_id.as_str()),
        )
        .await?;
        // One pipeline per partition: a pipeline stays within one slot.
        let mut pipes: BTreeMap<u32, (redis::Pipeline, Vec<(SessionId, usize)>)> = BTreeMap::new();
        for (i, r) in rows.iter().enumerate() {
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
            if newest.get(&r.session_id).is_some_and(|n| *n > r.seq) {
                summary.behind_log += 1;
                continue;
            }
            let part = keys.for_session(&id);
            let cmd = script::Restore {
                id: &id,
                state: &r.state,
                seq: r.seq.max(0) as u64,
                user: r.user_id.as_deref().unwrap_or(""),
                deadline_ms: deadline.timestamp_millis(),
                tomb_ms,
                behind: None,
            }
            .fcall(part, shape);
            let (pipe, sent) = pipes
                .entry(part.partition)
                .or_insert_with(|| (redis::pipe(), Vec::new()));
            pipe.add_command(cmd);
            sent.push((id, i));
        }
        for (pipe, sent) in pipes.values() {
            let replies: Vec<Vec<String>> = match pipe.query_async(&mut conn).await {
                Ok(r) => r,
                Err(e) if script::not_loaded(&e) => {
                    script::load(&mut conn).await?;
                    pipe.query_async(&mut conn).await?
                }
                Err(e) => return Err(e.into()),
            };
            for (reply, (id, i)) in replies.into_iter().zip(sent) {
                let mut reply = script::decode(reply)?;
                if let Reply::Behind(_) = reply {
                    // Redis holds an older state: the store's restore names
                    // its user and tries again.
                    let r = &rows[*i];
                    let deadline = r.expires_at.unwrap_or_else(Utc::now);
                    reply = store
                        .restore_snapshot(
                            id,
                            &r.state,
                            r.seq.max(0) as u64,
                            r.user_id.as_deref(),
                            deadline,
                            true,
                        )
                        .await?;
                }
                match reply {
                    Reply::Ok(..) => summary.restored += 1,
                    Reply::Newer => summary.skipped_newer += 1,
                    Reply::Current => summary.already_current += 1,
                    Reply::Expired => summary.expired_meanwhile += 1,
                    Reply::Ended(_) => summary.ended_in_redis += 1,
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

/// The newest `seq` the event table holds for each of `ids`. On PostgreSQL
/// one backward probe of the unique `(session_id, seq)` index per session
/// (a `GROUP BY` over `IN (…)` scans the whole table until it is analyzed).
async fn newest_seqs<'a>(
    db: &DatabaseConnection,
    ids: impl Iterator<Item = &'a str>,
) -> Result<std::collections::HashMap<String, i64>> {
    use crate::audit::entity::session_events::{Column, Entity};
    use sea_orm::{ConnectionTrait as _, DbBackend, Statement};
    let ids: Vec<&str> = ids.collect();
    let mut out = std::collections::HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(1000) {
        if db.get_database_backend() == DbBackend::Postgres {
            let arg: Vec<String> = chunk.iter().map(|s| (*s).to_owned()).collect();
            let stmt = Statement::from_sql_and_values(
                DbBackend::Postgres,
                r#"SELECT s.id, (SELECT max(e."seq") FROM "session_events" e WHERE e."session_id" = s.id)
                   FROM unnest($1::text[]) AS s(id)"#,
                [arg.into()],
            );
            for row in db.query_all_raw(stmt).await? {
                let id: String = row.try_get_by_index(0)?;
                if let Some(n) = row.try_get_by_index::<Option<i64>>(1)? {
                    out.insert(id, n);
                }
            }
            continue;
        }
        let rows: Vec<(String, Option<i64>)> = Entity::find()
            .select_only()
            .column(Column::SessionId)
            .column_as(Column::Seq.max(), "newest")
            .filter(Column::SessionId.is_in(chunk.iter().copied()))
            .group_by(Column::SessionId)
            .into_tuple()
            .all(db)
            .await?;
        out.extend(rows.into_iter().filter_map(|(s, n)| Some((s, n?))));
    }
    Ok(out)
}
