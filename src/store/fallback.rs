//! The store's side of the audit database: synchronous commits, the fallback
//! while Redis is unreachable, projection once it answers again, and reads
//! during recovery.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::Utc;

use super::SessionStore;
use super::script::{self, Reply};
use crate::audit::Incoming;
use crate::audit::sink::{FallbackOutcome, StoredSession};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::id::SessionId;
use crate::session::{Session, Status};

/// How long a read of the recovery state is trusted.
const RECOVERY_CHECK: Duration = Duration::from_secs(1);

impl SessionStore {
    pub(super) fn fallback_enabled(&self) -> bool {
        self.config.db_fallback && self.audit.is_some()
    }

    pub(super) fn sync_enabled(&self) -> bool {
        self.config.db_sync && self.audit.is_some()
    }

    /// True while Redis is recovering from a loss of its data: the worker's
    /// marker is missing or its `recovering` flag is set. A miss costs this
    /// one extra Redis round trip (an `MGET`), and database work only while
    /// recovering, so random cookies never turn into database load outside
    /// recovery. A "recovering" answer is trusted for a second.
    pub(super) async fn recovering(&self, id: &SessionId) -> bool {
        // Only "recovering" is remembered: a remembered "all well" could hide
        // a loss that happened since, and log out an audited user.
        if let Ok(guard) = self.shared.recovery_checked.lock()
            && let Some((at, true)) = *guard
            && at.elapsed() < RECOVERY_CHECK
        {
            return true;
        }
        let part = self.keys.for_session(id);
        let reply: redis::RedisResult<(Option<String>, Option<String>)> = redis::cmd("MGET")
            .arg(&part.marker)
            .arg(&part.recovering)
            .query_async(&mut self.conn.clone())
            .await;
        let state = match reply {
            Ok((marker, flag)) => marker.is_none() || flag.is_some(),
            Err(_) => false,
        };
        if let Ok(mut guard) = self.shared.recovery_checked.lock() {
            *guard = Some((Instant::now(), state));
        }
        state
    }

    /// During recovery: the session from its snapshot, put back into Redis.
    pub(super) async fn restore_from_audit(&self, id: &SessionId) -> Result<Option<Session>> {
        let Some(stored) = self.fallback_snapshot(id).await? else {
            return Ok(None);
        };
        self.project(id, &stored).await?;
        Ok(Some(stored.session))
    }

    /// The snapshot of a session that is live and not past its deadline.
    /// (This and `fallback_append` box their database call: they sit on the
    /// rare fallback path of every read and write.)
    pub(super) async fn fallback_get(&self, id: &SessionId) -> Result<Option<Session>> {
        Ok(Box::pin(self.fallback_snapshot(id))
            .await?
            .filter(|s| s.session.status() == Status::Live)
            .map(|s| s.session))
    }

    /// The snapshot, with live sessions past their deadline left out.
    pub(super) async fn fallback_snapshot(&self, id: &SessionId) -> Result<Option<StoredSession>> {
        let Some(audit) = &self.audit else {
            return Ok(None);
        };
        let snap = audit.snapshot(id.as_str()).await?;
        Ok(snap.filter(|s| {
            s.session.status() != Status::Live || s.expires_at.is_some_and(|t| t > Utc::now())
        }))
    }

