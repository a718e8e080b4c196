//! The sync suite: what `DB_SESSION_SYNC` costs an update. Per database, the
//! same clients on the same connection update sessions with the store alone
//! (`db_sync` off) and with the audit database attached and `db_sync` on
//! (every update also commits its event and snapshot before it returns),
//! alternating `--rounds` times. Each side updates sessions it created
//! itself, so the synchronous side's history in the database has no gaps.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use rand::Rng as _;
use serde_json::{Map, Value, json};

use super::databases::{self, BenchDb};
use super::driver::{Client, Run, Workload, drive};
use super::store::{changes, new_session};
use super::{
    BenchArgs, Report, Suite, delete_namespace, machine, namespace, progress, ratio, round,
};
use vedfolnir_sessions::audit::AuditSink;
use vedfolnir_sessions::config::Config;
use vedfolnir_sessions::error::{Error, Result};
use vedfolnir_sessions::id::SessionId;
use vedfolnir_sessions::store::SessionStore;

struct Update {
    store: SessionStore,
    pool: Vec<SessionId>,
}

impl Workload for Update {
    fn op<'a>(&'a self, client: &'a mut Client) -> BoxFuture<'a, Result<()>> {
        async move {
            let id = &self.pool[client.rng.random_range(0..self.pool.len())];
            self.store.update(id, changes(client)).await?;
            Ok(())
        }
        .boxed()
    }
}

