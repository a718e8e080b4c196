//! Running C concurrent clients for a while, and what it cost: latencies,
//! CPU time of this process and of Redis, and `INFO commandstats` deltas.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use serde_json::{Map, Value, json};
use vedfolnir_sessions::conn::RedisConn;

use super::round;
use vedfolnir_sessions::error::Result;
use vedfolnir_sessions::id::SessionId;

/// One client's own state, kept across the rounds of a workload.
#[derive(Debug)]
pub(super) struct Client {
    pub rng: StdRng,
    /// Sessions (or plain keys) this client created and will end later.
    pub owned: Vec<SessionId>,
    /// Alternates a lifecycle slot between create and destroy.
    pub flip: bool,
    /// Operations done so far, for values that change on every write.
    pub counter: u64,
}

impl Client {
    /// A client with a reproducible random stream.
    pub fn new(seed: u64) -> Client {
        Client {
            rng: StdRng::seed_from_u64(seed),
            owned: Vec::new(),
            flip: false,
            counter: 0,
        }
    }

    /// `n` clients with distinct, reproducible random streams.
    pub fn many(n: usize, seed: u64) -> Vec<Client> {
        (0..n)
            .map(|i| Client::new(seed.wrapping_mul(1_000_003).wrapping_add(i as u64)))
            .collect()
    }
}

/// One operation of a workload, run by many clients at once.
pub(super) trait Workload: Send + Sync + 'static {
    fn op<'a>(&'a self, client: &'a mut Client) -> BoxFuture<'a, Result<()>>;
}

/// What some runs of a workload measured.
#[derive(Debug, Default)]
pub(super) struct Run {
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub latencies_ns: Vec<u64>,
    pub usage: Usage,
}

impl Run {
    pub fn merge(&mut self, other: Run) {
        self.ops += other.ops;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.elapsed += other.elapsed;
        self.latencies_ns.extend(other.latencies_ns);
        self.usage.add(&other.usage);
    }

    pub fn ops_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 { self.ops as f64 / s } else { 0.0 }
    }

    pub fn latency(&mut self) -> Latency {
        Latency::of(&mut self.latencies_ns)
    }
}

/// Runs `workload` on every client at once until `duration` has passed; each
/// client finishes the operation in hand. Returns the measurements and the
/// clients, for the next round.
pub(super) async fn drive<W: Workload>(
    workload: Arc<W>,
    clients: Vec<Client>,
    duration: Duration,
    conn: &mut RedisConn,
) -> Result<(Run, Vec<Client>)> {
    let before = Usage::now(conn).await?;
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(clients.len());
    for mut client in clients {
        let w = workload.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut errors = 0u64;
            let mut first_error = None;
            loop {
                let t0 = Instant::now();
                if t0 >= deadline {
                    break;
                }
                match w.op(&mut client).await {
                    Ok(()) => lat.push(t0.elapsed().as_nanos() as u64),
                    Err(e) => {
                        errors += 1;
                        if first_error.is_none() {
                            first_error = Some(e.to_string());
                        }
                    }
                }
                client.counter += 1;
            }
            (client, lat, errors, first_error)
        }));
    }
    let mut run = Run::default();
    let mut back = Vec::with_capacity(tasks.len());
    for t in tasks {
        let (client, lat, errors, first_error) = match t.await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        run.ops += lat.len() as u64;
        run.latencies_ns.extend(lat);
        run.errors += errors;
        if run.first_error.is_none() {
            run.first_error = first_error;
        }
        back.push(client);
    }
    run.elapsed = start.elapsed();
    run.usage = Usage::now(conn).await?.since(&before);
    Ok((run, back))
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Latency {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// Percentiles of nanosecond samples (nearest rank).
    pub fn of(ns: &mut [u64]) -> Latency {
        if ns.is_empty() {
            return Latency::default();
        }
        ns.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * ns.len() as f64).ceil() as usize).clamp(1, ns.len());
            ns[rank - 1] as f64 / 1e6
        };
        Latency {
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }

    /// Percentiles of millisecond samples.
    pub fn of_ms(ms: &[f64]) -> Latency {
        let mut ns: Vec<u64> = ms.iter().map(|m| (m.max(0.0) * 1e6) as u64).collect();
        Latency::of(&mut ns)
    }

    /// The percentiles as JSON fields, with `prefix`.
    pub fn fields(&self, prefix: &str, out: &mut Map<String, Value>) {
        out.insert(format!("{prefix}p50_ms"), json!(round(self.p50_ms, 3)));
        out.insert(format!("{prefix}p95_ms"), json!(round(self.p95_ms, 3)));
        out.insert(format!("{prefix}p99_ms"), json!(round(self.p99_ms, 3)));
        out.insert(format!("{prefix}max_ms"), json!(round(self.max_ms, 3)));
    }
}

