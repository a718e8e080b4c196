//! Recovering from a loss of Redis data, as a fact the system knows.
//!
//! Each partition's Redis data set carries an epoch: a random id in
//! `<ns>epoch`, set once (`SET NX`) beside the data and lost with it. The
//! audit database records, per stream, the epoch it knows complete
//! ([`crate::audit::partition`]). Comparing the two gives three states:
//!
//! - **same epoch**: normal; a key that is missing in Redis is missing.
//! - **the database knows no epoch**: a fresh namespace (or an audit database
//!   attached for the first time). The epoch Redis has (created now if
//!   needed) is recorded, and nothing is recovered: there is nothing to
//!   recover.
//! - **Redis has no epoch, or another one**: Redis lost data the database
//!   knows. The partition is *recovering* until a replay has put every live
//!   session back and recorded Redis's new epoch. Meanwhile a read that
//!   misses in Redis is served from the database under the one rule
//!   ([`super::admit`]) and the session is put back into Redis; ends reach
//!   sessions that are not back yet.
//!
//! The replay runs in whichever process notices first and holds the
//! partition's healing lock (`<ns>healing`): the worker's healer, or the app
//! server itself when no worker runs, so recovering always ends. A "same
//! epoch" answer is remembered by the process (it cannot change without the
//! key changing); a "recovering" answer for [`RECOVERING_MEMO`]. A miss whose
//! epoch was not confirmed before it is read again with the epoch
//! ([`Miss::ReadAgain`]): a replay may have finished in between. A miss
//! whose state cannot be read while Redis may have lost its data answers an
//! error ([`Miss::Unknown`]), never "no session".

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::Utc;
use redis::AsyncCommands as _;
use serde::Serialize;

use super::SessionStore;
use super::admit::admit;
use crate::audit::{outbox, partition};
use crate::error::Result;
use crate::id::SessionId;
use crate::keys::Keys;
use crate::session::{Record, Status};

/// How long a "recovering" answer is remembered, so that a burst of misses
/// during a recovery costs one database read, not one each.
pub const RECOVERING_MEMO: Duration = Duration::from_millis(250);

/// How long a healing lock lasts without its holder renewing it: a healer
/// that dies (a SIGKILL mid-replay) holds up the next one this long at most.
const HEALING_LOCK: Duration = Duration::from_secs(15);

/// How often a healer renews its locks while it replays.
const HEALING_RENEW: Duration = Duration::from_secs(5);

/// A partition's recovery state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryState {
    /// Redis holds the data set the database knows complete.
    Normal {
        /// The epoch both agree on.
        epoch: String,
    },
    /// Redis lost data the database knows; a replay is due or running.
    Recovering {
        /// Redis's epoch now, if it has one yet.
        redis_epoch: Option<String>,
        /// The epoch the database knows complete.
        database_epoch: String,
    },
}

/// What a read that missed in Redis means.
#[derive(Debug)]
pub(super) enum Miss {
    /// Redis held the complete data set when the key was read: the session
    /// is not there.
    Stands,
    /// Redis is recovering: the database may know the session.
    Recovering,
    /// Redis holds the complete data set of `epoch` now, but may not have
    /// when the key was read: read the key again, with the epoch.
    ReadAgain {
        /// The epoch known complete now.
        epoch: String,
    },
    /// Redis may have lost its data set and nothing can tell: its epoch
    /// could not be read, or it has none or another than the one this
    /// process confirmed and the database cannot be read. The read answers
    /// this error, never "no session".
    Unknown(crate::error::Error),
}

/// The error of a read during recovery of a session that cannot be restored
/// yet (see `restore_on_read`): unavailable, so the web layer answers 503
/// and the request may be tried again.
fn not_restorable_yet(id: &SessionId) -> crate::error::Error {
    tracing::info!(session_id = %id, "the session's audit trail has a gap being filled; not restoring it yet");
    crate::error::Error::unavailable(
        "the session cannot be restored yet: its audit trail has a gap being filled",
    )
}

/// What each process remembers of a partition.
#[derive(Debug, Default)]
pub(super) struct Memo {
    /// The epoch confirmed equal in Redis and the database.
    confirmed: Option<String>,
    /// When a "recovering" answer was last read.
    recovering_at: Option<Instant>,
}

impl SessionStore {
    /// The recovery state of partition `part`, read from Redis and the audit
    /// database. A fresh namespace gets its epoch recorded here. Needs the
    /// audit database.
    pub async fn recovery_state(&self, part: &Keys) -> Result<RecoveryState> {
        self.db()?;
        let redis_epoch: Option<String> = self.conn.clone().get(&part.epoch).await?;
        self.recovery_state_at(part, redis_epoch).await
    }

