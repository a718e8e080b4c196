//! The [`Healer`]: notices that Redis lost its data and rebuilds it, and
//! applies writes staged while Redis was unreachable.

use sea_orm::DatabaseConnection;
use serde::Serialize;

use crate::error::Result;
use crate::store::SessionStore;

use super::replay::ReplaySummary;

/// Notices that Redis lost its data and rebuilds it, with no operator.
///
/// Every `HEAL_CHECK_MS` it compares each partition's Redis epoch with the
/// one the audit database knows complete (see
/// [`RecoveryState`](crate::store::RecoveryState)): a fresh namespace gets
/// its epoch recorded; a partition whose epoch is missing or different lost
/// its data, and the healer replays every live session under the partition's
/// healing lock, then records the new epoch. App servers do the same when
/// they notice first, so recovering ends even without a worker. It also
/// projects writes staged in the database while Redis was unreachable, so
/// they reach Redis even when the app server that staged them is gone. The
/// audit consumer re-creates its group by itself when it finds it missing.
#[derive(Debug, Clone)]
pub struct Healer {
    store: SessionStore,
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
    /// Staged writes applied to Redis.
    pub projected: u64,
}

impl Healer {
    /// A healer checking every `interval` (`HEAL_CHECK_MS`, 1000), with the
    /// audit database `db` attached to `store`.
    pub fn new(store: SessionStore, db: DatabaseConnection, interval: std::time::Duration) -> Self {
        let store = if store.audit().is_some() {
            store
        } else {
            let config = store.config().clone();
            store.with_audit(crate::audit::AuditSink::new(
                db,
                config.session_timeout,
                config.event_stream.clone(),
            ))
        };
        Healer { store, interval }
    }

    /// Checks every partition once; replays when one lost its data. Replay
    /// is idempotent, so a loss of some partitions (one shard of a cluster)
    /// replays all and changes only what was lost.
    pub async fn check(&self) -> Result<Option<ReplaySummary>> {
        self.store.heal().await
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
            match self.store.project_staged().await {
                Ok(p) => totals.projected += p.projected + p.logged_directly,
                Err(e) => tracing::debug!(err = %e, "projecting staged writes failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
        Ok(totals)
    }
}
