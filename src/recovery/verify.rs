//! [`verify`]: Redis, the snapshots and the event history compared, session
//! by session; [`verify_with`] with `repair` puts right what the log says how
//! to put right.
//!
//! # What is looked at
//!
//! Every session Redis holds (a key, or an entry of an expiry index) and
//! every live snapshot:
//!
//! - **the audit trail on its own**: rows that do not decode
//!   (`unreadable_event`; the rest of the database is still checked), a gap
//!   in the session's seqs (`seq_gap`: lag while the rows after it are
//!   younger than the grace period, a divergence after), the snapshot
//!   against the fold of the events (`snapshot`, `history_missing`);
//! - **the key against the log**: the same version and JSON as the fold
//!   (`different` otherwise), or a newer version whose events are still in
//!   the stream (lag); a key the log knows nothing of (`extra`); a session
//!   live in the log with time left but gone from Redis (`missing`);
//! - **the key's derived state**: its TTL against the snapshot's deadline,
//!   the ledger (seq, status, user), the expiry index and the user index,
//!   checked by the [`layout`](super::layout) module, which holds all the
//!   knowledge of the Redis layout;
//! - **ends**: a session whose deadline passed more than the grace period
//!   ago and whose end is not in the log (`end_missing`).
//!
//! # Reading under load
//!
//! Each look at a session reads how far the audit group has acknowledged
//! the stream, then the database (one transaction), then Redis (one script
//! call: key, TTL, ledger, indexes, atomically), then the stream's new
//! entries. In that order a healthy system never shows the database ahead
//! of Redis, nor Redis ahead of the database and the events on their way. A session
//! that disagrees is read again on its own, up to
//! [`VerifyOptions::rereads`] times with growing pauses: it is reported only
//! when a second look sees exactly what the first saw (nothing moved), or
//! when it disagreed on every look. A write in flight is therefore never a
//! divergence, and damage (which stops writes, or is carried forward by
//! them) always is.
//!
//! # Repair
//!
//! With [`VerifyOptions::repair`], each confirmed divergence that the log
//! determines is put right, then the session is looked at again:
//!
//! - the key, its TTL, the ledger and both indexes are rewritten from the
//!   log's state of the session (`repair.lua`, only if the key still holds
//!   what was inspected): `ledger_*`, `ttl_*`, `*_index_*`, `different` at
//!   the log's version, `missing`;
//! - a session past its deadline that fell out of the expiry index is put
//!   back, so the reaper appends its end;
//! - a snapshot that is not the fold of its events is rebuilt (only from
//!   the version it was read at);
//! - a missing end is settled by the [`OverdueSweeper`].
//!
//! What the log cannot tell (a gap in the trail, an unreadable row, a key
//! ahead of the log, a key of an ended session) stays a divergence.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::AsyncCommands as _;
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    AccessMode, ColumnTrait as _, DatabaseConnection, DbBackend, EntityTrait as _, IsolationLevel,
    QueryFilter as _, QueryOrder as _, QuerySelect as _, Set,
};
use serde::Serialize;

use super::layout::{self, Expected, RedisView, Reindexed, TOLERANCE_MS};
use super::state_at::{AuditRow, SkippedRow, fold_run};
use crate::audit::entity::session_events;
use crate::audit::entity::session_snapshots::{self, SnapshotStatus};
use crate::audit::sink::snapshot_status;
use crate::audit::{AuditSink, Incoming};
use crate::conn::RedisConn;
use crate::error::Result;
use crate::id::SessionId;
use crate::reaper::{OverdueConfig, OverdueSweeper, Settled};
use crate::session::{Record, Status};
use crate::store::SessionStore;
use crate::store::script::Shape;

/// Sessions read per page of the first look (bounds the memory a check
/// takes, whatever the size of the database).
const PAGE: usize = 1000;

/// One disagreement between Redis, the snapshot and the history.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Divergence {
    /// The session.
    pub session_id: String,
    /// What is wrong, one word: `missing` (in Redis), `extra` (only in
    /// Redis), `different`, `snapshot`, `history_missing`, `seq_gap`,
    /// `unreadable_event`, `end_missing`, or one of the layout's kinds
    /// (`ledger_missing`, `ledger_seq`, `ttl_missing`,
    /// `expiry_index_missing`, `user_index_missing`, …; see
    /// `docs/recovery.md`). In the lag list: `lag` or `seq_gap`.
    pub kind: String,
    /// `_version` in Redis.
    pub redis_version: Option<u64>,
    /// `seq` of the snapshot.
    pub snapshot_version: Option<u64>,
    /// Last contiguous `seq` of the event history.
    pub history_version: Option<u64>,
    /// What differs, with the values seen.
    pub detail: String,
}

/// One thing `verify --repair` put right.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Repair {
    /// The session.
    pub session_id: String,
    /// The kind of divergence it had (as in [`Divergence::kind`]).
    pub kind: String,
    /// What was done.
    pub action: String,
}

/// The verdict of [`verify`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VerifyReport {
    /// True when there is no divergence (lag is not a divergence; with
    /// repair, what was repaired is not either).
    pub ok: bool,
    /// Sessions looked at.
    pub checked: u64,
    /// Sessions whose views agree.
    pub agree: u64,
    /// Sessions whose newest events are still on their way to the database.
    pub lag: Vec<Divergence>,
    /// Everything else that disagrees (after repair: what is left).
    pub divergences: Vec<Divergence>,
    /// With repair: what was put right.
    pub repaired: Vec<Repair>,
}

