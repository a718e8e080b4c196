//! Partition leases: which worker process does which role on which
//! partition, and the fencing token that keeps a worker that lost its lease
//! from committing.
//!
//! # Leases
//!
//! Each role ([`Role`]: the audit consumer, the expiry reaper, the healer)
//! has leases of its own, so that any split of the roles over processes
//! (`vedfolnir-worker --only audit` beside `--only reaper`) covers every
//! partition: a process competes only with the processes that run the same
//! role. Every worker heartbeats into its role's set of workers (a sorted
//! set: worker name → last heartbeat, ms) and holds a lease (`SET NX PX`,
//! value = its name) for each partition it works on. On every tick it:
//!
//! 1. renews its leases (only those still holding its name);
//! 2. computes its fair share, `ceil(partitions / live workers of the
//!    role)`, where a worker is live while its heartbeat is younger than the
//!    lease TTL;
//! 3. releases leases above its share (the newest worker picks them up), and
//!    takes free ones up to its share, starting at a partition derived from
//!    its name so that workers do not all contend for partition 0.
//!
//! | role | lease key | workers set | partitions |
//! |---|---|---|---|
//! | audit | `<ns>lease:{p}` (the key of earlier versions) | `<ns>workers` | every partition |
//! | reaper | `<ns>lease:{p}:reaper` | `<ns>workers:reaper` | every partition |
//! | healer | `<ns>lease:{0}:healer` | `<ns>workers:healer` | one lease: the healer checks every partition |
//!
//! (Without partitions the `:{p}` part is absent: `vedfolnir:lease`,
//! `vedfolnir:lease:reaper`, `vedfolnir:lease:healer`.)
//!
//! A worker that dies stops renewing: its leases run out after
//! `WORKER_LEASE_MS` and the others take its partitions over.
//!
//! # Fencing
//!
//! A lease alone cannot keep two workers apart: a worker paused past its
//! lease (SIGSTOP, a long GC-like stall, a VM migration) resumes believing it
//! still holds it, and a Redis that lost its data forgets every lease. What
//! the audit consumer writes is therefore fenced in the database: taking an
//! audit lease bumps the partition's token in `lease_fences` (`Fence`),
//! and every transaction of the consumer checks, inside the transaction,
//! that the token is still its own before it writes anything (see
//! `audit::sink`). The token only grows, and it lives in the
//! database, so it never goes backwards when Redis loses its data. The
//! reaper and the healer need no fence: the reaper's script expires a
//! session once however many reapers run, and a replay never overwrites a
//! newer session.

use std::collections::BTreeSet;
use std::sync::LazyLock;
use std::time::Duration;

use redis::{AsyncCommands as _, Script};
#[cfg(feature = "audit")]
use sea_orm::sea_query::{Expr, OnConflict, Query};
#[cfg(feature = "audit")]
use sea_orm::{ConnectionTrait as _, DatabaseConnection, DbBackend};

#[cfg(feature = "audit")]
use crate::audit::entity::lease_fences;
use crate::config::{ConfigError, non_empty, parse};
use crate::conn::RedisConn;
use crate::error::Result;
use crate::keys::KeySpace;

/// A worker role. Each has its own leases (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The audit consumer of a partition's stream.
    Audit,
    /// The expiry reaper of a partition's expiry index.
    Reaper,
    /// The healer, which watches every partition: one lease in all.
    Healer,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::Audit, Role::Reaper, Role::Healer];

    /// The role's name, as written in keys and in `lease_fences`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Audit => "audit",
            Role::Reaper => "reaper",
            Role::Healer => "healer",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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

/// Deletes the lock or lease `key` only while `holder` holds it: 1 when it
/// did, 0 when someone else holds it now or nobody does.
pub(crate) async fn release_held(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &str,
    holder: &str,
) -> redis::RedisResult<i64> {
    RELEASE.key(key).arg(holder).invoke_async(conn).await
}

/// Extends the lock or lease `key` to `ttl_ms` from now only while `holder`
/// holds it: 1 when it did, 0 when someone else holds it now or nobody does.
pub(crate) async fn renew_held(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &str,
    holder: &str,
    ttl_ms: u64,
) -> redis::RedisResult<i64> {
    RENEW
        .key(key)
        .arg(holder)
        .arg(ttl_ms)
        .invoke_async(conn)
        .await
}

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

/// One worker's leases for one role.
#[derive(Debug)]
pub struct Leases {
    conn: RedisConn,
    keys: KeySpace,
    name: String,
    ttl: Duration,
    role: Role,
    owned: BTreeSet<u32>,
}

impl Leases {
    /// The audit leases of the worker `name` (unique per process); see
    /// [`Leases::with_role`] for the others.
    pub fn new(conn: RedisConn, keys: KeySpace, name: impl Into<String>, ttl: Duration) -> Self {
        Leases {
            conn,
            keys,
            name: name.into(),
            ttl,
            role: Role::Audit,
            owned: BTreeSet::new(),
        }
    }

    /// The same worker's leases for `role` instead.
    pub fn with_role(mut self, role: Role) -> Self {
        self.role = role;
        self
    }

    /// The role these leases are for.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The partitions held now.
    pub fn owned(&self) -> &BTreeSet<u32> {
        &self.owned
    }

    /// How many leases the role has: one per partition, one in all for the
    /// healer.
    pub fn partitions(&self) -> u32 {
        match self.role {
            Role::Healer => 1,
            Role::Audit | Role::Reaper => self.keys.partitions(),
        }
    }

