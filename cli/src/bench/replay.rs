//! The replay suite: `--sessions` live snapshots (50,000 by default),
//! inserted in bulk into each audit database, then
//! [`recovery::replay`](vedfolnir_sessions::recovery::replay) into an empty namespace.
//! Same run, same connection: pipelined plain `SET key json PX ttl` of the
//! same values, in pipelines as long as replay's pages; and the time replay's
//! paged reads of the snapshots take on their own, to tell the database's
//! share from Redis's.

use std::time::Instant;

use chrono::Utc;
use rand::Rng as _;
use sea_orm::{
    ColumnTrait as _, EntityTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _, Set,
    TransactionTrait as _,
};
use serde_json::{Map, Value, json};

use super::databases::{self, BenchDb};
use super::driver::{Client, Usage};
use super::store::new_session;
use super::{
    BenchArgs, Report, Suite, delete_namespace, machine, namespace, progress, ratio, round, target,
    targets_text,
};
use vedfolnir_sessions::audit::entity::session_snapshots::{self, SnapshotStatus};
use vedfolnir_sessions::config::Config;
use vedfolnir_sessions::error::{Error, Result};
use vedfolnir_sessions::event::{Event, EventKind, SCHEMA_VERSION};
use vedfolnir_sessions::id::Token;
use vedfolnir_sessions::session::Record;
use vedfolnir_sessions::store::SessionStore;
use vedfolnir_sessions::time::Timestamp;

/// Replay's page size (`recovery::PAGE`), used for the baseline's pipelines
/// and the read-only pass.
const PAGE: usize = 5000;
const DEFAULT_SESSIONS: usize = 50_000;

/// One live session as the audit database holds it.
struct Snapshot {
    id: String,
    user_id: Option<String>,
    state: String,
    seq: i64,
    expires_at: chrono::DateTime<Utc>,
}

/// Sessions folded from a `created` event and up to four `updated` events.
fn snapshots(n: usize) -> Vec<Snapshot> {
    let mut c = Client::new(42);
    let users = (n / 4).max(1) as u64;
    let now = Utc::now();
    (0..n)
        .map(|_| {
            let id = Token::generate().session_id();
            let at = Timestamp::now();
            let event = |seq, kind| Event {
                event_id: uuid::Uuid::now_v7(),
                session_id: id.clone(),
                seq,
                occurred_at: at,
                user_id: None,
                schema: SCHEMA_VERSION,
                kind,
                traceparent: None,
            };
            let fields = new_session(&mut c.rng, users).fields;
            let mut s = Record::default().apply(&event(
                1,
                EventKind::Created {
                    fields,
                    imported: None,
                    rotated_from: None,
                },
            ));
            for seq in 2..=c.rng.random_range(1..=5u64) {
                let mut set = Map::new();
                set.insert("page_views".to_owned(), Value::from(seq));
                s = s.apply(&event(
                    seq,
                    EventKind::Updated {
                        set,
                        unset: Vec::new(),
                    },
                ));
            }
            let left = c.rng.random_range(600..7200);
            Snapshot {
                id: id.to_string(),
                user_id: s.user_key(),
                state: s.to_json(),
                seq: s.version() as i64,
                expires_at: now + chrono::Duration::seconds(left),
            }
        })
        .collect()
}

async fn insert(bdb: &BenchDb, sessions: &[Snapshot]) -> Result<f64> {
    let start = Instant::now();
    let txn = bdb.db.begin().await?;
    for chunk in sessions.chunks(1000) {
        let rows = chunk.iter().map(|s| session_snapshots::ActiveModel {
            session_id: Set(s.id.clone()),
            user_id: Set(s.user_id.clone()),
            state: Set(s.state.clone()),
            seq: Set(s.seq),
            status: Set(SnapshotStatus::Live),
            expires_at: Set(Some(s.expires_at)),
            updated_at: Set(Utc::now()),
        });
        session_snapshots::Entity::insert_many(rows)
            .exec_without_returning(&txn)
            .await?;
    }
    txn.commit().await?;
    Ok(start.elapsed().as_secs_f64())
}