/// How [`verify_with`] works.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Put right what the log determines (see the module docs).
    pub repair: bool,
    /// How old a gap in the audit trail, or an overdue end, must be to count
    /// as a divergence (60 s): younger ones may still be filling in.
    pub grace: Duration,
    /// How often a disagreeing session is read again before it is reported (4).
    pub rereads: u32,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            repair: false,
            grace: Duration::from_secs(60),
            rereads: 4,
        }
    }
}

/// Compares Redis, the snapshots and the fold of each session's history
/// (see the module docs), without changing anything.
pub async fn verify(store: &SessionStore, db: &DatabaseConnection) -> Result<VerifyReport> {
    verify_with(store, db, &VerifyOptions::default()).await
}

/// [`verify`] with options: the grace period, re-reads, and repair.
pub async fn verify_with(
    store: &SessionStore,
    db: &DatabaseConnection,
    opts: &VerifyOptions,
) -> Result<VerifyReport> {
    let mut checker = Checker {
        store,
        db,
        opts,
        sink: AuditSink::new(db.clone(), store.config().session_timeout, String::new()),
        conn: store.connection(),
        stream: StreamLog::new(store.keys().partitions() as usize),
        tomb_ms: store.config().tombstone_ttl.as_millis() as i64,
        shape: Shape::of(store.config()),
    };
    checker.run().await
}

/// A stream entry id, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
struct StreamPos(u64, u64);

impl StreamPos {
    fn parse(id: &str) -> Option<StreamPos> {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        Some(StreamPos(ms.parse().ok()?, seq.parse().ok()?))
    }
}

/// How far the audit group has got in one partition's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GroupState {
    /// No group (yet): the consumer will read the stream from its start.
    Missing,
    /// The last entry delivered, and the range of entries delivered but not
    /// acknowledged.
    At {
        last_delivered: StreamPos,
        pending: Option<(StreamPos, StreamPos)>,
    },
}

/// The stream entries seen so far, per session (seq → partition and entry
/// id), and how far the audit group had got before the database was read.
/// Entries are read incrementally, so that every look can be followed by a
/// read of what was appended since.
///
/// An entry is *on its way* to the database when the audit group had not
/// acknowledged it before the database was read ([`StreamLog::progress`]):
/// it was not yet delivered, or pending. An entry acknowledged before then
/// was committed before then, so the database read holds it; acknowledged
/// entries stay in the stream for `AUDIT_STREAM_RETENTION_SECS` but explain
/// no lag. (Reading the group's progress after the database would take an
/// entry committed in between for one the database lost.)
#[derive(Debug)]
struct StreamLog {
    group: String,
    /// Per partition, where the next read starts.
    from: Vec<String>,
    groups: Vec<GroupState>,
    seen: HashMap<String, BTreeMap<u64, (usize, String)>>,
}

impl StreamLog {
    fn new(partitions: usize) -> Self {
        StreamLog {
            group: crate::audit::ConsumerConfig::default().group,
            from: vec!["-".to_owned(); partitions],
            groups: vec![GroupState::Missing; partitions],
            seen: HashMap::new(),
        }
    }

    /// Records how far the audit group has got: call it before the
    /// database is read.
    async fn progress(&mut self, conn: &mut RedisConn, store: &SessionStore) -> Result<()> {
        for (i, part) in store.keys().all().iter().enumerate() {
            let groups: redis::RedisResult<redis::streams::StreamInfoGroupsReply> =
                conn.xinfo_groups(&part.stream).await;
            let at = groups.ok().and_then(|g| {
                g.groups
                    .into_iter()
                    .find(|g| g.name == self.group)
                    .and_then(|g| StreamPos::parse(&g.last_delivered_id))
            });
            self.groups[i] = match at {
                None => GroupState::Missing,
                Some(last_delivered) => {
                    let pending: redis::streams::StreamPendingReply =
                        conn.xpending(&part.stream, &self.group).await?;
                    let pending = match pending {
                        redis::streams::StreamPendingReply::Data(d) if d.count > 0 => {
                            StreamPos::parse(&d.start_id).zip(StreamPos::parse(&d.end_id))
                        }
                        _ => None,
                    };
                    GroupState::At {
                        last_delivered,
                        pending,
                    }
                }
            };
        }
        Ok(())
    }

    /// Reads what was appended since the last call: call it after Redis is
    /// read, so that every event Redis showed is seen.
    async fn catch_up(&mut self, conn: &mut RedisConn, store: &SessionStore) -> Result<()> {
        const PAGE: usize = 1000;
        for (i, part) in store.keys().all().iter().enumerate() {
            loop {
                let page: redis::streams::StreamRangeReply = conn
                    .xrange_count(&part.stream, &self.from[i], "+", PAGE)
                    .await?;
                for e in &page.ids {
                    let sid: Option<String> = e.get("session_id");
                    let seq: Option<u64> = e.get::<String>("seq").and_then(|s| s.parse().ok());
                    if let (Some(sid), Some(seq)) = (sid, seq) {
                        self.seen
                            .entry(sid)
                            .or_default()
                            .insert(seq, (i, e.id.clone()));
                    }
                }
                if let Some(last) = page.ids.last() {
                    self.from[i] = format!("({}", last.id);
                }
                if page.ids.len() < PAGE {
                    break;
                }
            }
        }
        Ok(())
    }

    fn on_its_way(&self, part: usize, id: &str) -> bool {
        let Some(pos) = StreamPos::parse(id) else {
            return false;
        };
        match self.groups.get(part) {
            Some(GroupState::At {
                last_delivered,
                pending,
            }) => pos > *last_delivered || pending.is_some_and(|(a, b)| pos >= a && pos <= b),
            _ => true,
        }
    }