    /// [`Self::recovery_state`] with Redis's epoch as just read.
    async fn recovery_state_at(
        &self,
        part: &Keys,
        redis_epoch: Option<String>,
    ) -> Result<RecoveryState> {
        let db = self.db()?;
        let known = partition::load(db, &part.stream)
            .await?
            .and_then(|r| r.redis_epoch);
        match (redis_epoch, known) {
            (Some(r), Some(d)) if r == d => Ok(RecoveryState::Normal { epoch: r }),
            (r, Some(d)) => Ok(RecoveryState::Recovering {
                redis_epoch: r,
                database_epoch: d,
            }),
            (r, None) => {
                let r = match r {
                    Some(r) => r,
                    None => self.ensure_epoch(part).await?,
                };
                match partition::adopt_epoch(db, &part.stream, &r).await? {
                    Some(d) if d == r => Ok(RecoveryState::Normal { epoch: r }),
                    Some(d) => Ok(RecoveryState::Recovering {
                        redis_epoch: Some(r),
                        database_epoch: d,
                    }),
                    None => Ok(RecoveryState::Normal { epoch: r }),
                }
            }
        }
    }

    /// Redis's epoch for `part`, set now (`SET NX`) if it has none.
    pub(crate) async fn ensure_epoch(&self, part: &Keys) -> Result<String> {
        let mut conn = self.conn.clone();
        let fresh = uuid::Uuid::now_v7().to_string();
        let _: Option<String> = redis::cmd("SET")
            .arg(&part.epoch)
            .arg(&fresh)
            .arg("NX")
            .query_async(&mut conn)
            .await?;
        let now: Option<String> = conn.get(&part.epoch).await?;
        Ok(now.unwrap_or(fresh))
    }

    /// Once per process: records the epochs of a fresh namespace, so that a
    /// later loss of Redis data is known as one even if no read missed in
    /// between.
    pub(super) async fn establish_epochs(&self) -> Result<()> {
        for part in self.keys.all() {
            if let RecoveryState::Recovering { .. } = self.recovery_state(part).await? {
                self.start_healing();
            }
        }
        Ok(())
    }

    /// What a read that missed in Redis means for partition `part` (see the
    /// module docs). When the recovery state cannot be read, the miss stands
    /// only where nothing says Redis lost data: its epoch is there and this
    /// process never confirmed another.
    pub(super) async fn after_miss(&self, part: &Keys) -> Miss {
        let p = part.partition;
        let (confirmed, memo_fresh) = match self.shared.audit.recovery.lock() {
            Ok(m) => {
                let memo = m.get(&p);
                (
                    memo.and_then(|m| m.confirmed.clone()),
                    memo.and_then(|m| m.recovering_at)
                        .is_some_and(|t| t.elapsed() < RECOVERING_MEMO),
                )
            }
            Err(_) => (None, false),
        };
        if memo_fresh {
            return Miss::Recovering;
        }
        // One slot: the epoch and the copy of the one known complete.
        let read: redis::RedisResult<(Option<String>, Option<String>)> = redis::cmd("MGET")
            .arg(&part.epoch)
            .arg(&part.recovered)
            .query_async(&mut self.conn.clone())
            .await;
        let (redis_epoch, recovered) = match read {
            Ok(r) => r,
            Err(e) => return Miss::Unknown(e.into()),
        };
        if let (Some(c), Some(r)) = (&confirmed, &redis_epoch)
            && c == r
        {
            // The epoch read after the miss is the one confirmed before it:
            // no loss of data came between (a new data set always gets a new
            // epoch), so the miss stands.
            return Miss::Stands;
        }
        if let Some(r) = &redis_epoch
            && recovered.as_ref() == Some(r)
        {
            // Redis holds the data set the database recorded complete (a
            // process copied the record beside it): no database read, so a
            // process that last confirmed an earlier data set answers a
            // miss during an audit outage too.
            self.confirm(p, r);
            return Miss::ReadAgain { epoch: r.clone() };
        }
        // Redis has no epoch, or not the one this process confirmed: it lost
        // a data set since, and only the database knows what was in it.
        let lost = redis_epoch.is_none() || confirmed.is_some();
        let state = match self.recovery_state_at(part, redis_epoch).await {
            Ok(s) => s,
            // A miss there is no answer (it would log a user out whose
            // session the replay is about to bring back).
            Err(e) if lost => {
                tracing::debug!(err = %e, "reading the recovery state failed after redis lost its data");
                return Miss::Unknown(e);
            }
            // A process that never confirmed an epoch, with the database
            // unreachable: nothing says Redis lost anything, and an audit
            // outage must fail no read (nothing could be restored anyway).
            Err(e) => {
                tracing::debug!(err = %e, "reading the recovery state failed");
                return Miss::Stands;
            }
        };
        match state {
            RecoveryState::Recovering { .. } => {
                if let Ok(mut m) = self.shared.audit.recovery.lock() {
                    let memo = m.entry(p).or_default();
                    memo.confirmed = None;
                    memo.recovering_at = Some(Instant::now());
                }
                self.start_healing();
                Miss::Recovering
            }
            // Normal now, but not known normal when the key was read: a
            // replay may have finished in between and put the session back.
            RecoveryState::Normal { epoch } => {
                self.confirm(p, &epoch);
                self.mark_recovered(part, &epoch).await;
                Miss::ReadAgain { epoch }
            }
        }
    }