    /// Writes one session's snapshot into Redis unless Redis holds the same
    /// or a newer seq.
    async fn project(&self, id: &SessionId, stored: &StoredSession) -> Result<()> {
        let s = &stored.session;
        let tomb = self.config.tombstone_ttl.as_millis() as u64;
        let user = s.user_id().unwrap_or_default();
        let mut conn = self.conn.clone();
        let cmd = match (s.status(), stored.expires_at) {
            (Status::Live, Some(deadline)) => {
                let mut c = script::evalsha(self.keys.for_session(id), "restore");
                c.arg(id.as_str())
                    .arg(s.to_json())
                    .arg(s.version())
                    .arg(&user)
                    .arg(deadline.timestamp_millis())
                    .arg(tomb);
                c
            }
            (Status::Live, None) => return Ok(()),
            (status, _) => {
                let mut c = script::evalsha(self.keys.for_session(id), "retire");
                c.arg(id.as_str())
                    .arg(s.version())
                    .arg(status.as_str())
                    .arg(&user)
                    .arg(tomb);
                c
            }
        };
        let reply: redis::RedisResult<Vec<String>> = cmd.query_async(&mut conn).await;
        let reply = match reply {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                script::load(&mut conn).await?;
                cmd.query_async(&mut conn).await?
            }
            other => other?,
        };
        match script::decode(reply)? {
            Reply::Ok(..) | Reply::Newer | Reply::Current | Reply::Expired => Ok(()),
            other => Err(Error::Corrupt(format!(
                "projection: unexpected reply {other:?}"
            ))),
        }
    }

    /// Once Redis answers again: projects every session written in fallback
    /// mode. Sessions that cannot be projected yet stay pending.
    ///
    /// Every read and write calls this; the common case (nothing pending) is
    /// one atomic load, and the projection itself is boxed so that it does not
    /// enlarge the caller's future.
    pub(super) async fn project_pending(&self) {
        if self.shared.has_dirty.load(Ordering::Acquire) {
            Box::pin(self.project_dirty()).await;
        }
    }

    async fn project_dirty(&self) {
        let ids: Vec<SessionId> = match self.shared.dirty.lock() {
            Ok(mut d) => {
                self.shared.has_dirty.store(false, Ordering::Release);
                std::mem::take(&mut *d).into_iter().collect()
            }
            Err(_) => return,
        };
        let mut failed = Vec::new();
        for id in ids {
            let done = match self.fallback_snapshot(&id).await {
                Ok(Some(stored)) => self.project(&id, &stored).await.is_ok(),
                Ok(None) => true,
                Err(_) => false,
            };
            if !done {
                failed.push(id);
            }
        }
        if !failed.is_empty() {
            self.mark_dirty(failed);
        } else {
            tracing::info!("sessions written during the Redis outage are back in Redis");
        }
    }

    fn mark_dirty(&self, ids: impl IntoIterator<Item = SessionId>) {
        if let Ok(mut d) = self.shared.dirty.lock() {
            d.extend(ids);
            self.shared
                .has_dirty
                .store(!d.is_empty(), Ordering::Release);
        }
    }

    /// Appends events to the database in fallback mode.
    pub(super) async fn fallback_append(&self, writes: &[(u64, Event)]) -> Result<FallbackOutcome> {
        let Some(audit) = &self.audit else {
            return Err(Error::InvalidInput("no audit database attached".to_owned()));
        };
        let out = Box::pin(audit.append_fallback(writes)).await?;
        if out == FallbackOutcome::Written {
            self.shared
                .fallback_writes
                .fetch_add(writes.len() as u64, Ordering::Relaxed);
            crate::telemetry::metrics()
                .fallback_writes
                .add(writes.len() as u64, &[]);
            self.mark_dirty(writes.iter().map(|(_, e)| e.session_id.clone()));
            tracing::warn!(
                events = writes.len(),
                "redis unreachable; written to the audit database"
            );
        }
        Ok(out)
    }

    /// With `DB_SESSION_SYNC`: commits the events of a mutation that Redis
    /// accepted to the database before the mutation returns (the audit
    /// consumer later finds them there and skips them).
    pub(super) async fn sync(&self, events: Vec<Incoming>) -> Result<()> {
        if !self.sync_enabled() || events.is_empty() {
            return Ok(());
        }
        Box::pin(self.sync_now(events)).await
    }

    async fn sync_now(&self, events: Vec<Incoming>) -> Result<()> {
        let Some(audit) = &self.audit else {
            return Ok(());
        };
        let mut attempt = 0;
        loop {
            match audit.write(&events, &[]).await {
                Ok(_) => return Ok(()),
                Err(e) if attempt < 3 => {
                    attempt += 1;
                    tracing::warn!(err = %e, attempt, "synchronous audit write failed; retrying");
                    tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
