//! Partition leases: which worker process consumes and reaps which partition.
//!
//! Every worker heartbeats into `<ns>workers` (a sorted set: worker name →
//! last heartbeat, ms) and holds a lease `<ns>lease:{p}` (`SET NX PX`, value =
//! its name) for each partition it works on. On every tick it:
//!
//! 1. renews its leases (only those still holding its name);
//! 2. computes its fair share, `ceil(partitions / live workers)`, where a
//!    worker is live while its heartbeat is younger than the lease TTL;
//! 3. releases leases above its share (the newest worker picks them up), and
//!    takes free ones up to its share, starting at a partition derived from
//!    its name so that workers do not all contend for partition 0.
//!
//! A worker that dies stops renewing: its leases run out after
//! `WORKER_LEASE_MS` and the others take its partitions over. A lease is
//! load spreading, not a lock the invariants depend on: two consumers on one
//! partition (a worker paused past its lease) are still exactly once in
//! effect, because the audit write deduplicates and snapshots only move
//! forward, and the reaper's script expires a session only once.

use std::collections::BTreeSet;
use std::sync::LazyLock;
use std::time::Duration;

use redis::{AsyncCommands as _, Script};

use crate::config::{ConfigError, non_empty, parse};
use crate::conn::RedisConn;
use crate::error::Result;
use crate::keys::KeySpace;

static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
           return redis.call('PEXPIRE', KEYS[1], ARGV[2]) \
         end return 0",
    )
});

static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
           return redis.call('DEL', KEYS[1]) \
         end return 0",
    )
});

/// `WORKER_LEASE_MS` (10000): how long a partition stays with a worker that
/// stopped renewing it.
pub fn lease_ttl_from_lookup(
    get: impl Fn(&str) -> Option<String>,
) -> std::result::Result<Duration, ConfigError> {
    let var = non_empty(&get);
    let ms: u64 = parse(
        &var,
        "WORKER_LEASE_MS",
        10_000,
        "milliseconds, at least 100",
    )?;
    if ms < 100 {
        return Err(ConfigError {
            var: "WORKER_LEASE_MS",
            value: ms.to_string(),
            reason: "milliseconds, at least 100".to_owned(),
        });
    }
    Ok(Duration::from_millis(ms))
}

/// What one tick changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// Partitions taken now.
    pub acquired: Vec<u32>,
    /// Partitions given up or lost now.
    pub released: Vec<u32>,
}

/// One worker's leases.
#[derive(Debug)]
pub struct Leases {
    conn: RedisConn,
    keys: KeySpace,
    name: String,
    ttl: Duration,
    owned: BTreeSet<u32>,
}

impl Leases {
    /// Leases for the worker `name` (unique per process).
    pub fn new(conn: RedisConn, keys: KeySpace, name: impl Into<String>, ttl: Duration) -> Self {
        Leases {
            conn,
            keys,
            name: name.into(),
            ttl,
            owned: BTreeSet::new(),
        }
    }

    /// The partitions held now.
    pub fn owned(&self) -> &BTreeSet<u32> {
        &self.owned
    }

    /// How often to tick: a third of the TTL, so a lease survives two missed
    /// renewals.
    pub fn interval(&self) -> Duration {
        self.ttl / 3
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    /// Heartbeat, renew, rebalance (see the module docs).
    pub async fn tick(&mut self) -> Result<Change> {
        let mut change = Change::default();
        let now = chrono::Utc::now().timestamp_millis();
        let workers = self.keys.workers();
        let _: () = self.conn.zadd(&workers, &self.name, now).await?;
        let _: () = self
            .conn
            .zrembyscore(&workers, "-inf", now - self.ttl_ms() as i64)
            .await?;
        let live: u32 = self.conn.zcard(&workers).await?;
        let partitions = self.keys.partitions();
        let share = partitions.div_ceil(live.max(1));
        for p in self.owned.clone() {
            let mut inv = RENEW.key(self.keys.lease(p));
            inv.arg(&self.name).arg(self.ttl_ms());
            let renewed: i64 = inv.invoke_async(&mut self.conn).await?;
            if renewed == 0 {
                self.owned.remove(&p);
                change.released.push(p);
            }
        }
        while self.owned.len() as u32 > share {
            let Some(p) = self.owned.pop_last() else {
                break;
            };
            self.give_up(p).await?;
            change.released.push(p);
        }
        if (self.owned.len() as u32) < share {
            let start = name_hash(&self.name) % partitions;
            for k in 0..partitions {
                if self.owned.len() as u32 >= share {
                    break;
                }
                let p = (start + k) % partitions;
                if self.owned.contains(&p) {
                    continue;
                }
                let taken: Option<String> = redis::cmd("SET")
                    .arg(self.keys.lease(p))
                    .arg(&self.name)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.ttl_ms())
                    .query_async(&mut self.conn)
                    .await?;
                if taken.is_some() {
                    self.owned.insert(p);
                    change.acquired.push(p);
                }
            }
        }
        Ok(change)
    }

    async fn give_up(&mut self, p: u32) -> Result<()> {
        let mut inv = RELEASE.key(self.keys.lease(p));
        inv.arg(&self.name);
        let _: i64 = inv.invoke_async(&mut self.conn).await?;
        Ok(())
    }

    /// Releases every lease and leaves the worker set, so the others take
    /// over at once (on a clean shutdown, after the partitions' work stopped).
    pub async fn release_all(&mut self) -> Result<()> {
        for p in std::mem::take(&mut self.owned) {
            self.give_up(p).await?;
        }
        let _: () = self.conn.zrem(self.keys.workers(), &self.name).await?;
        Ok(())
    }
}

/// A stable number from a worker name (FNV-1a), to spread first choices.
fn name_hash(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ttl_is_validated() {
        assert_eq!(
            lease_ttl_from_lookup(|_| None).expect("default"),
            Duration::from_secs(10)
        );
        let e = lease_ttl_from_lookup(|k| (k == "WORKER_LEASE_MS").then(|| "50".to_owned()))
            .expect_err("too short");
        assert_eq!(e.var, "WORKER_LEASE_MS");
        let e = lease_ttl_from_lookup(|k| (k == "WORKER_LEASE_MS").then(|| "soon".to_owned()))
            .expect_err("not a number");
        assert_eq!(e.var, "WORKER_LEASE_MS");
    }
}