/// CPU time of this process and of Redis, and Redis's per-command counters.
/// Redis's figures are server-wide: other clients of the same server show up
/// in them.
#[derive(Debug, Clone, Default)]
pub(super) struct Usage {
    /// Seconds of CPU this process used (all threads).
    pub client_cpu: Option<f64>,
    /// Seconds of CPU the Redis server used.
    pub redis_cpu: Option<f64>,
    /// Command → (calls, microseconds), from `INFO commandstats`; commands
    /// that scripts call are counted too, and inside the script's time.
    pub commands: BTreeMap<String, (u64, u64)>,
}

impl Usage {
    pub async fn now(conn: &mut RedisConn) -> Result<Usage> {
        // A cluster answers per primary (a map of node → text): the figures
        // are summed over the primaries.
        let reply: redis::Value = redis::cmd("INFO")
            .arg("cpu")
            .arg("commandstats")
            .query_async(conn)
            .await?;
        let texts: Vec<String> = match reply {
            redis::Value::Map(nodes) => nodes
                .into_iter()
                .filter_map(|(_, v)| redis::from_redis_value::<String>(v).ok())
                .collect(),
            other => {
                vec![redis::from_redis_value::<String>(other).map_err(redis::RedisError::from)?]
            }
        };
        let mut redis_cpu = None;
        let mut commands: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for line in texts.iter().flat_map(|t| t.lines()) {
            if let Some(v) = line
                .strip_prefix("used_cpu_user:")
                .or_else(|| line.strip_prefix("used_cpu_sys:"))
                && let Ok(s) = v.trim().parse::<f64>()
            {
                *redis_cpu.get_or_insert(0.0) += s;
            }
            if let Some(rest) = line.strip_prefix("cmdstat_")
                && let Some((name, stats)) = rest.split_once(':')
            {
                let mut calls = 0;
                let mut usec = 0;
                for kv in stats.split(',') {
                    match kv.split_once('=') {
                        Some(("calls", v)) => calls = v.parse().unwrap_or(0),
                        Some(("usec", v)) => usec = v.parse().unwrap_or(0),
                        _ => {}
                    }
                }
                let e = commands.entry(name.to_owned()).or_default();
                e.0 += calls;
                e.1 += usec;
            }
        }
        Ok(Usage {
            client_cpu: process_cpu_seconds(),
            redis_cpu,
            commands,
        })
    }

    /// What was used between `before` and this.
    pub fn since(&self, before: &Usage) -> Usage {
        let sub = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        let commands = self
            .commands
            .iter()
            .filter_map(|(k, (c, u))| {
                let (c0, u0) = before.commands.get(k).copied().unwrap_or((0, 0));
                let calls = c.saturating_sub(c0);
                (calls > 0).then(|| (k.clone(), (calls, u.saturating_sub(u0))))
            })
            .collect();
        Usage {
            client_cpu: sub(self.client_cpu, before.client_cpu),
            redis_cpu: sub(self.redis_cpu, before.redis_cpu),
            commands,
        }
    }

