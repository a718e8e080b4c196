//! The worker process: the audit consumer and the expiry reaper, side by
//! side, until a shutdown signal.

use tokio_util::sync::CancellationToken;

use crate::audit::{self, AuditConsumer, AuditSink, ConsumerConfig};
use crate::config::Config;
use crate::error::Result;
use crate::reaper::{Reaper, ReaperConfig};
use crate::store::SessionStore;

/// Which parts to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parts {
    /// The audit consumer and the reaper.
    Both,
    /// Only the audit consumer.
    Audit,
    /// Only the reaper.
    Reaper,
}

/// `HEAL_CHECK_MS` (1000): how often the worker checks that Redis still has
/// its data.
fn heal_interval() -> std::time::Duration {
    let ms = std::env::var("HEAL_CHECK_MS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1000)
        .max(10);
    std::time::Duration::from_millis(ms)
}

/// Runs the worker until `shutdown` is cancelled. The audit consumer refuses
/// to start on an audit schema that is behind (`vedfolnir-sessions migrate`).
pub async fn run(
    config: &Config,
    parts: Parts,
    consumer: ConsumerConfig,
    reaper: ReaperConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    let store = SessionStore::connect(config).await?;
    let health = store.health().await;
    for w in &health.warnings {
        tracing::warn!(warning = %w, "redis configuration");
    }
    let mut tasks = tokio::task::JoinSet::new();
    if parts != Parts::Reaper {
        let db = audit::db::connect(&config.database_url).await?;
        audit::db::require_current_schema(&db).await?;
        let sink = AuditSink::new(
            db.clone(),
            config.session_timeout,
            config.event_stream.clone(),
        );
        let healer = crate::recovery::Healer::new(store.clone(), db, heal_interval());
        let token = shutdown.clone();
        tasks.spawn(async move { healer.run(token).await.map(|_| ()) });
        let mut c = AuditConsumer::new(config, sink, consumer).await?;
        c.ensure_group().await?;
        tracing::info!(consumer = %c.name(), "audit consumer started");
        let token = shutdown.clone();
        tasks.spawn(async move { c.run(token).await.map(|_| ()) });
    }
    if parts != Parts::Audit {
        let r = Reaper::new(store.clone(), reaper);
        let token = shutdown.clone();
        tracing::info!("expiry reaper started");
        tasks.spawn(async move { r.run(token).await.map(|_| ()) });
    }
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                shutdown.cancel();
                result = Err(e);
            }
            Err(join) => {
                shutdown.cancel();
                result = Err(crate::error::Error::Corrupt(format!(
                    "worker task failed: {join}"
                )));
            }
        }
    }
    result
}