    /// Remembers `epoch` as partition `p`'s complete data set.
    fn confirm(&self, p: u32, epoch: &str) {
        if let Ok(mut m) = self.shared.audit.recovery.lock() {
            let memo = m.entry(p).or_default();
            memo.confirmed = Some(epoch.to_owned());
            memo.recovering_at = None;
        }
    }

    /// Copies the epoch the database knows complete beside Redis's data
    /// set (`<ns>recovered`), for processes that cannot read the database
    /// when they need to know. Best effort: without it they ask the
    /// database, as before. Written after Redis lost its data again, it
    /// lands in a data set whose epoch is another, and is ignored there.
    async fn mark_recovered(&self, part: &Keys, epoch: &str) {
        let set: redis::RedisResult<()> = self.conn.clone().set(&part.recovered, epoch).await;
        if let Err(e) = set {
            tracing::debug!(err = %e, "copying the complete epoch into redis failed");
        }
    }

    /// The session key and the partition's epoch in one atomic read (they
    /// share the partition's slot): the session as Redis holds it, and
    /// whether Redis still held the data set of `epoch` at that moment.
    pub(super) async fn read_in_epoch(
        &self,
        id: &SessionId,
        part: &Keys,
        epoch: &str,
    ) -> Result<(Option<String>, bool)> {
        let (json, now): (Option<String>, Option<String>) = redis::cmd("MGET")
            .arg(self.keys.session(id))
            .arg(&part.epoch)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok((json, now.as_deref() == Some(epoch)))
    }

    /// During recovery: the session from the database, put back into Redis
    /// under the one rule, then read from Redis (which has the last word).
    pub(super) async fn restore_on_read(&self, id: &SessionId) -> Result<Option<Record>> {
        // A write of the lost data set whose audit commit is under way is
        // now either in the database or refused (see `settle_writes`).
        crate::audit::settle_writes(self.db()?).await?;
        let Some(view) = self.fallback_view(id).await? else {
            return Ok(None);
        };
        let now = Utc::now();
        if admit(&view, now).is_none() {
            // A live session whose snapshot stops before events the table
            // holds (a gap an audit write is about to fill: an entry a
            // stopped consumer left pending, claimed by the next) cannot be
            // restored yet, but it is not gone: "no session" would log its
            // user out.
            if view.session.status() == Status::Live
                && view.deadline.is_some_and(|d| d > now)
                && view.behind_the_log()
                && !self.ended_after(id, view.snapshot_seq()).await?
            {
                return Err(not_restorable_yet(id));
            }
            return Ok(None);
        }
        if !view.staged.is_empty() {
            // Writes staged during an outage come first; until Redis has them
            // the database's view is the session.
            if !self.project_session(id).await? {
                return Ok(admit(&view, Utc::now()));
            }
        } else if let (Some(snap), Some(deadline)) = (&view.snapshot, view.deadline) {
            self.restore_snapshot(
                id,
                &snap.state,
                snap.seq.max(0) as u64,
                snap.user_id.as_deref(),
                deadline,
                true,
            )
            .await?;
        }
        let json: Option<String> = self.conn.clone().get(self.keys.session(id)).await?;
        json.map(|j| super::parse_session(id, &j)).transpose()
    }