/// The snapshot pages replay reads, without Redis.
async fn read_only(bdb: &BenchDb) -> Result<f64> {
    let start = Instant::now();
    let mut after = String::new();
    loop {
        let rows = session_snapshots::Entity::find()
            .filter(session_snapshots::Column::SessionId.gt(after.as_str()))
            .order_by_asc(session_snapshots::Column::SessionId)
            .limit(PAGE as u64)
            .all(&bdb.db)
            .await?;
        let Some(last) = rows.last() else { break };
        after = last.session_id.clone();
        if rows.len() < PAGE {
            break;
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Pipelined plain `SET json PX` of the same values.
async fn baseline(
    conn: &mut vedfolnir_sessions::conn::RedisConn,
    prefix: &str,
    sessions: &[Snapshot],
) -> Result<f64> {
    let start = Instant::now();
    for chunk in sessions.chunks(PAGE) {
        let now = Utc::now();
        let mut pipe = redis::pipe();
        for s in chunk {
            let ttl = (s.expires_at - now).num_milliseconds().max(1);
            pipe.cmd("SET")
                .arg(format!("{prefix}{}", s.id))
                .arg(&s.state)
                .arg("PX")
                .arg(ttl)
                .ignore();
        }
        let _: () = pipe.query_async(conn).await?;
    }
    Ok(start.elapsed().as_secs_f64())
}

struct Measured {
    json: Value,
    rate: f64,
}

async fn one(config: &Config, bdb: &BenchDb, sessions: &[Snapshot]) -> Result<Measured> {
    let n = sessions.len();
    progress(
        Suite::Replay,
        format!("{}: inserting {n} snapshots", bdb.label),
    );
    let insert_secs = insert(bdb, sessions).await?;
    let read_secs = read_only(bdb).await?;
    let ns = namespace();
    let config = config.clone().with_namespace(&ns);
    let store = SessionStore::connect(&config).await?;
    let mut conn = store.connection();
    let outcome = async {
        progress(Suite::Replay, format!("{}: replaying into {ns}", bdb.label));
        let before = Usage::now(&mut conn).await?;
        let summary = vedfolnir_sessions::recovery::replay(&store, &bdb.db, |_, _| {}).await?;
        let replay_usage = Usage::now(&mut conn).await?.since(&before);
        if summary.restored != n as u64 {
            return Err(Error::InvalidInput(format!(
                "replay restored {} of {n} sessions: {summary:?}",
                summary.restored
            )));
        }
        progress(
            Suite::Replay,
            format!("{}: baseline, pipelined plain SETs", bdb.label),
        );
        let before = Usage::now(&mut conn).await?;
        let base_secs = baseline(&mut conn, &format!("{ns}plain:"), sessions).await?;
        let base_usage = Usage::now(&mut conn).await?.since(&before);
        let rate = summary.sessions_per_sec;
        let base_rate = ratio(n as f64, base_secs);
        Ok(Measured {
            rate,
            json: json!({
                "database": bdb.label,
                "version": bdb.version,
                "sessions": n,
                "restored": summary.restored,
                "replay_seconds": round(summary.seconds, 3),
                "sessions_per_sec": round(rate, 0),
                "baseline_sets_per_sec": round(base_rate, 0),
                "ratio": round(ratio(rate, base_rate), 3),
                "snapshot_read_seconds": round(read_secs, 3),
                "bulk_insert_seconds": round(insert_secs, 3),
                "redis_cpu_us_per_session": replay_usage.redis_us_per_op(n as u64),
                "baseline_redis_cpu_us_per_set": base_usage.redis_us_per_op(n as u64),
                "client_cpu_us_per_session": replay_usage.client_us_per_op(n as u64),
                "redis_commands": replay_usage.commands_json(n as u64),
            }),
        })
    }
    .await;
    match delete_namespace(&mut conn, &ns).await {
        Ok(k) => progress(Suite::Replay, format!("deleted {k} keys of {ns}")),
        Err(e) => eprintln!("bench replay: could not delete the keys of {ns}: {e}"),
    }
    outcome
}

pub(super) async fn run(args: &BenchArgs, config: Config) -> Result<Report> {
    let n = args.sessions.unwrap_or(DEFAULT_SESSIONS);
    progress(Suite::Replay, format!("folding {n} sessions"));
    let sessions = snapshots(n);
    let dbs = databases::open(args, Suite::Replay).await?;
    let mut results = Vec::new();
    let mut targets = Vec::new();
    let mut failed = None;
    for bdb in &dbs {
        match one(&config, bdb, &sessions).await {
            Ok(m) => {
                targets.push(target(
                    &format!("{}: replay >= 20000 sessions/s", bdb.label),
                    m.rate,
                    m.rate >= 20_000.0,
                ));
                results.push(m.json);
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    databases::close_all(dbs).await;
    if let Some(e) = failed {
        return Err(e);
    }
    let store = SessionStore::connect(&config).await?;
    let machine = machine(&mut store.connection()).await;
    let json = json!({
        "suite": "replay",
        "machine": machine,
        "sessions": n,
        "page": PAGE,
        "results": results,
        "targets": targets,
    });
    let text = render(&json);
    Ok(Report { json, text })
}

fn render(j: &Value) -> String {
    let mut out = format!(
        "replay suite: {} live snapshots, pages of {}\n\n",
        j["sessions"], j["page"]
    );
    out.push_str(&format!(
        "{:<10} {:>14} {:>10} {:>15} {:>6} | {:>12} {:>16}\n",
        "database",
        "replay sess/s",
        "seconds",
        "plain SET/s",
        "ratio",
        "db read s",
        "redis us/session"
    ));
    let n = |v: &Value| v.as_f64().unwrap_or(0.0);
    for r in j["results"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<10} {:>14.0} {:>10.3} {:>15.0} {:>6.2} | {:>12.3} {:>16.1}\n",
            r["database"].as_str().unwrap_or_default(),
            n(&r["sessions_per_sec"]),
            n(&r["replay_seconds"]),
            n(&r["baseline_sets_per_sec"]),
            n(&r["ratio"]),
            n(&r["snapshot_read_seconds"]),
            n(&r["redis_cpu_us_per_session"]),
        ));
    }
    out.push_str("\nbaseline: pipelined SET key json PX ttl of the same values\n\ntargets:\n");
    out.push_str(&targets_text(
        j["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]),
    ));
    out
}