    pub fn add(&mut self, other: &Usage) {
        let add = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.client_cpu = add(self.client_cpu, other.client_cpu);
        self.redis_cpu = add(self.redis_cpu, other.redis_cpu);
        for (k, (c, u)) in &other.commands {
            let e = self.commands.entry(k.clone()).or_insert((0, 0));
            e.0 += c;
            e.1 += u;
        }
    }

    /// Microseconds of Redis CPU per operation.
    pub fn redis_us_per_op(&self, ops: u64) -> Option<f64> {
        self.redis_cpu
            .filter(|_| ops > 0)
            .map(|s| round(s * 1e6 / ops as f64, 2))
    }

    /// Microseconds of Redis command time per operation, from `INFO
    /// commandstats`: the commands a client sends itself (a script's time
    /// holds the commands it calls, which are not added again). The store's
    /// scripts read with `MGET`, so a `GET` here is always a client's.
    pub fn command_us_per_op(&self, ops: u64) -> Option<f64> {
        if ops == 0 || self.commands.is_empty() {
            return None;
        }
        let scripts = ["evalsha", "evalsha_ro", "eval", "eval_ro", "fcall"];
        let scripted = self.commands.keys().any(|k| scripts.contains(&k.as_str()));
        let sent: &[&str] = if scripted {
            &["evalsha", "evalsha_ro", "eval", "eval_ro", "fcall", "get"]
        } else {
            &["get", "set", "del", "mget"]
        };
        let usec: u64 = sent
            .iter()
            .filter_map(|k| self.commands.get(*k))
            .map(|(_, u)| u)
            .sum();
        Some(round(usec as f64 / ops as f64, 2))
    }

    /// Microseconds of this process's CPU per operation.
    pub fn client_us_per_op(&self, ops: u64) -> Option<f64> {
        self.client_cpu
            .filter(|_| ops > 0)
            .map(|s| round(s * 1e6 / ops as f64, 2))
    }

    /// Per command: calls per operation and microseconds per call.
    pub fn commands_json(&self, ops: u64) -> Value {
        let mut m = Map::new();
        if ops == 0 {
            return Value::Object(m);
        }
        for (k, (calls, usec)) in &self.commands {
            let per_op = *calls as f64 / ops as f64;
            // Noise from other clients of the server.
            if per_op < 0.005 {
                continue;
            }
            m.insert(
                k.clone(),
                json!({
                    "calls_per_op": round(per_op, 3),
                    "usec_per_call": round(*usec as f64 / *calls as f64, 2),
                }),
            );
        }
        Value::Object(m)
    }
}

/// User plus system CPU seconds of this process, from `/proc/self/stat`
/// (Linux; `None` elsewhere).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; `rest` starts at field 3.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut ns: Vec<u64> = (1..=100).map(|i| i * 1_000_000).collect();
        let l = Latency::of(&mut ns);
        assert_eq!(l.p50_ms, 50.0);
        assert_eq!(l.p95_ms, 95.0);
        assert_eq!(l.p99_ms, 99.0);
        assert_eq!(l.max_ms, 100.0);
        assert_eq!(Latency::of(&mut []), Latency::default());
        assert_eq!(Latency::of_ms(&[2.0]).p99_ms, 2.0);
    }

    #[test]
    fn usage_deltas() {
        let mut a = Usage {
            client_cpu: Some(1.0),
            redis_cpu: Some(2.0),
            commands: BTreeMap::from([("get".to_owned(), (10, 100))]),
        };
        let b = Usage {
            client_cpu: Some(1.5),
            redis_cpu: Some(3.0),
            commands: BTreeMap::from([("get".to_owned(), (30, 300)), ("set".to_owned(), (5, 50))]),
        };
        let d = b.since(&a);
        assert_eq!(d.client_cpu, Some(0.5));
        assert_eq!(d.commands["get"], (20, 200));
        assert_eq!(d.commands["set"], (5, 50));
        assert_eq!(d.redis_us_per_op(10), Some(100_000.0));
        a.add(&d);
        assert_eq!(a.commands["get"], (30, 300));
        assert!(process_cpu_seconds().is_some());
    }
}