    /// Whether the audit table holds an end of `id` after `seq` (across a
    /// gap the snapshot stops at: the session is gone whatever the gap
    /// holds).
    async fn ended_after(&self, id: &SessionId, seq: u64) -> Result<bool> {
        use crate::audit::entity::session_events::{Column, Entity};
        use sea_orm::{ColumnTrait as _, EntityTrait as _, PaginatorTrait as _, QueryFilter as _};
        let ends = Entity::find()
            .filter(Column::SessionId.eq(id.as_str()))
            .filter(Column::Seq.gt(seq as i64))
            .filter(Column::EventType.is_in(["destroyed", "expired"]))
            .count(self.db()?)
            .await?;
        Ok(ends > 0)
    }

    /// Brings a session the database knows live back into Redis, for an end
    /// or a write that must reach it (during recovery, or after its key was
    /// lost). True when Redis holds it now. Without the audit database (or
    /// when it cannot be read) nothing is brought back: the operation then
    /// acts on what Redis holds, as it would without the database.
    pub(super) async fn bring_back(&self, id: &SessionId) -> Result<bool> {
        if self.audit.is_none() {
            return Ok(false);
        }
        match Box::pin(self.restore_on_read(id)).await {
            Ok(s) => Ok(s.is_some()),
            Err(e) if e.is_unavailable() => Err(e),
            Err(e) => {
                tracing::debug!(err = %e, session_id = %id, "could not bring a session back from the database");
                Ok(false)
            }
        }
    }

    /// Starts a replay in the background unless this process runs one.
    pub(super) fn start_healing(&self) {
        if !self.shared.audit.background_healing.load(Ordering::Acquire)
            || self.shared.audit.healing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.shared.audit.healing.store(false, Ordering::Release);
            return;
        };
        let store = self.clone();
        handle.spawn(async move {
            match store.heal().await {
                Ok(Some(s)) => tracing::info!(restored = s.restored, "recovery finished"),
                Ok(None) => {}
                Err(e) => tracing::warn!(err = %e, "recovery failed; will retry"),
            }
            store.shared.audit.healing.store(false, Ordering::Release);
        });
    }

    /// Heals Redis when a partition is recovering: takes the healing locks,
    /// sets Redis's epochs, replays every live session from the audit
    /// database, projects staged writes, and records the epochs as complete.
    /// `None` when nothing needed healing, or another process holds the lock.
    pub async fn heal(&self) -> Result<Option<crate::recovery::ReplaySummary>> {
        let db = self.db()?.clone();
        // The process id names the holder for an operator (`GET <ns>healing`).
        let owner = self.shared.audit.healer.clone();
        let mut conn = self.conn.clone();
        let mut lost = Vec::new();
        for part in self.keys.all() {
            if let RecoveryState::Recovering { .. } = self.recovery_state(part).await? {
                lost.push(part);
            }
        }
        if lost.is_empty() {
            return Ok(None);
        }
        if self.shared.audit.in_heal.swap(true, Ordering::AcqRel) {
            // This store heals already: that call does the work.
            return Ok(None);
        }
        let _in_heal = InHeal(&self.shared.audit.in_heal);
        let mut locked = Vec::new();
        for part in &lost {
            let got: redis::RedisResult<Option<String>> = redis::cmd("SET")
                .arg(&part.healing)
                .arg(&owner)
                .arg("NX")
                .arg("PX")
                .arg(HEALING_LOCK.as_millis() as u64)
                .query_async(&mut conn)
                .await;
            let taken = match got {
                Ok(Some(_)) => Ok(true),
                // Held. By this store when an earlier attempt of its own
                // left the lock behind (no other is under way, `in_heal`): a
                // `SET NX` that Redis applied but whose reply was lost, with
                // a release that failed as well (Redis was just coming
                // back), or an attempt that was stopped. Nobody replays
                // under such a lock, and every healer would wait out
                // HEALING_LOCK: this store takes it again (renewing it only
                // if it holds this store's name).
                Ok(None) => {
                    let ttl = HEALING_LOCK.as_millis() as u64;
                    crate::lease::renew_held(&mut conn, &part.healing, &owner, ttl)
                        .await
                        .map(|renewed| renewed == 1)
                }
                Err(e) => Err(e),
            };
            match taken {
                Ok(true) => locked.push(*part),
                Ok(false) => {}
                Err(e) => {
                    // Redis may have taken the lock and only its reply got
                    // lost (a connection that broke, a timeout): give back
                    // every lock this attempt may hold, or healing would
                    // wait for HEALING_LOCK.
                    self.release_healing(&lost, &owner).await;
                    return Err(e.into());
                }
            }
        }
        if locked.is_empty() {
            return Ok(None);
        }
        tracing::warn!(
            partitions = locked.len(),
            "redis lost its data: replaying from the audit database"
        );
        let m = crate::telemetry::metrics();
        m.redis_loss_detected.add(1, &[]);
        m.recovery_runs.add(1, &[]);
        let work = async {
            let mut epochs = Vec::with_capacity(locked.len());
            for part in &locked {
                epochs.push(self.ensure_epoch(part).await?);
            }
            let summary = crate::recovery::replay(self, &db, |_, _| {}).await?;
            self.project_staged().await?;
            for (part, epoch) in locked.iter().zip(&epochs) {
                // Redis lost its data again during the replay: leave the
                // partition recovering, the next check replays again.
                let now: Option<String> = conn.get(&part.epoch).await?;
                if now.as_deref() == Some(epoch.as_str()) {
                    partition::record_epoch(&db, &part.stream, epoch).await?;
                    self.mark_recovered(part, epoch).await;
                }
            }
            Ok::<_, crate::error::Error>(summary)
        };
        let result = self.renewing(&locked, &owner, work).await;
        self.release_healing(&locked, &owner).await;
        if let Ok(mut memo) = self.shared.audit.recovery.lock() {
            memo.clear();
        }
        result.map(Some)
    }

    /// Runs `work` while renewing the healing locks of `parts` that `owner`
    /// holds every [`HEALING_RENEW`], so that a long replay keeps them and a
    /// dead healer's run out soon. A lock lost meanwhile (Redis lost its data
    /// again) is only logged: a second replay beside this one is harmless,
    /// and this one records no epoch Redis no longer has.
    async fn renewing<T>(
        &self,
        parts: &[&Keys],
        owner: &str,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let mut conn = self.conn.clone();
        let mut every = tokio::time::interval(HEALING_RENEW);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = every.tick() => {
                    for part in parts {
                        let ttl = HEALING_LOCK.as_millis() as u64;
                        match crate::lease::renew_held(&mut conn, &part.healing, owner, ttl).await {
                            Ok(1) => {}
                            Ok(_) => tracing::warn!(partition = part.partition, "the healing lock was lost during the replay"),
                            Err(e) => tracing::debug!(err = %e, "renewing the healing lock failed"),
                        }
                    }
                }
            }
        }
    }

    /// Gives back the healing locks of `parts` that `owner` holds (best
    /// effort: a lock left behind runs out after [`HEALING_LOCK`]).
    async fn release_healing(&self, parts: &[&Keys], owner: &str) {
        let mut conn = self.conn.clone();
        for part in parts {
            let _ = crate::lease::release_held(&mut conn, &part.healing, owner).await;
        }
    }

    /// Staged events still waiting in the database for the partitions of
    /// this store (for operators).
    pub async fn staged_count(&self) -> Result<u64> {
        let db = self.db()?;
        let streams = self.streams();
        outbox::count(db, &streams).await
    }
}

