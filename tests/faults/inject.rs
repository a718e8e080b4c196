//! Fires the planned faults, one lane at a time: each fault waits for its
//! planned time and for the previous one of its lane to have settled plus
//! the quiet period, so two faults of one lane never overlap. A fault is
//! recorded with its start, its end (when it was undone) and when the system
//! was seen settled after it; a fault that does not settle within
//! [`SETTLE`] is recorded as such and the lane goes on.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::history::{FaultKind, FaultRecord};
use crate::schedule::PlannedFault;
use crate::system::{System, poll, signal};

/// Longest wait for the system to settle after a fault.
pub const SETTLE: Duration = Duration::from_secs(30);
/// How long clients keep hurrying after a fault settled.
const STORM_AFTER: Duration = Duration::from_secs(1);
/// Latency the Redis proxy adds per chunk in a `RedisSlow` fault: a round
/// trip then takes longer than `REDIS_TIMEOUT_MS`.
const SLOW: Duration = Duration::from_millis(200);
/// Latency the database proxy adds per chunk in a `DbSlow` fault.
const DB_SLOW: Duration = Duration::from_millis(150);
/// How long the resumed worker and the one that took over run side by side
/// before the latter is stopped.
const SIDE_BY_SIDE: Duration = Duration::from_millis(1000);

/// Runs one lane. With `until`, faults that would start after it are
/// skipped (the long form keeps to its duration however long restarts
/// take); without, every fault fires.
pub async fn run_lane(
    sys: Arc<System>,
    origin: Instant,
    lane: Vec<PlannedFault>,
    quiet: Duration,
    until: Option<Instant>,
    storm: Arc<tokio::sync::watch::Sender<usize>>,
) -> Vec<FaultRecord> {
    let mut ready = origin;
    let mut out = Vec::new();
    for f in lane {
        let at = (origin + f.at).max(ready);
        if until.is_some_and(|u| at > u) {
            break;
        }
        tokio::time::sleep_until(at).await;
        storm.send_modify(|n| *n += 1);
        let watch = tokio::spawn(report_slow_settling(
            sys.clone(),
            origin,
            f.kind.name(),
            f.hold,
        ));
        let rec = inject(&sys, origin, &f).await;
        watch.abort();
        eprintln!(
            "  fault {:>6.2}s {}{} held {:.2}s, settled {}",
            rec.start.as_secs_f64(),
            f.kind.name(),
            rec.target.map(|t| format!(" #{t}")).unwrap_or_default(),
            (rec.end - rec.start).as_secs_f64(),
            rec.settled
                .map(|s| format!("after {:.2}s", (s - rec.end).as_secs_f64()))
                .unwrap_or_else(|| "NEVER".to_owned())
        );
        if rec.settled.is_none() {
            eprintln!("    not settled: {}", sys.unsettled().await.join("; "));
        }
        ready = Instant::now() + quiet;
        // The storm outlasts the fault by a second: the window after a
        // restore is where recovery goes wrong.
        tokio::time::sleep(STORM_AFTER.min(quiet)).await;
        storm.send_modify(|n| *n = n.saturating_sub(1));
        out.push(rec);
    }
    out
}

/// How long after a fault ends the system may take to settle before the
/// run says, every few seconds, what keeps it from settling.
const SLOW_SETTLE: Duration = Duration::from_secs(8);