    /// True when seq `seq` of the session is in the stream, on its way.
    fn in_flight(&self, id: &str, seq: u64) -> bool {
        self.seen
            .get(id)
            .and_then(|m| m.get(&seq))
            .is_some_and(|(p, xid)| self.on_its_way(*p, xid))
    }

    /// The newest seq of the session on its way to the database.
    fn newest_in_flight(&self, id: &str) -> Option<u64> {
        self.seen
            .get(id)?
            .iter()
            .rev()
            .find_map(|(seq, (p, xid))| self.on_its_way(*p, xid).then_some(*seq))
    }

    fn stream_id(&self, id: &str, seq: u64) -> Option<&str> {
        self.seen.get(id)?.get(&seq).map(|(_, x)| x.as_str())
    }
}

/// The audit database's view of one session.
#[derive(Debug, Clone, Default)]
struct DbView {
    snapshot: Option<session_snapshots::Model>,
    /// Readable events in seq order, with when they were recorded.
    events: Vec<(Incoming, DateTime<Utc>)>,
    unreadable: Vec<SkippedRow>,
}

impl DbView {
    fn push(&mut self, row: AuditRow) {
        match row {
            AuditRow::Event {
                incoming,
                recorded_at,
            } => self.events.push((incoming, recorded_at)),
            AuditRow::Unreadable(s) => self.unreadable.push(s),
        }
    }
}

/// One look at a session: the database, then Redis.
#[derive(Debug, Clone)]
struct Look {
    db: DbView,
    redis: RedisView,
}

/// How a finding can be put right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Fix {
    Reindex,
    Requeue,
    Snapshot,
    Settle,
}

#[derive(Debug, Clone)]
struct Finding {
    kind: String,
    detail: String,
    fix: Option<Fix>,
}

/// What one look at a session says.
#[derive(Debug, Clone, Default)]
struct Judgement {
    /// Worth counting: Redis holds it, or the log says it lives, or
    /// something is wrong with it.
    counted: bool,
    problems: Vec<Finding>,
    lag: Vec<Finding>,
    /// The JSON names a user whose index was not read: look again with it.
    reinspect_user: Option<String>,
    /// Users whose index to read on the next look.
    users: Vec<String>,
    /// For repair: the state Redis must hold (and what it held).
    reindex: Option<(Option<String>, Expected)>,
    requeue: Option<(u64, i64)>,
    snapshot: Option<session_snapshots::Model>,
    redis_version: Option<u64>,
    snapshot_version: Option<u64>,
    history_version: Option<u64>,
    /// Everything the look saw that changes when the session changes.
    fingerprint: String,
}

impl Judgement {
    fn problem(&mut self, kind: &str, detail: impl Into<String>, fix: Option<Fix>) {
        self.problems.push(Finding {
            kind: kind.to_owned(),
            detail: detail.into(),
            fix,
        });
    }

    fn lagging(&mut self, kind: &str, detail: impl Into<String>) {
        self.lag.push(Finding {
            kind: kind.to_owned(),
            detail: detail.into(),
            fix: None,
        });
    }

    fn kinds(&self) -> Vec<&str> {
        self.problems.iter().map(|f| f.kind.as_str()).collect()
    }

    fn divergence(&self, id: &str, f: &Finding) -> Divergence {
        Divergence {
            session_id: id.to_owned(),
            kind: f.kind.clone(),
            redis_version: self.redis_version,
            snapshot_version: self.snapshot_version,
            history_version: self.history_version,
            detail: f.detail.clone(),
        }
    }
}

/// What the log says a session is: the fold of its trail (or, when the
/// trail has a hole, its snapshot).
#[derive(Debug, Clone)]
struct LogView {
    json: String,
    seq: u64,
    status: Status,
    user: String,
    deadline_ms: Option<i64>,
}

impl LogView {
    fn of(s: &session_snapshots::Model) -> LogView {
        LogView {
            json: s.state.clone(),
            seq: s.seq.max(0) as u64,
            status: crate::audit::sink::status_of(s.status),
            user: s.user_id.clone().unwrap_or_default(),
            deadline_ms: s.expires_at.map(|t| t.timestamp_millis()),
        }
    }

    fn expected(&self) -> Expected {
        Expected {
            json: self.json.clone(),
            seq: self.seq,
            user: self.user.clone(),
            deadline_ms: self.deadline_ms,
        }
    }
}

struct Checker<'a> {
    store: &'a SessionStore,
    db: &'a DatabaseConnection,
    opts: &'a VerifyOptions,
    /// For the one rule that turns an event into a deadline.
    sink: AuditSink,
    conn: RedisConn,
    stream: StreamLog,
    tomb_ms: i64,
    shape: Shape,
}