/// Marks a `heal` call under way until it returns or is dropped.
struct InHeal<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for InHeal<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use redis::AsyncCommands as _;
    use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _};

    use crate::audit::AuditSink;
    use crate::config::{Config, RedisTarget};
    use crate::id::Token;
    use crate::session::NewSession;
    use crate::store::SessionStore;

    /// A namespace of its own on the local Redis (`REDIS_URL`) and a SQLite
    /// audit file of its own.
    struct Scratch {
        config: Config,
        namespace: String,
        dir: std::path::PathBuf,
    }

    impl Scratch {
        fn new() -> Self {
            let url =
                std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
            let namespace = format!("vtest:{}:", uuid::Uuid::new_v4().simple());
            let config = Config::default()
                .with_redis(RedisTarget::parse("REDIS_URL", &url).expect("redis url"))
                .with_namespace(&namespace);
            let dir = std::env::temp_dir().join(format!("vtest-{}", uuid::Uuid::new_v4().simple()));
            Scratch {
                config,
                namespace,
                dir,
            }
        }

        /// A store (a process of its own) with the migrated audit file
        /// attached.
        async fn store(&self) -> SessionStore {
            let file = self.dir.join("audit.sqlite");
            let db = crate::audit::db::connect(&format!("sqlite://{}?mode=rwc", file.display()))
                .await
                .expect("open the audit file");
            crate::audit::db::migrate(&db).await.expect("migrate");
            let sink = AuditSink::new(
                db,
                self.config.session_timeout,
                self.config.event_stream.clone(),
            );
            SessionStore::connect(&self.config)
                .await
                .expect("connect to redis")
                .with_audit(sink)
        }

        /// Deletes every key of the namespace: what a Redis restart
        /// without persistence does to it.
        async fn lose_redis_data(&self) {
            let mut conn = crate::conn::RedisConn::connect(
                &self.config,
                crate::conn::ConnOptions::store(&self.config),
            )
            .await
            .expect("connect");
            let keys = conn
                .scan_all(&format!("{}*", self.namespace))
                .await
                .expect("scan");
            if !keys.is_empty() {
                let _: () = conn.del(keys).await.expect("del");
            }
        }

        /// Removes the namespace's keys and the audit file.
        async fn remove(self) {
            self.lose_redis_data().await;
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[tokio::test]
    async fn a_miss_read_before_a_replay_finished_is_not_an_unknown_session() {
        let scratch = Scratch::new();
        let app = scratch.store().await;
        // A miss of an unknown cookie confirms the epoch in this process.
        let unknown = Token::generate().session_id();
        assert_eq!(app.get(&unknown).await.expect("get"), None);
        let c = app
            .create(NewSession::for_user(7, "seven"))
            .await
            .expect("create");

        // Redis loses the namespace's data; another process (the worker's
        // healer) replays it and records the new epoch.
        scratch.lose_redis_data().await;
        let healer = scratch.store().await;
        let summary = healer.heal().await.expect("heal").expect("a replay ran");
        assert_eq!(summary.restored, 1);

        // This process's GET missed while the replay ran; judged after it
        // finished, the miss must not stand: the session is live.
        let s = app
            .missed(&c.session_id)
            .await
            .expect("read")
            .expect("the live session, not an unknown one");
        assert_eq!(s.to_json(), c.session.to_json());
        // An unknown id is still unknown, with the epoch confirmed again.
        assert_eq!(app.missed(&unknown).await.expect("read"), None);

        scratch.remove().await;
    }

    /// The newest entry of the stream, decoded: what a mutation just wrote.
    async fn last_event(store: &SessionStore) -> crate::audit::Incoming {
        let stream = &store.keys().all()[0].stream;
        let reply: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut store.connection())
            .await
            .expect("xrevrange");
        crate::audit::consumer::decode_incoming(&reply.ids[0]).expect("decode")
    }

    #[tokio::test]
    async fn a_write_whose_data_set_was_lost_before_its_audit_commit_did_not_happen() {
        use crate::session::Changes;
        let scratch = Scratch::new();
        let app = scratch.store().await;
        let audit = app.audit().expect("attached").clone();
        // The same Redis without the database: its writes reach the stream
        // only, as a write whose synchronous commit is still under way.
        let redis_only = SessionStore::connect(&scratch.config)
            .await
            .expect("connect");
        let kept = app
            .create(NewSession::for_user(1, "one"))
            .await
            .expect("create");
        let lost = app
            .create(NewSession::for_user(2, "two"))
            .await
            .expect("create");

        // Redis still holds the entry: the commit goes through.
        redis_only
            .update(&kept.session_id, Changes::new().with_set("n", 1))
            .await
            .expect("update");
        let e = last_event(&redis_only).await;
        app.sync(vec![e]).await.expect("committed");
        let snap = audit
            .snapshot(kept.session_id.as_str())
            .await
            .expect("read")
            .expect("snapshot");
        assert_eq!(snap.session.version(), 2);

        // Redis applies a write, then loses its data set before the write's
        // commit: the commit is refused and records nothing.
        redis_only
            .update(&lost.session_id, Changes::new().with_set("n", 1))
            .await
            .expect("update");
        let e = last_event(&redis_only).await;
        scratch.lose_redis_data().await;
        match app.sync(vec![e]).await {
            Err(crate::error::Error::DataLost { .. }) => {}
            other => panic!("expected DataLost, got {other:?}"),
        }
        let snap = audit
            .snapshot(lost.session_id.as_str())
            .await
            .expect("read")
            .expect("snapshot");
        assert_eq!(snap.session.version(), 1, "the lost write is not recorded");
        let events = crate::audit::entity::session_events::Entity::find()
            .filter(
                crate::audit::entity::session_events::Column::SessionId
                    .eq(lost.session_id.as_str()),
            )
            .all(audit.db())
            .await
            .expect("events");
        assert_eq!(events.len(), 1);

        scratch.remove().await;
    }
}