/// Prints what keeps the system from settling while a fault's settling is
/// slow (from [`SLOW_SETTLE`] after its hold), until it is aborted: the
/// logs run at `warn`, and say nothing of a wait that is no failure.
async fn report_slow_settling(
    sys: Arc<System>,
    origin: Instant,
    kind: &'static str,
    hold: Duration,
) {
    tokio::time::sleep(hold + SLOW_SETTLE).await;
    loop {
        let why = sys.unsettled().await;
        if !why.is_empty() {
            eprintln!(
                "    {kind} still settling at {:.2}s (worker pid {:?}): {}",
                origin.elapsed().as_secs_f64(),
                sys.worker_pid().await,
                why.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
}

/// The offset at which `cond` first held, polled within [`SETTLE`].
async fn settle_when<F, Fut>(origin: Instant, cond: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    poll(SETTLE, Duration::from_millis(50), cond)
        .await
        .then(|| origin.elapsed())
}

async fn inject(sys: &Arc<System>, origin: Instant, f: &PlannedFault) -> FaultRecord {
    let now = || origin.elapsed();
    let mut target = None;
    let start = now();
    let (end, settled) = match f.kind {
        FaultKind::RedisCut => {
            sys.redis_proxy.cut();
            tokio::time::sleep(f.hold).await;
            sys.redis_proxy.restore();
            (now(), settle_when(origin, move || sys.redis_back()).await)
        }
        FaultKind::RedisSlow => {
            sys.redis_proxy.delay(SLOW);
            tokio::time::sleep(f.hold).await;
            sys.redis_proxy.delay(Duration::ZERO);
            (now(), settle_when(origin, move || sys.redis_back()).await)
        }
        FaultKind::RedisFlush => {
            if let Some(mut conn) = sys.admin().await {
                let _: redis::RedisResult<()> = redis::cmd("FLUSHALL").query_async(&mut conn).await;
            }
            (
                now(),
                settle_when(origin, move || async move {
                    sys.healed().await && sys.apps_healthy().await
                })
                .await,
            )
        }
        FaultKind::RedisRestart => {
            let mut redis = sys.redis.lock().await;
            redis.shutdown_nosave().await;
            tokio::time::sleep(f.hold).await;
            redis.restart().await;
            drop(redis);
            (
                now(),
                settle_when(origin, move || async move {
                    sys.healed().await && sys.apps_healthy().await
                })
                .await,
            )
        }
        FaultKind::RedisClientKill => {
            if let Some(mut conn) = sys.admin().await {
                let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("normal")
                    .query_async(&mut conn)
                    .await;
            }
            (now(), settle_when(origin, move || sys.redis_back()).await)
        }
        FaultKind::DbCut => {
            sys.db_proxy.cut();
            tokio::time::sleep(f.hold).await;
            sys.db_proxy.restore();
            let end = now();
            (end, Some(end))
        }
        FaultKind::DbReset => {
            sys.db_proxy.reset();
            let end = now();
            (end, Some(end))
        }
        FaultKind::DbSlow => {
            sys.db_proxy.delay(DB_SLOW);
            tokio::time::sleep(f.hold).await;
            sys.db_proxy.delay(Duration::ZERO);
            let end = now();
            (end, Some(end))
        }
        FaultKind::DbLock => match sys.lock_snapshots(f.hold).await {
            Ok(()) => {
                let end = now();
                (end, Some(end))
            }
            Err(e) => {
                eprintln!("  the snapshot table could not be locked: {e:#}");
                (now(), None)
            }
        },
        FaultKind::Poison => match sys.inject_poison().await {
            Ok(entries) => (
                now(),
                settle_when(origin, move || {
                    let entries = entries.clone();
                    async move { sys.dead_lettered(&entries).await }
                })
                .await,
            ),
            Err(e) => {
                eprintln!("  the poison entries could not be appended: {e:#}");
                (now(), None)
            }
        },
        FaultKind::WorkerStop => {
            let stopped = sys.worker_pid().await;
            if let Some(pid) = stopped {
                signal(pid, "STOP").await;
            }
            let takeover = sys.start_takeover().await;
            tokio::time::sleep(f.hold).await;
            if let Some(pid) = stopped {
                signal(pid, "CONT").await;
            }
            let end = now();
            let took_over = match takeover {
                Ok(pid) => {
                    settle_when(origin, move || async move {
                        sys.consumer_of(pid).await && sys.worker_alive().await
                    })
                    .await
                }
                Err(e) => {
                    eprintln!("  the takeover worker did not start: {e:#}");
                    None
                }
            };
            // The resumed worker acts on what it believed before the stop
            // (a batch in hand, a lease it thinks it holds) while the other
            // one holds the leases; then the other one leaves.
            tokio::time::sleep(SIDE_BY_SIDE).await;
            sys.stop_takeover().await;
            let back = settle_when(origin, move || sys.worker_consuming()).await;
            (end, took_over.and(back))
        }
        FaultKind::AppKill => {
            let i = f.target % sys.app_servers();
            target = Some(i);
            sys.kill_app(i).await;
            tokio::time::sleep(f.hold).await;
            let started = sys.start_app(i).await;
            let end = now();
            let ok = match started {
                Ok(()) => settle_when(origin, move || sys.apps_healthy()).await,
                Err(e) => {
                    eprintln!("  app server {i} did not start again: {e:#}");
                    None
                }
            };
            (end, ok)
        }
        FaultKind::WorkerKill => {
            sys.kill_worker().await;
            tokio::time::sleep(f.hold).await;
            let end = now();
            match sys.start_worker().await {
                Ok(_) => (
                    end,
                    settle_when(origin, move || sys.worker_consuming()).await,
                ),
                Err(e) => {
                    eprintln!("  the worker did not start again: {e:#}");
                    (end, None)
                }
            }
        }
    };
    FaultRecord {
        kind: f.kind,
        target,
        start,
        end,
        settled,
    }
}