async fn pool(store: &SessionStore, clients: usize, size: usize) -> Result<Vec<SessionId>> {
    let users = (size / 4).max(1) as u64;
    let per = size.div_ceil(clients);
    let mut tasks = Vec::new();
    for (i, mut c) in Client::many(clients, 21).into_iter().enumerate() {
        let store = store.clone();
        let n = per.min(size.saturating_sub(i * per));
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                out.push(
                    store
                        .create(new_session(&mut c.rng, users))
                        .await?
                        .session_id,
                );
            }
            Ok::<_, Error>(out)
        }));
    }
    let mut ids = Vec::with_capacity(size);
    for t in tasks {
        match t.await {
            Ok(r) => ids.extend(r?),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    Ok(ids)
}

fn side(label: &str, db_sync: bool, run: &mut Run) -> Value {
    let mut m = Map::new();
    m.insert("database".to_owned(), json!(label));
    m.insert("db_sync".to_owned(), json!(db_sync));
    m.insert("ops_per_sec".to_owned(), json!(round(run.ops_per_sec(), 0)));
    run.latency().fields("", &mut m);
    m.insert("ops".to_owned(), json!(run.ops));
    m.insert("errors".to_owned(), json!(run.errors));
    if let Some(e) = &run.first_error {
        m.insert("first_error".to_owned(), json!(e));
    }
    m.insert(
        "client_cpu_us_per_op".to_owned(),
        json!(run.usage.client_us_per_op(run.ops)),
    );
    Value::Object(m)
}

async fn one(args: &BenchArgs, config: &Config, bdb: &BenchDb) -> Result<(Value, Value, Value)> {
    let ns = namespace();
    let mut config = config
        .clone()
        .with_namespace(&ns)
        .with_touch_interval(Duration::from_secs(24 * 3600));
    config.db_sync = true;
    let plain = SessionStore::connect(&config).await?;
    let synced = plain.clone().with_audit(AuditSink::new(
        bdb.db.clone(),
        config.session_timeout,
        config.event_stream.clone(),
    ));
    let mut conn = plain.connection();
    let outcome = async {
        let size = args
            .sessions
            .unwrap_or_else(|| (args.clients * 16).clamp(256, 4096));
        progress(
            Suite::Sync,
            format!("{}: creating 2 x {size} sessions", bdb.label),
        );
        let plain_pool = pool(&plain, args.clients, size).await?;
        let synced_pool = pool(&synced, args.clients, size).await?;
        let off = Arc::new(Update {
            store: plain.clone(),
            pool: plain_pool,
        });
        let on = Arc::new(Update {
            store: synced.clone(),
            pool: synced_pool,
        });
        let (mut off_run, mut on_run) = (Run::default(), Run::default());
        let mut off_clients = Client::many(args.clients, 31);
        let mut on_clients = Client::many(args.clients, 37);
        for round in 0..args.rounds {
            progress(
                Suite::Sync,
                format!(
                    "{}: update, db_sync off then on, round {}/{}",
                    bdb.label,
                    round + 1,
                    args.rounds
                ),
            );
            let (r, c) = drive(off.clone(), off_clients, args.slice(), &mut conn).await?;
            off_clients = c;
            off_run.merge(r);
            let (r, c) = drive(on.clone(), on_clients, args.slice(), &mut conn).await?;
            on_clients = c;
            on_run.merge(r);
        }
        if off_run.ops == 0 || on_run.ops == 0 {
            return Err(Error::InvalidInput(format!(
                "{}: no update succeeded ({})",
                bdb.label,
                on_run
                    .first_error
                    .as_deref()
                    .or(off_run.first_error.as_deref())
                    .unwrap_or("no time to run one")
            )));
        }
        let off_lat = off_run.latency();
        let on_lat = on_run.latency();
        let cost = json!({
            "database": bdb.label,
            "version": bdb.version,
            "added_p50_ms": round(on_lat.p50_ms - off_lat.p50_ms, 3),
            "added_p99_ms": round(on_lat.p99_ms - off_lat.p99_ms, 3),
            "throughput_ratio": round(ratio(on_run.ops_per_sec(), off_run.ops_per_sec()), 3),
        });
        Ok((
            side(&bdb.label, false, &mut off_run),
            side(&bdb.label, true, &mut on_run),
            cost,
        ))
    }
    .await;
    if let Err(e) = delete_namespace(&mut conn, &ns).await {
        eprintln!("bench sync: could not delete the keys of {ns}: {e}");
    }
    outcome
}

pub(super) async fn run(args: &BenchArgs, config: Config) -> Result<Report> {
    let dbs = databases::open(args, Suite::Sync).await?;
    let mut results = Vec::new();
    let mut costs = Vec::new();
    let mut failed = None;
    for bdb in &dbs {
        match one(args, &config, bdb).await {
            Ok((off, on, cost)) => {
                results.push(off);
                results.push(on);
                costs.push(cost);
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
        "suite": "sync",
        "machine": machine,
        "clients": args.clients,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "results": results,
        "cost": costs,
    });
    let text = render(&json);
    Ok(Report { json, text })
}

fn render(j: &Value) -> String {
    let mut out = format!(
        "sync suite: update, {} clients on one connection, {} s per side ({} rounds)\n\n",
        j["clients"], j["duration_s"], j["rounds"]
    );
    out.push_str(&format!(
        "{:<10} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8}\n",
        "database", "db_sync", "ops/s", "p50 ms", "p95 ms", "p99 ms", "max ms"
    ));
    let n = |v: &Value| v.as_f64().unwrap_or(0.0);
    for r in j["results"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<10} {:>7} {:>9.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3}\n",
            r["database"].as_str().unwrap_or_default(),
            if r["db_sync"].as_bool().unwrap_or(false) {
                "on"
            } else {
                "off"
            },
            n(&r["ops_per_sec"]),
            n(&r["p50_ms"]),
            n(&r["p95_ms"]),
            n(&r["p99_ms"]),
            n(&r["max_ms"]),
        ));
    }
    out.push_str("\ncost of DB_SESSION_SYNC:\n");
    for c in j["cost"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {}: +{} ms p50, +{} ms p99, {}x the throughput\n",
            c["database"].as_str().unwrap_or_default(),
            c["added_p50_ms"],
            c["added_p99_ms"],
            c["throughput_ratio"]
        ));
    }
    out
}
