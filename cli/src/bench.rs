//! `vedfolnir-sessions bench`: every speed claim of the product, measured
//! beside a baseline in the same run, with the same client and concurrency.
//!
//! Five suites (`--suite`):
//!
//! - `store` (the default): create, load, update, `update_from` (the web
//!   layer's write on the state it loaded), touch and a realistic mix, each
//!   against a plain store without events (`SET key json PX ttl`,
//!   `GET`) on the same shared connection; Redis memory per session and per
//!   stream entry.
//! - `audit`: how fast the real [`AuditConsumer`](vedfolnir_sessions::audit::AuditConsumer)
//!   drains a full stream into each audit database, beside that database's
//!   own ceiling for the same rows; and the consumer lag under a steady write
//!   load.
//! - `replay`: [`recovery::replay`](vedfolnir_sessions::recovery::replay) of N live
//!   snapshots into an empty namespace, beside pipelined plain `SET`s of the
//!   same values.
//! - `sync`: what `DB_SESSION_SYNC` costs an update, per database.
//! - `rebuild`: `snapshots rebuild` of N sessions from the event table,
//!   beside one read of that table in the same order (the floor).
//!
//! Every suite works in its own key namespace (`vedfolnir-bench:<uuid>:`)
//! and deletes it at the end; the default databases (a temporary SQLite file
//! and a fresh PostgreSQL database) are dropped at the end too. Progress goes
//! to stderr; the report (a table, or JSON with `--json`) to stdout.
//! `BENCHMARKS.md` holds the figures of this machine and the commands.
//!
//! # Layout
//!
//! - `driver`: C concurrent clients for a duration, latencies, CPU and
//!   `INFO commandstats` deltas.
//! - `databases`: the audit databases a suite runs against.
//! - `store`, `audit`, `replay`, `sync`, `rebuild`: the suites.

mod audit;
mod databases;
mod driver;
mod rebuild;
mod replay;
mod store;
mod sync;

use std::time::Duration;

use serde_json::{Value, json};

use vedfolnir_sessions::config::Config;
use vedfolnir_sessions::error::{Error, Result};

/// The store suite's workloads, for `--workload`.
const WORKLOADS: [&str; 6] = ["create", "load", "update", "update_from", "touch", "mixed"];

/// Which benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Suite {
    /// Store operations against a plain Redis store.
    #[default]
    Store,
    /// Audit consumer throughput and lag against the database's ceiling.
    Audit,
    /// Replay from the audit database against pipelined plain SETs.
    Replay,
    /// Update latency with and without `DB_SESSION_SYNC`.
    Sync,
    /// `snapshots rebuild` from the event table against one read of it.
    Rebuild,
}

impl Suite {
    fn name(self) -> &'static str {
        match self {
            Suite::Store => "store",
            Suite::Audit => "audit",
            Suite::Replay => "replay",
            Suite::Sync => "sync",
            Suite::Rebuild => "rebuild",
        }
    }
}

/// Arguments of `vedfolnir-sessions bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The suite to run.
    #[arg(long, value_enum, default_value_t = Suite::Store)]
    pub suite: Suite,
    /// Concurrent clients, all sharing one store (one multiplexed connection).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Seconds each workload runs, for the store and again for the baseline
    /// (fractions allowed).
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Each workload alternates store and baseline this many times, so that
    /// a disturbance (other work on the machine) hits both sides alike.
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// Store suite: run only this workload (create, load, update,
    /// update_from, touch, mixed); repeatable. Default: all.
    #[arg(long = "workload", value_name = "OP")]
    pub workloads: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Store suite: also run it on this Redis Cluster (seed nodes,
    /// `host:port,…`, 16 partitions) after the configured Redis, in the same
    /// run, and report both.
    #[arg(long, value_name = "NODES")]
    pub also_cluster: Option<String>,
    /// Audit database URL (audit, replay and sync suites); repeatable.
    /// Default: a temporary SQLite file and a fresh PostgreSQL database on
    /// `--pg-server`, both removed at the end. A database given here is
    /// migrated and written to, and kept.
    #[arg(long = "database", value_name = "URL")]
    pub databases: Vec<String>,
    /// PostgreSQL server on which the default database is created and
    /// dropped; a query string is kept (`postgres://postgres@localhost?host=/var/run/postgresql`
    /// for the Unix socket).
    #[arg(
        long,
        value_name = "URL",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    pub pg_server: String,
    /// Sessions: the replay and rebuild suites' sessions (default 50000); the pool the
    /// store and sync suites' load, update and touch pick from (default
    /// 250 per client, 1000 to 10000).
    #[arg(long)]
    pub sessions: Option<usize>,
    /// Audit suite: events in the stream before the timed drain.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Audit suite: steady write rate for the lag measurement, events/s.
    #[arg(long, default_value_t = 5000)]
    pub rate: u32,
    /// Audit suite: seconds of steady write load for the lag measurement.
    #[arg(long, default_value_t = 10.0)]
    pub lag_duration: f64,
}

impl BenchArgs {
    fn validate(&self) -> Result<()> {
        if self.clients == 0 {
            return Err(Error::InvalidInput(
                "--clients must be at least 1".to_owned(),
            ));
        }
        if !(self.duration.is_finite() && self.duration > 0.0 && self.duration <= 3600.0) {
            return Err(Error::InvalidInput(format!(
                "--duration must be a number of seconds in (0, 3600], got {}",
                self.duration
            )));
        }
        if self.rounds == 0 {
            return Err(Error::InvalidInput(
                "--rounds must be at least 1".to_owned(),
            ));
        }
        if !(self.lag_duration.is_finite() && self.lag_duration > 0.0) {
            return Err(Error::InvalidInput(
                "--lag-duration must be a positive number of seconds".to_owned(),
            ));
        }
        if let Some(w) = self
            .workloads
            .iter()
            .find(|w| !WORKLOADS.contains(&w.as_str()))
        {
            return Err(Error::InvalidInput(format!(
                "unknown --workload {w:?}: one of {}",
                WORKLOADS.join(", ")
            )));
        }
        if self.rate == 0 || self.events == 0 || self.sessions == Some(0) {
            return Err(Error::InvalidInput(
                "--rate, --events and --sessions must be at least 1".to_owned(),
            ));
        }
        Ok(())
    }

