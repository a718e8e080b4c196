//! The [`Healer`]: notices that Redis lost its data and rebuilds it.

use chrono::Utc;
use redis::AsyncCommands as _;
use sea_orm::DatabaseConnection;
use serde::Serialize;

use crate::error::Result;
use crate::store::SessionStore;

use super::replay::{ReplaySummary, replay};

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
