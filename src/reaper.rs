//! The expiry reaper: turns every idle timeout into an `expired` event.
//!
//! Redis deletes a session key when its TTL runs out, silently. The reaper
//! reads the expiry index (session → a time at or before its deadline, on
//! Redis's clock; a member of the lean layout carries the id's last two bytes
//! in its score, [`SessionId::expiry_score`]) for entries that have come due and runs the same atomic
//! script path as every other mutation:
//!
//! - a session still live is filed again from its key's real TTL: at the
//!   look-ahead before its deadline, or, once within it, at the deadline
//!   after recording its version and user in its ledger (the lean layout
//!   does not keep them for a live session otherwise);
//! - a session whose key is gone gets one `expired` event with the version
//!   and user of its ledger, its tombstone, and its index entries removed.
//!
//! The script re-checks the entry, the key and the ledger, so a session
//! touched just before its deadline is left alone and two reapers never
//! expire one session twice. Keyspace notifications are not used: Redis
//! does not deliver them reliably.
//!
//! The reaper needs the session's ledger in Redis. A session whose ledger is
//! gone (the reaper was down longer than `SESSION_TOMBSTONE_TTL`, or missed
//! the look-ahead window, or Redis lost its data just after the deadline)
//! still gets its `expired` event from `OverdueSweeper` (feature `audit`),
//! which works from the audit database's live snapshots instead (`overdue`).
//!
//! # Layout
//!
//! - this file: [`Reaper`] and [`ReaperConfig`], the sweep of the expiry index;
//! - `overdue` (feature `audit`): `OverdueSweeper` and `OverdueConfig`, the sweep of the
//!   audit database for live snapshots past their deadline.

#[cfg(feature = "audit")]
mod overdue;

use std::time::Duration;

use redis::AsyncCommands as _;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, non_empty, parse};
use crate::error::Result;
use crate::id::SessionId;
use crate::store::SessionStore;

#[cfg(feature = "audit")]
pub use overdue::{OverdueConfig, OverdueSweep, OverdueSweeper, Settled};

/// Reaper settings.
#[derive(Debug, Clone)]
pub struct ReaperConfig {
    /// `REAPER_INTERVAL_MS` (1000): pause between sweeps that found nothing.
    pub interval: Duration,
    /// `REAPER_BATCH` (500): sessions examined per sweep.
    pub batch: usize,
}

impl ReaperConfig {
    /// From the environment.
    pub fn from_env() -> std::result::Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// From a lookup function.
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
    ) -> std::result::Result<Self, ConfigError> {
        let var = non_empty(&get);
        Ok(ReaperConfig {
            interval: Duration::from_millis(parse(
                &var,
                "REAPER_INTERVAL_MS",
                1000,
                "milliseconds",
            )?),
            batch: parse::<usize>(&var, "REAPER_BATCH", 500, "a number of sessions")?.max(1),
        })
    }
}

impl Default for ReaperConfig {
    fn default() -> Self {
        ReaperConfig {
            interval: Duration::from_millis(1000),
            batch: 500,
        }
    }
}

/// The reaper over one store.
#[derive(Debug, Clone)]
pub struct Reaper {
    store: SessionStore,
    cfg: ReaperConfig,
}

impl Reaper {
    /// A reaper for this store's expiry index.
    pub fn new(store: SessionStore, cfg: ReaperConfig) -> Self {
        Reaper { store, cfg }
    }

    /// One sweep: in each partition, expires up to `batch` sessions whose
    /// deadline has passed (Redis's clock). Returns how many this call
    /// expired.
    pub async fn sweep(&self) -> Result<usize> {
        let mut expired = 0;
        for p in 0..self.store.keys().partitions() {
            expired += self.sweep_partition(p).await?;
        }
        Ok(expired)
    }

    /// One sweep of partition `p`'s expiry index.
    pub async fn sweep_partition(&self, p: u32) -> Result<usize> {
        let mut conn = self.store.connection();
        let expiry = &self.store.keys().part(p).expiry;
        // On a cluster, TIME is answered by some node; the scripts use their
        // own node's clock, so a sweep a few ms early is only a skipped
        // candidate (the script checks the deadline again).
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let now_ms = secs * 1000 + micros / 1000;
        let due: Vec<(Vec<u8>, f64)> = conn
            .zrangebyscore_limit_withscores(expiry, "-inf", now_ms, 0, self.cfg.batch as isize)
            .await?;
        let mut expired = 0;
        for (member, score) in due {
            let Some(sid) = SessionId::from_expiry_entry(&member, score) else {
                let _: redis::RedisResult<u64> = conn.zrem(expiry, &member).await;
                continue;
            };
            if self.store.expire(&sid, score).await? {
                tracing::debug!(session_id = %sid, "expired");
                crate::telemetry::metrics().expired.add(1, &[]);
                expired += 1;
            }
        }
        Ok(expired)
    }

    /// Sweeps until `shutdown` is cancelled. A sweep that filled its batch is
    /// followed at once by the next.
    pub async fn run(self, shutdown: CancellationToken) -> Result<u64> {
        self.run_on(None, shutdown).await
    }

    /// Like [`Reaper::run`], on partition `p` only (the worker runs one per
    /// partition it holds).
    pub async fn run_partition(self, p: u32, shutdown: CancellationToken) -> Result<u64> {
        self.run_on(Some(p), shutdown).await
    }

    async fn run_on(self, partition: Option<u32>, shutdown: CancellationToken) -> Result<u64> {
        let mut total = 0u64;
        while !shutdown.is_cancelled() {
            let swept = match partition {
                Some(p) => self.sweep_partition(p).await,
                None => self.sweep().await,
            };
            let pause = match swept {
                Ok(n) => {
                    total += n as u64;
                    if n >= self.cfg.batch {
                        Duration::ZERO
                    } else {
                        self.cfg.interval
                    }
                }
                Err(e) => {
                    tracing::warn!(err = %e, "reaper sweep failed");
                    self.cfg.interval
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        Ok(total)
    }
}