    /// The time one side of one workload runs in one round.
    fn slice(&self) -> Duration {
        Duration::from_secs_f64(self.duration / f64::from(self.rounds))
    }
}

/// Runs the benchmark and returns its report (a table, or JSON).
pub async fn run(args: BenchArgs, config: Config) -> Result<crate::cli::Output> {
    args.validate()?;
    let load_before = load_average();
    let mut report = match args.suite {
        Suite::Store => match &args.also_cluster {
            None => store::run(&args, config).await?,
            Some(nodes) => {
                let nodes = vedfolnir_sessions::config::parse_cluster_nodes(nodes, false, None)?;
                let standalone = store::run(&args, config.clone()).await?;
                let on_cluster = config.with_cluster(nodes, 16);
                progress(Suite::Store, "again on the cluster");
                let cluster = store::run(&args, on_cluster).await?;
                Report {
                    text: format!(
                        "== standalone Redis\n{}\n== Redis Cluster (16 partitions)\n{}",
                        standalone.text, cluster.text
                    ),
                    json: json!({
                        "machine": standalone.json.get("machine").cloned().unwrap_or(Value::Null),
                        "standalone": standalone.json,
                        "cluster": cluster.json,
                    }),
                }
            }
        },
        Suite::Audit => audit::run(&args, config).await?,
        Suite::Replay => replay::run(&args, config).await?,
        Suite::Sync => sync::run(&args, config).await?,
        Suite::Rebuild => rebuild::run(&args, config).await?,
    };
    // Other work on the machine disturbs the figures; the load says how much.
    let load = json!({"start": load_before, "end": load_average()});
    report.text.push_str(&format!(
        "\nload average (1, 5, 15 min): {} at the start, {} at the end\n",
        load["start"].as_str().unwrap_or("?"),
        load["end"].as_str().unwrap_or("?")
    ));
    if let Some(m) = report
        .json
        .get_mut("machine")
        .and_then(Value::as_object_mut)
    {
        m.insert("load_average".to_owned(), load);
    }
    Ok(if args.json {
        crate::cli::Output::Json(report.json)
    } else {
        crate::cli::Output::Text(report.text)
    })
}

/// A suite's report in both forms.
#[derive(Debug)]
struct Report {
    json: Value,
    text: String,
}

/// One line of progress, on stderr.
fn progress(suite: Suite, message: impl std::fmt::Display) {
    eprintln!("bench {}: {message}", suite.name());
}

/// A fresh key namespace for one run.
fn namespace() -> String {
    format!("vedfolnir-bench:{}:", uuid::Uuid::new_v4().simple())
}

/// Deletes every key of a namespace; returns how many there were.
async fn delete_namespace(conn: &mut vedfolnir_sessions::conn::RedisConn, ns: &str) -> Result<u64> {
    let keys = conn.scan_all(&format!("{ns}*")).await?;
    let mut deleted = 0;
    // On a cluster, redis-rs splits a multi-key UNLINK by slot.
    for chunk in keys.chunks(1000) {
        let n: u64 = redis::cmd("UNLINK").arg(chunk).query_async(conn).await?;
        deleted += n;
    }
    Ok(deleted)
}

/// The machine a figure was measured on.
async fn machine(conn: &mut vedfolnir_sessions::conn::RedisConn) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let memory_kb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .unwrap_or_default();
    let redis_version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or_default()
        .trim()
        .to_owned();
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "memory_gib": memory_kb.map(|k| round(k as f64 / 1024.0 / 1024.0, 1)),
        "redis_version": redis_version,
    })
}

/// The first three fields of `/proc/loadavg`.
fn load_average() -> Option<String> {
    let l = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// `x` rounded to `digits` decimals, for reports.
fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// `a / b`, or 0 when `b` is 0.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// A target and whether this run met it.
fn target(name: &str, value: f64, met: bool) -> Value {
    json!({"target": name, "value": round(value, 3), "met": met})
}

/// The targets as lines of the text report.
fn targets_text(targets: &[Value]) -> String {
    let mut out = String::new();
    for t in targets {
        out.push_str(&format!(
            "  {:<48} {:>10}  {}\n",
            t["target"].as_str().unwrap_or_default(),
            t["value"],
            match t["met"].as_bool() {
                Some(true) => "met",
                Some(false) => "NOT MET",
                None => "(stated for another setting)",
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_and_ratios() {
        assert_eq!(round(1.23456, 2), 1.23);
        assert_eq!(ratio(1.0, 0.0), 0.0);
        assert_eq!(ratio(3.0, 2.0), 1.5);
    }

    #[test]
    fn arguments_are_checked() {
        use clap::Parser as _;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: BenchArgs,
        }
        let ok = Cli::parse_from(["bench", "--duration", "0.5", "--clients", "4"]);
        assert!(ok.args.validate().is_ok());
        assert_eq!(ok.args.suite, Suite::Store);
        assert_eq!(ok.args.slice(), Duration::from_millis(50));
        let bad = Cli::parse_from(["bench", "--duration", "0"]);
        assert!(bad.args.validate().is_err());
        let bad = Cli::parse_from(["bench", "--clients", "0"]);
        assert!(bad.args.validate().is_err());
    }
}