impl Checker<'_> {
    async fn run(&mut self) -> Result<VerifyReport> {
        let mut report = VerifyReport {
            ok: true,
            checked: 0,
            agree: 0,
            lag: Vec::new(),
            divergences: Vec::new(),
            repaired: Vec::new(),
        };
        // First look, in bulk, a page at a time: the group's progress, the
        // database, Redis, then the stream.
        let ids = self.candidates().await?;
        layout::load(&mut self.conn).await?;
        let mut pending: BTreeMap<String, Judgement> = BTreeMap::new();
        for page in ids.chunks(PAGE) {
            self.stream.progress(&mut self.conn, self.store).await?;
            let mut dbs = self.read_db_bulk(page).await?;
            let hints: HashMap<&str, Vec<String>> = page
                .iter()
                .map(|id| {
                    let users = dbs
                        .get(id)
                        .and_then(|v| v.snapshot.as_ref())
                        .and_then(|s| s.user_id.clone())
                        .into_iter()
                        .collect();
                    (id.as_str(), users)
                })
                .collect();
            let mut redis = self.inspect_bulk(page, &hints).await?;
            self.stream.catch_up(&mut self.conn, self.store).await?;
            for id in page {
                let (Some(db), Some(r)) = (dbs.remove(id), redis.remove(id)) else {
                    continue;
                };
                let j = self.judge(id, &Look { db, redis: r });
                if j.problems.is_empty() && j.reinspect_user.is_none() {
                    Self::count(&mut report, id, &j);
                } else {
                    pending.insert(id.clone(), j);
                }
            }
        }
        // Disagreements are read again, alone, until they settle.
        let mut confirmed: Vec<(String, Judgement)> = Vec::new();
        for round in 0..self.opts.rereads {
            if pending.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50u64 << round.min(6))).await;
            self.stream.progress(&mut self.conn, self.store).await?;
            let mut looks = Vec::with_capacity(pending.len());
            for (id, prev) in &pending {
                looks.push((id.clone(), self.look(id, &prev.users).await?));
            }
            self.stream.catch_up(&mut self.conn, self.store).await?;
            for (id, look) in looks {
                let j = self.judge(&id, &look);
                let Some(prev) = pending.get(&id) else {
                    continue;
                };
                if j.reinspect_user.is_some() {
                    pending.insert(id, j);
                } else if j.problems.is_empty() {
                    pending.remove(&id);
                    Self::count(&mut report, &id, &j);
                } else if j.fingerprint == prev.fingerprint && j.kinds() == prev.kinds() {
                    pending.remove(&id);
                    confirmed.push((id, j));
                } else {
                    pending.insert(id, j);
                }
            }
        }
        for (id, j) in pending {
            if j.problems.is_empty() {
                // Its user kept changing under us: a live, busy session.
                Self::count(&mut report, &id, &j);
            } else {
                confirmed.push((id, j));
            }
        }
        for (id, j) in confirmed {
            if self.opts.repair && j.problems.iter().any(|f| f.fix.is_some()) {
                self.repair(&mut report, &id, j).await?;
            } else {
                Self::report_divergent(&mut report, &id, &j);
            }
        }
        report.ok = report.divergences.is_empty();
        Ok(report)
    }

    fn report_divergent(report: &mut VerifyReport, id: &str, j: &Judgement) {
        report.checked += 1;
        report
            .divergences
            .extend(j.problems.iter().map(|f| j.divergence(id, f)));
        report.lag.extend(j.lag.iter().map(|f| j.divergence(id, f)));
    }

    fn count(report: &mut VerifyReport, id: &str, j: &Judgement) {
        if !j.counted {
            return;
        }
        report.checked += 1;
        if j.lag.is_empty() {
            report.agree += 1;
        } else {
            report.lag.extend(j.lag.iter().map(|f| j.divergence(id, f)));
        }
    }

    /// Every session Redis holds (a key or an expiry index entry) and every
    /// live snapshot.
    async fn candidates(&mut self) -> Result<Vec<String>> {
        let keys = self.store.keys();
        let mut ids: BTreeSet<String> = BTreeSet::new();
        for k in self.conn.scan_all(&keys.session_pattern()).await? {
            if let Some((_, id)) = keys.split_key(&k, |p| &p.session_prefix)
                && id.parse::<SessionId>().is_ok()
            {
                ids.insert(id.to_owned());
            }
        }
        for part in keys.all() {
            let entries: Vec<(Vec<u8>, f64)> =
                self.conn.zrange_withscores(&part.expiry, 0, -1).await?;
            ids.extend(
                entries
                    .iter()
                    .filter_map(|(m, score)| SessionId::from_expiry_entry(m, *score))
                    .map(|id| id.as_str().to_owned()),
            );
        }
        let live: Vec<String> = session_snapshots::Entity::find()
            .select_only()
            .column(session_snapshots::Column::SessionId)
            .filter(session_snapshots::Column::Status.eq(SnapshotStatus::Live))
            .into_tuple()
            .all(self.db)
            .await?;
        ids.extend(live.into_iter().filter(|m| m.parse::<SessionId>().is_ok()));
        Ok(ids.into_iter().collect())
    }

    /// Snapshots and events of many sessions, in chunks (not one
    /// transaction: a disagreement this causes is read again).
    async fn read_db_bulk(&self, ids: &[String]) -> Result<HashMap<String, DbView>> {
        let mut out: HashMap<String, DbView> = ids
            .iter()
            .map(|id| (id.clone(), DbView::default()))
            .collect();
        // Each chunk binds its ids once per statement: well under both
        // backends' bind-parameter limits.
        for chunk in ids.chunks(500) {
            let names = chunk.iter().map(String::as_str);
            let snaps = session_snapshots::Entity::find()
                .filter(session_snapshots::Column::SessionId.is_in(names.clone()))
                .all(self.db)
                .await?;
            for s in snaps {
                if let Some(v) = out.get_mut(&s.session_id) {
                    v.snapshot = Some(s);
                }
            }
            let rows: Vec<AuditRow> = session_events::Entity::find()
                .filter(session_events::Column::SessionId.is_in(names))
                .order_by_asc(session_events::Column::SessionId)
                .order_by_asc(session_events::Column::Seq)
                .into_model::<AuditRow>()
                .all(self.db)
                .await?;
            for r in rows {
                let sid = match &r {
                    AuditRow::Event { incoming, .. } => incoming.event.session_id.to_string(),
                    AuditRow::Unreadable(s) => s.session_id.clone(),
                };
                if let Some(v) = out.get_mut(&sid) {
                    v.push(r);
                }
            }
        }
        Ok(out)
    }

    /// One session's snapshot and events, in one transaction (a consistent
    /// view on PostgreSQL; SQLite transactions are serializable).
    async fn read_db_one(&self, id: &str) -> Result<DbView> {
        let txn = if self.db.get_database_backend() == DbBackend::Postgres {
            crate::audit::db::begin_with(
                self.db,
                Some(IsolationLevel::RepeatableRead),
                Some(AccessMode::ReadOnly),
            )
            .await?
        } else {
            crate::audit::db::begin(self.db).await?
        };
        let mut view = DbView {
            snapshot: session_snapshots::Entity::find_by_id(id.to_owned())
                .one(&txn)
                .await?,
            ..DbView::default()
        };
        let rows: Vec<AuditRow> = session_events::Entity::find()
            .filter(session_events::Column::SessionId.eq(id))
            .order_by_asc(session_events::Column::Seq)
            .into_model::<AuditRow>()
            .all(&txn)
            .await?;
        txn.commit().await?;
        for r in rows {
            view.push(r);
        }
        Ok(view)
    }

    /// Every session's Redis view, pipelined per partition.
    async fn inspect_bulk(
        &mut self,
        ids: &[String],
        hints: &HashMap<&str, Vec<String>>,
    ) -> Result<HashMap<String, RedisView>> {
        let keys = self.store.keys();
        let mut by_part: BTreeMap<u32, Vec<&String>> = BTreeMap::new();
        for id in ids {
            if let Ok(sid) = id.parse::<SessionId>() {
                by_part.entry(keys.partition_of(&sid)).or_default().push(id);
            }
        }
        let mut out = HashMap::with_capacity(ids.len());
        for (p, ids) in by_part {
            let part = keys.part(p);
            for chunk in ids.chunks(PAGE) {
                let mut pipe = redis::pipe();
                let users: Vec<Vec<&str>> = chunk
                    .iter()
                    .map(|id| {
                        hints
                            .get(id.as_str())
                            .map(|u| u.iter().map(String::as_str).collect())
                            .unwrap_or_default()
                    })
                    .collect();
                for (id, u) in chunk.iter().zip(&users) {
                    pipe.add_command(layout::inspect_cmd(part, self.shape, id, u));
                }
                let replies: Vec<Vec<String>> = match pipe.query_async(&mut self.conn).await {
                    Ok(r) => r,
                    Err(e)
                        if e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                    {
                        layout::load(&mut self.conn).await?;
                        pipe.query_async(&mut self.conn).await?
                    }
                    Err(e) => return Err(e.into()),
                };
                for ((id, u), reply) in chunk.iter().zip(&users).zip(replies) {
                    out.insert((*id).clone(), layout::decode_inspect(reply, u)?);
                }
            }
        }
        Ok(out)
    }

    /// One look at one session: the database, then Redis.
    async fn look(&mut self, id: &str, users: &[String]) -> Result<Look> {
        let db = self.read_db_one(id).await?;
        let sid: SessionId = id
            .parse()
            .map_err(|e| crate::error::Error::InvalidInput(format!("{id:?}: {e}")))?;
        let part = self.store.keys().for_session(&sid);
        let users: Vec<&str> = users.iter().map(String::as_str).collect();
        let redis = layout::inspect(&mut self.conn, part, self.shape, id, &users).await?;
        Ok(Look { db, redis })
    }

    /// The snapshot the audit sink would hold for `run` (the events folded
    /// into `state`, oldest first); `known` is the stored one, whose
    /// deadline is kept when it is at the same seq (it was computed by the
    /// worker with the app servers' timeout).
    fn folded_snapshot(
        &self,
        id: &str,
        state: &Record,
        run: &[(Incoming, DateTime<Utc>)],
        known: Option<&session_snapshots::Model>,
    ) -> session_snapshots::Model {
        let last = run.last().map(|(i, _)| i);
        let expires_at = match (state.status(), known, last) {
            (Status::Live, Some(k), _)
                if k.seq as u64 == state.version() && k.expires_at.is_some() =>
            {
                k.expires_at
            }
            (Status::Live, _, Some(i)) => Some(self.sink.deadline(i)),
            _ => None,
        };
        session_snapshots::Model {
            session_id: id.to_owned(),
            user_id: state
                .user_key()
                .or_else(|| last.and_then(|i| i.event.user_id.clone())),
            state: state.to_json(),
            seq: state.version() as i64,
            status: snapshot_status(state.status()),
            expires_at,
            updated_at: Utc::now(),
        }
    }

    /// What one look says (see the module docs).
    fn judge(&self, id: &str, look: &Look) -> Judgement {
        let mut j = Judgement::default();
        let db = &look.db;
        let folded = fold_run(db.events.iter().map(|(i, _)| &i.event));
        let history = folded.as_ref().map(|(s, _)| s);
        let run = &db.events[..folded.as_ref().map_or(0, |(_, n)| *n)];
        let log = self.judge_trail(&mut j, id, db, history, run);
        match &look.redis.json {
            Some(json) => self.judge_key(&mut j, id, &look.redis, json, log.as_ref()),
            None => self.judge_no_key(&mut j, id, &look.redis, log.as_ref()),
        }
        self.finish(j, look, history)
    }

    /// The audit trail on its own: unreadable rows, gaps, the snapshot
    /// against the fold. Returns what the log says the session is.
    fn judge_trail(
        &self,
        j: &mut Judgement,
        id: &str,
        db: &DbView,
        history: Option<&Record>,
        run: &[(Incoming, DateTime<Utc>)],
    ) -> Option<LogView> {
        let now = Utc::now();
        let grace = chrono::Duration::from_std(self.opts.grace).unwrap_or_default();
        for u in &db.unreadable {
            j.problem(
                "unreadable_event",
                format!("audit row {} does not decode: {}", u.event_id, u.reason),
                None,
            );
        }
        let hv = history.map_or(0, Record::version);
        let gap = db.events.get(run.len());
        if let Some((after, recorded_at)) = gap {
            let missing = hv + 1;
            let detail = format!(
                "seq {missing} is missing from the audit trail; seq {} was recorded at {}",
                after.event.seq,
                crate::time::Timestamp::from_datetime(*recorded_at)
            );
            if self.stream.in_flight(id, missing) || now - *recorded_at < grace {
                j.lagging("seq_gap", detail);
            } else {
                j.problem("seq_gap", detail, None);
            }
        }
        let folded = history.map(|h| self.folded_snapshot(id, h, run, db.snapshot.as_ref()));
        let sound = gap.is_none() && db.unreadable.is_empty();
        if !sound {
            // The fold stops at the hole: the snapshot, folded by the audit
            // sink when the trail was whole, is the better account of the
            // session (and the hole is reported above).
            return match (&db.snapshot, folded) {
                (Some(s), f) if f.as_ref().is_none_or(|f| s.seq >= f.seq) => Some(LogView::of(s)),
                (_, f) => f.as_ref().map(LogView::of),
            };
        }
        match (&db.snapshot, &folded) {
            (Some(s), Some(f)) => {
                let deadline_agrees = match (s.expires_at, f.expires_at) {
                    (Some(a), Some(b)) => (a - b).num_milliseconds().abs() <= 1,
                    (a, b) => a == b,
                };
                if s.seq != f.seq
                    || s.state != f.state
                    || s.status != f.status
                    || s.user_id != f.user_id
                    || !deadline_agrees
                {
                    j.problem(
                        "snapshot",
                        format!(
                            "the snapshot (seq {}, {:?}) is not the fold of its events (seq {}, {:?})",
                            s.seq, s.status, f.seq, f.status
                        ),
                        Some(Fix::Snapshot),
                    );
                }
            }
            (None, Some(f)) => j.problem(
                "snapshot",
                format!("no snapshot for a session with events up to seq {}", f.seq),
                Some(Fix::Snapshot),
            ),
            (Some(s), None) => {
                j.problem(
                    "history_missing",
                    format!("a snapshot at seq {} and no events", s.seq),
                    None,
                );
                return Some(LogView::of(s));
            }
            (None, None) => {}
        }
        j.snapshot = db.snapshot.clone();
        folded.as_ref().map(LogView::of)
    }

    /// A session whose key exists: the key against the log, then the key's
    /// derived state.
    fn judge_key(
        &self,
        j: &mut Judgement,
        id: &str,
        r: &RedisView,
        json: &str,
        log: Option<&LogView>,
    ) {
        j.counted = true;
        let session = match Record::from_json(json) {
            Ok(s) => s,
            Err(e) => {
                j.problem(
                    "different",
                    format!("the Redis value is not session JSON: {e}"),
                    None,
                );
                return;
            }
        };
        let v = session.version();
        j.redis_version = Some(v);
        let lv = log.map_or(0, |l| l.seq);
        let live = log.is_some_and(|l| l.status == Status::Live);
        // The state the layout must derive from, when the log says it.
        let mut layout_of: Option<Expected> = None;
        match log {
            Some(l) if v == l.seq && !live => j.problem(
                "different",
                format!("live in Redis at seq {v}, {} in the audit trail", l.status.as_str()),
                None,
            ),
            Some(l) if v == l.seq => {
                if l.json != json {
                    j.problem(
                        "different",
                        format!("same version ({v}), different JSON"),
                        l.deadline_ms.map(|_| Fix::Reindex),
                    );
                }
                layout_of = Some(l.expected());
            }
            _ if v > lv && self.stream.in_flight(id, v) => {
                j.lagging("lag", format!("seq {} to {v} are still in the stream", lv + 1));
                // The TTL is checked against the snapshot's deadline only;
                // a repair takes it from the stream entry.
                layout_of = Some(Expected {
                    json: json.to_owned(),
                    seq: v,
                    user: session.user_key().unwrap_or_default(),
                    deadline_ms: None,
                });
            }
            None => j.problem(
                "extra",
                "in Redis only, with no events in the database or on their way",
                None,
            ),
            Some(_) if v > lv => j.problem(
                "different",
                format!(
                    "Redis is at seq {v}, the audit trail at {lv}, and seq {v} is not on its way from the stream"
                ),
                None,
            ),
            Some(l) if live => {
                j.problem(
                    "different",
                    format!("Redis is behind the audit trail (seq {v} < {lv})"),
                    l.deadline_ms.map(|_| Fix::Reindex),
                );
                j.reindex = Some((Some(json.to_owned()), l.expected()));
                return;
            }
            Some(l) => j.problem(
                "different",
                format!(
                    "live in Redis at seq {v}, {} in the audit trail at seq {lv}",
                    l.status.as_str()
                ),
                None,
            ),
        }
        let Some(exp) = layout_of else {
            return;
        };
        if !exp.user.is_empty() && r.in_user_index(&exp.user).is_none() {
            j.reinspect_user = Some(exp.user);
            return;
        }
        // The deadline a repair writes: the log's, else the stream entry's,
        // else what the index or the key say.
        let deadline = exp
            .deadline_ms
            .or_else(|| {
                self.stream
                    .stream_id(id, v)
                    .and_then(crate::audit::sink::stream_id_millis)
                    .map(|ms| ms + self.store.config().session_timeout.as_millis() as i64)
            })
            .or_else(|| r.key_deadline())
            .or(r.expiry_ms());
        for p in layout::check_live(r, &exp, self.tomb_ms, self.shape) {
            let fix = (p.reindexable && deadline.is_some()).then_some(Fix::Reindex);
            j.problem(p.kind, p.detail, fix);
        }
        if j.problems.iter().any(|f| f.fix == Some(Fix::Reindex)) {
            j.reindex = Some((
                Some(json.to_owned()),
                Expected {
                    deadline_ms: deadline,
                    ..exp
                },
            ));
        }
    }

    /// A session without a key: fine when the log says it ended or its
    /// deadline passed (then its end must follow); `missing` when the log
    /// says it lives on.
    fn judge_no_key(&self, j: &mut Judgement, id: &str, r: &RedisView, log: Option<&LogView>) {
        let Some(l) = log.filter(|l| l.status == Status::Live) else {
            j.counted = !j.problems.is_empty() || !j.lag.is_empty();
            return;
        };
        j.counted = true;
        if self.stream.newest_in_flight(id).is_some_and(|m| m > l.seq) {
            j.lagging(
                "lag",
                format!(
                    "seq {} onwards (its end or newer writes) are still in the stream",
                    l.seq + 1
                ),
            );
            return;
        }
        let Some(deadline) = l.deadline_ms else {
            return;
        };
        let grace = chrono::Duration::from_std(self.opts.grace).unwrap_or_default();
        let overdue = deadline < (Utc::now() - grace).timestamp_millis();
        match &r.ledger {
            Some(led) if !led.live() && led.seq > l.seq => j.problem(
                "end_missing",
                format!(
                    "Redis ended it ({} at seq {}); neither the audit trail (seq {}) nor the stream has that end",
                    led.status, led.seq, l.seq
                ),
                None,
            ),
            Some(led) if led.seq != l.seq => j.problem(
                "different",
                format!(
                    "the ledger is at seq {}, the audit trail at {}",
                    led.seq, l.seq
                ),
                None,
            ),
            _ if deadline > r.now_ms + TOLERANCE_MS => {
                j.problem(
                    "missing",
                    format!("live in the audit trail until {deadline} ms, absent from Redis"),
                    Some(Fix::Reindex),
                );
                j.reindex = Some((None, l.expected()));
            }
            ledger => {
                // Past its deadline: the reaper's business, then the
                // database sweep's.
                for p in layout::check_overdue(r, l.seq) {
                    j.problem(p.kind, p.detail, Some(Fix::Requeue));
                    j.requeue = Some((l.seq, deadline));
                }
                if overdue {
                    let detail = match ledger {
                        Some(_) => {
                            "past its deadline by more than the grace period; the reaper has not written its end"
                        }
                        None => {
                            "past its deadline by more than the grace period, and Redis has no ledger for it: only the database sweep can write its end"
                        }
                    };
                    let fix = j.snapshot.is_some().then_some(Fix::Settle);
                    j.problem("end_missing", detail, fix);
                }
            }
        }
    }

    /// Fills in the versions and the fingerprint of a judgement.
    fn finish(&self, mut j: Judgement, look: &Look, history: Option<&Record>) -> Judgement {
        let r = &look.redis;
        j.snapshot_version = look.db.snapshot.as_ref().map(|s| s.seq as u64);
        j.history_version = history.map(Record::version);
        let mut users: Vec<String> = r.users.iter().map(|(u, _)| u.clone()).collect();
        if let Some(u) = &j.reinspect_user
            && !users.contains(u)
        {
            users.push(u.clone());
        }
        j.users = users;
        j.fingerprint = format!(
            "{:?}|{:?}|{}|{}|{:?}|{:?}|{}|{}|{:?}|{:?}",
            look.db
                .snapshot
                .as_ref()
                .map(|s| (s.seq, &s.state, s.status, s.expires_at)),
            j.history_version,
            look.db.events.len(),
            look.db.unreadable.len(),
            r.json,
            r.ledger_raw,
            r.pttl.signum(),
            r.ledger_pttl.signum(),
            r.expiry,
            r.users,
        );
        j
    }

    /// Puts right what the log determines, looks again, and reports what
    /// was repaired and what is left.
    async fn repair(&mut self, report: &mut VerifyReport, id: &str, j: Judgement) -> Result<()> {
        let sid: SessionId = id
            .parse()
            .map_err(|e| crate::error::Error::InvalidInput(format!("{id:?}: {e}")))?;
        let part = self.store.keys().for_session(&sid).clone();
        let mut actions: HashMap<Fix, String> = HashMap::new();
        let wants = |fix: Fix| j.problems.iter().any(|f| f.fix == Some(fix));
        if wants(Fix::Snapshot) {
            actions.insert(Fix::Snapshot, self.rebuild_snapshot(id).await?);
        }
        if wants(Fix::Reindex)
            && let Some((inspected, exp)) = &j.reindex
        {
            let done = layout::reindex(
                &mut self.conn,
                &part,
                self.shape,
                id,
                inspected.as_deref(),
                exp,
                self.tomb_ms,
            )
            .await?;
            actions.insert(
                Fix::Reindex,
                match done {
                    Reindexed::Done => format!(
                        "rewrote the key, its TTL and both indexes from the log (version {}, user {:?})",
                        exp.seq, exp.user
                    ),
                    Reindexed::Moved => "nothing: the session changed meanwhile".to_owned(),
                    Reindexed::Ended => "nothing: its ledger says it ended".to_owned(),
                    Reindexed::Expired => "nothing: its deadline has passed".to_owned(),
                },
            );
        }
        if wants(Fix::Requeue)
            && let Some((seq, deadline)) = j.requeue
        {
            let ok = layout::requeue(&mut self.conn, &part, self.shape, id, seq, deadline).await?;
            actions.insert(
                Fix::Requeue,
                if ok {
                    "put it back into the expiry index".to_owned()
                } else {
                    "nothing: the session changed meanwhile".to_owned()
                },
            );
        }
        if wants(Fix::Settle)
            && let Some(snapshot) = &j.snapshot
        {
            let sweeper = OverdueSweeper::new(
                self.store.clone(),
                self.db.clone(),
                OverdueConfig {
                    grace: self.opts.grace,
                    ..OverdueConfig::default()
                },
            );
            let action = match sweeper.settle(snapshot).await? {
                Settled::ExpiredInRedis => "appended its `expired` event through Redis".to_owned(),
                Settled::WrittenToDatabase => {
                    "wrote its `expired` event into the audit database".to_owned()
                }
                Settled::AlreadyEnded => "nothing: it ended meanwhile".to_owned(),
                Settled::Waiting(why) => format!("nothing yet: {why}"),
            };
            actions.insert(Fix::Settle, action);
        }
        // Look again: what is gone was repaired, what is left is not.
        let after = self.settled_look(id, &j.users).await?;
        let left: BTreeSet<&str> = after.problems.iter().map(|f| f.kind.as_str()).collect();
        for f in &j.problems {
            if left.contains(f.kind.as_str()) {
                continue;
            }
            let action = f
                .fix
                .and_then(|fix| actions.get(&fix).cloned())
                .unwrap_or_else(|| "resolved by a repair of the same session".to_owned());
            report.repaired.push(Repair {
                session_id: id.to_owned(),
                kind: f.kind.clone(),
                action,
            });
        }
        if after.problems.is_empty() {
            Self::count(report, id, &after);
        } else {
            Self::report_divergent(report, id, &after);
        }
        Ok(())
    }

    /// Looks at one session until it agrees, or two looks in a row see the
    /// same state (at most three looks).
    async fn settled_look(&mut self, id: &str, users: &[String]) -> Result<Judgement> {
        let mut prev: Option<Judgement> = None;
        for attempt in 0..3u64 {
            tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
            self.stream.progress(&mut self.conn, self.store).await?;
            let users = prev.as_ref().map_or(users, |p| p.users.as_slice()).to_vec();
            let look = self.look(id, &users).await?;
            self.stream.catch_up(&mut self.conn, self.store).await?;
            let j = self.judge(id, &look);
            if j.reinspect_user.is_none()
                && (j.problems.is_empty()
                    || prev
                        .as_ref()
                        .is_some_and(|p| p.fingerprint == j.fingerprint))
            {
                return Ok(j);
            }
            prev = Some(j);
        }
        Ok(prev.unwrap_or_default())
    }

    /// Rebuilds one snapshot from the session's events, only from the
    /// version it is read at in the same transaction (the audit consumer
    /// only ever moves it forward, so a concurrent commit wins).
    async fn rebuild_snapshot(&self, id: &str) -> Result<String> {
        use session_snapshots::Column as S;
        let txn = crate::audit::db::begin(self.db).await?;
        let current = session_snapshots::Entity::find_by_id(id.to_owned())
            .one(&txn)
            .await?;
        let rows: Vec<AuditRow> = session_events::Entity::find()
            .filter(session_events::Column::SessionId.eq(id))
            .order_by_asc(session_events::Column::Seq)
            .into_model::<AuditRow>()
            .all(&txn)
            .await?;
        let mut view = DbView::default();
        for r in rows {
            view.push(r);
        }
        let Some((state, n)) = fold_run(view.events.iter().map(|(i, _)| &i.event)) else {
            txn.rollback().await?;
            return Ok("nothing: no events to fold".to_owned());
        };
        if n != view.events.len() || !view.unreadable.is_empty() {
            txn.rollback().await?;
            return Ok("nothing: the audit trail has a gap or an unreadable row".to_owned());
        }
        let folded = self.folded_snapshot(id, &state, &view.events, current.as_ref());
        let row = session_snapshots::ActiveModel {
            session_id: Set(folded.session_id.clone()),
            user_id: Set(folded.user_id.clone()),
            state: Set(folded.state.clone()),
            seq: Set(folded.seq),
            status: Set(folded.status),
            expires_at: Set(folded.expires_at),
            updated_at: Set(folded.updated_at),
        };
        let written = match &current {
            Some(c) => {
                session_snapshots::Entity::update_many()
                    .set(row)
                    .filter(S::SessionId.eq(id))
                    .filter(S::Seq.eq(c.seq))
                    .exec(&txn)
                    .await?
                    .rows_affected
            }
            None => {
                session_snapshots::Entity::insert(row)
                    .on_conflict(OnConflict::column(S::SessionId).do_nothing().to_owned())
                    .exec_without_returning(&txn)
                    .await?
            }
        };
        txn.commit().await?;
        Ok(if written == 1 {
            format!(
                "rebuilt the snapshot from its {} events (seq {}, {:?})",
                view.events.len(),
                folded.seq,
                folded.status
            )
        } else {
            "nothing: the snapshot moved meanwhile".to_owned()
        })
    }
}