    /// The lease key of partition `p` for this role (see the module docs).
    pub fn key(&self, p: u32) -> String {
        match self.role {
            Role::Audit => self.keys.lease(p).to_owned(),
            Role::Reaper => format!("{}:reaper", self.keys.lease(p)),
            Role::Healer => format!("{}:healer", self.keys.lease(0)),
        }
    }

    /// The role's set of live workers.
    fn workers(&self) -> String {
        match self.role {
            Role::Audit => self.keys.workers(),
            role => format!("{}:{role}", self.keys.workers()),
        }
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
        let workers = self.workers();
        let _: () = self.conn.zadd(&workers, &self.name, now).await?;
        let _: () = self
            .conn
            .zrembyscore(&workers, "-inf", now - self.ttl_ms() as i64)
            .await?;
        let live: u32 = self.conn.zcard(&workers).await?;
        let partitions = self.partitions();
        let share = partitions.div_ceil(live.max(1));
        for p in self.owned.clone() {
            let (key, ttl_ms) = (self.key(p), self.ttl_ms());
            let renewed = renew_held(&mut self.conn, &key, &self.name, ttl_ms).await?;
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
                    .arg(self.key(p))
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
        let key = self.key(p);
        release_held(&mut self.conn, &key, &self.name).await?;
        Ok(())
    }

    /// Gives up the lease of partition `p` (when the work on it stopped by
    /// itself: its fence was taken over), so that whoever holds the partition
    /// now keeps it, and this worker may take it again later.
    pub async fn release(&mut self, p: u32) -> Result<()> {
        if self.owned.remove(&p) {
            self.give_up(p).await?;
        }
        Ok(())
    }

    /// Releases every lease and leaves the worker set, so the others take
    /// over at once (on a clean shutdown, after the partitions' work stopped).
    pub async fn release_all(&mut self) -> Result<()> {
        for p in std::mem::take(&mut self.owned) {
            self.give_up(p).await?;
        }
        let _: () = self.conn.zrem(self.workers(), &self.name).await?;
        Ok(())
    }
}

/// A fencing token: proof, checked by the database inside each transaction,
/// that this worker still holds its lease on `stream` for `role`.
///
/// [`Fence::acquire`] bumps the token when the lease is taken; a successor
/// bumps it again, after which every commit that checks the old token is
/// refused (see [`crate::audit::sink::AuditSink::write_fenced`]). `ttl` is
/// the lease's: a transaction of the holder that sits idle longer than that
/// (the process was stopped inside it) is ended by PostgreSQL, so that it
/// cannot hold its locks, and its successor, forever.
#[cfg(feature = "audit")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The partition's stream.
    pub stream: String,
    /// The role the lease is for.
    pub role: Role,
    /// The token this worker got.
    pub token: i64,
    /// The lease TTL (`WORKER_LEASE_MS`).
    pub ttl: Duration,
}

#[cfg(feature = "audit")]
impl Fence {
    /// Bumps the token of `(stream, role)` for the worker `holder`, which
    /// has just taken the lease, and returns it. On PostgreSQL the bump waits
    /// at most `ttl` for a predecessor's transaction that is still checking
    /// the old token (`lock_timeout`); then it fails and is tried again by the
    /// caller (the predecessor's transaction is ended by its idle timeout, or
    /// commits, first).
    pub async fn acquire(
        db: &DatabaseConnection,
        stream: &str,
        role: Role,
        holder: &str,
        ttl: Duration,
    ) -> Result<Fence> {
        use lease_fences::Column as C;
        use sea_orm::ExprTrait as _;
        let txn = crate::audit::db::begin(db).await?;
        let backend = txn.get_database_backend();
        if backend == DbBackend::Postgres {
            txn.execute_raw(sea_orm::Statement::from_sql_and_values(
                backend,
                "SELECT set_config('lock_timeout', $1, true)",
                [format!("{}ms", ttl.as_millis().max(1)).into()],
            ))
            .await?;
        }
        let now = chrono::Utc::now();
        let mut insert = Query::insert();
        insert
            .into_table(lease_fences::Entity)
            .columns([C::Stream, C::Role, C::Token, C::Holder, C::UpdatedAt])
            .values([
                stream.into(),
                role.as_str().into(),
                1i64.into(),
                holder.into(),
                now.into(),
            ])
            .map_err(|e| {
                crate::error::Error::Corrupt(format!("building the fence statement: {e}"))
            })?
            .on_conflict(
                OnConflict::columns([C::Stream, C::Role])
                    .value(C::Token, Expr::col((lease_fences::Entity, C::Token)).add(1))
                    .update_columns([C::Holder, C::UpdatedAt])
                    .to_owned(),
            )
            .returning_col(C::Token);
        let row = txn.query_one(&insert).await?.ok_or_else(|| {
            crate::error::Error::Corrupt(format!("no fence returned for {stream}"))
        })?;
        let token: i64 = row.try_get_by_index(0)?;
        txn.commit().await?;
        tracing::info!(stream, role = %role, token, "fence taken");
        Ok(Fence {
            stream: stream.to_owned(),
            role,
            token,
            ttl,
        })
    }

    /// The token currently recorded for `(stream, role)`, if any.
    pub async fn current(db: &DatabaseConnection, stream: &str, role: Role) -> Result<Option<i64>> {
        use sea_orm::EntityTrait as _;
        Ok(
            lease_fences::Entity::find_by_id((stream.to_owned(), role.as_str().to_owned()))
                .one(db)
                .await?
                .map(|m| m.token),
        )
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
