//! The audit consumer: the consumer group `audit` on the event stream, feeding
//! the [`AuditSink`].
//!
//! Start-up: create the group (with `MKSTREAM`, from the stream's beginning)
//! unless it exists, drain this consumer's own pending entries, then claim
//! entries that other consumers left idle longer than `AUDIT_CLAIM_IDLE_MS`
//! (`XAUTOCLAIM`); a consumer that writes under a lease ([`Fence`]) claims
//! every other consumer's entries at once on its first pass, since no one
//! else can commit them any more. Then read new entries in batches
//! (`XREADGROUP … COUNT n BLOCK t`) on a connection of its own whose response
//! timeout is longer than the block, and claim idle entries again every
//! `AUDIT_CLAIM_IDLE_MS`, removing on the way the consumers that are idle
//! and own nothing (dead workers). A read that failed may have been applied
//! (entries delivered whose reply was lost): the next step drains this
//! consumer's own pending entries first. While a full batch commits, the next one
//! is read without blocking and decoded on another task, so the database,
//! Redis and the decoding work at the same time during a backlog; that
//! batch is written and acknowledged after the first, and finished on
//! shutdown.
//!
//! Batches are bounded in bytes as well as in entries: a read asks for at
//! most `AUDIT_BATCH_BYTES` divided by the largest entry seen lately (and
//! starts small, doubling while reads come back full), and the batch read
//! ahead gets only what the batch in hand leaves of that budget.
//!
//! Each batch is decoded; entries that cannot be decoded become dead letters.
//! An entry delivered more than `AUDIT_MAX_DELIVERIES` times is written on
//! its own (it may be what kept killing its consumers), and becomes a dead
//! letter only if it fails alone for its own data. The sink writes events,
//! snapshots and dead letters in one transaction; only after it commits are
//! the entries acknowledged (`XACK`).
//!
//! A failed write is classified by its cause ([`cause_of`]): an error of the
//! connection or the server (unreachable, a lock, a missing table, a missing
//! permission) retries the same batch with exponential backoff, without
//! limit, and nothing is acknowledged meanwhile; an error caused by the data
//! splits the batch in halves until the entry at fault is alone, and that
//! entry becomes a dead letter while every other one is committed, so one
//! poisoned entry cannot stall the stream. A fenced consumer whose token was
//! bumped by another worker stops without committing or acknowledging
//! anything more.
//!
//! Trimming: after acknowledging, the stream is trimmed (`XTRIM MINID ~`) below
//! the oldest entry the group has not acknowledged (its oldest pending entry,
//! or the first entry after its last delivered one), and never past what is
//! younger than `AUDIT_STREAM_RETENTION_SECS`; while full batches follow each
//! other, at most every 250 ms.
//!
//! If Redis loses the group (`NOGROUP`, for instance after losing its data),
//! the consumer creates it again and goes on.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{AsyncCommands as _, RedisError, Script, Value};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
#[cfg(feature = "tracing-opentelemetry")]
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::sink::{
    AuditSink, BatchOutcome, Cause, Commit, DeadLetter, Incoming, StreamOrigin, cause_of,
    fields_json, refusal,
};
use crate::config::{Config, ConfigError, non_empty, parse};
use crate::conn::{ConnOptions, RedisConn};
use crate::error::Result;
use crate::event::Event;
use crate::keys::Keys;
use crate::lease::{Fence, Role};
#[cfg(feature = "tracing-opentelemetry")]
use crate::telemetry::parse_traceparent;

/// Settings of the audit consumer.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Consumer group name (`audit`).
    pub group: String,
    /// This process's consumer name: host, pid and a random suffix.
    pub consumer: String,
    /// `AUDIT_BATCH_SIZE` (1000): entries per read, at most.
    pub batch: usize,
    /// `AUDIT_BATCH_BYTES` (16 MiB): the entry bytes the consumer holds at
    /// once, the batch in hand and the one read ahead together (a single
    /// larger entry is read alone).
    pub batch_bytes: usize,
    /// `AUDIT_BLOCK_MS` (1000): how long a read waits for new entries; also
    /// the longest a shutdown waits for the read in flight.
    pub block: Duration,
    /// `AUDIT_CLAIM_IDLE_MS` (30000): entries pending longer than this at a
    /// consumer are taken over.
    pub claim_idle: Duration,
    /// `AUDIT_MAX_DELIVERIES` (5): deliveries after which an entry is
    /// written on its own (a dead letter only if it fails alone).
    pub max_deliveries: u64,
    /// `AUDIT_STREAM_RETENTION_SECS` (60): acknowledged entries younger than
    /// this stay in the stream.
    pub retention: Duration,
    /// `AUDIT_DB_RETRY_MAX_MS` (5000): the longest wait between attempts
    /// while the database is unreachable.
    pub retry_max: Duration,
    /// `HEAL_CHECK_MS` (1000): how often the healer, which runs beside the
    /// consumer, checks that Redis still has its data.
    pub heal_check: Duration,
}

/// The default of `AUDIT_BATCH_BYTES`: far above a batch of ordinary events
/// (1000 × a few hundred bytes), far below what a batch of hostile entries
/// could otherwise hold.
pub const DEFAULT_BATCH_BYTES: usize = 16 * 1024 * 1024;

impl ConsumerConfig {
    /// From the environment.
    pub fn from_env() -> std::result::Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// From a lookup function.
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
    ) -> std::result::Result<Self, ConfigError> {
        let var = non_empty(&get);
        let ms = |name: &'static str, default: u64| -> std::result::Result<Duration, ConfigError> {
            Ok(Duration::from_millis(parse(
                &var,
                name,
                default,
                "milliseconds",
            )?))
        };
        let batch: usize = parse(&var, "AUDIT_BATCH_SIZE", 1000, "a number of entries")?;
        if batch == 0 {
            return Err(ConfigError {
                var: "AUDIT_BATCH_SIZE",
                value: "0".to_owned(),
                reason: "at least 1".to_owned(),
            });
        }
        let batch_bytes: usize = parse(
            &var,
            "AUDIT_BATCH_BYTES",
            DEFAULT_BATCH_BYTES,
            "a number of bytes, at least 1024",
        )?;
        if batch_bytes < 1024 {
            return Err(ConfigError {
                var: "AUDIT_BATCH_BYTES",
                value: batch_bytes.to_string(),
                reason: "a number of bytes, at least 1024".to_owned(),
            });
        }
        Ok(ConsumerConfig {
            group: "audit".to_owned(),
            consumer: unique_consumer_name(),
            batch,
            batch_bytes,
            block: ms("AUDIT_BLOCK_MS", 1000)?.max(Duration::from_millis(10)),
            claim_idle: ms("AUDIT_CLAIM_IDLE_MS", 30_000)?,
            max_deliveries: parse(&var, "AUDIT_MAX_DELIVERIES", 5, "a whole number")?,
            retention: Duration::from_secs(parse(
                &var,
                "AUDIT_STREAM_RETENTION_SECS",
                60,
                "seconds",
            )?),
            retry_max: ms("AUDIT_DB_RETRY_MAX_MS", 5000)?,
            heal_check: ms("HEAL_CHECK_MS", 1000)?.max(Duration::from_millis(10)),
        })
    }

    /// How long a consumer that owns no pending entry may stay idle before
    /// it counts as dead and is removed from the group: the claim idle time,
    /// and at least ten blocking reads (a live consumer reads once per
    /// `AUDIT_BLOCK_MS`).
    pub fn dead_consumer_idle(&self) -> Duration {
        self.claim_idle
            .max(self.block * 10)
            .max(Duration::from_millis(500))
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        match Self::from_lookup(|_| None) {
            Ok(c) => c,
            Err(e) => unreachable!("defaults are valid: {e}"),
        }
    }
}

/// A consumer name unique to this process.
pub(crate) fn unique_consumer_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    format!("{host}-{}-{suffix}", std::process::id())
}

/// The least time between two trims while full batches follow each other.
const TRIM_EVERY: Duration = Duration::from_millis(250);

/// Entries asked for by the first read: reads start at one entry and at
/// most double while they come back full, so that the size of the entries is
/// known before many are asked for.
const FIRST_READ: usize = 1;

/// Removes, atomically, the consumers of a group that own no pending entry
/// and have been idle at least `ARGV[2]` ms, except `ARGV[3]` (the caller).
/// Atomic, so that a consumer that reads between the check and the removal
/// cannot lose the entries it just got. Returns how many went.
static REMOVE_DEAD_CONSUMERS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local removed = 0
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, c in ipairs(consumers) do
  local name, pending, idle
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1]
    elseif c[i] == 'pending' then pending = c[i + 1]
    elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if name ~= ARGV[3] and pending == 0 and idle >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    removed = removed + 1
  end
end
return removed
",
    )
});

/// Totals since the consumer started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerTotals {
    /// Batches committed.
    pub batches: u64,
    /// Entries acknowledged.
    pub acked: u64,
    /// Events inserted.
    pub inserted: u64,
    /// Redelivered events skipped.
    pub duplicates: u64,
    /// Dead letters written.
    pub dead_letters: u64,
    /// Entries written on their own after too many deliveries.
    pub written_alone: u64,
    /// The most entry bytes one batch held.
    pub largest_batch_bytes: u64,
    /// Dead consumers removed from the group.
    pub consumers_removed: u64,
    /// True when it stopped because another worker took its lease over.
    pub fenced: bool,
}

/// The audit consumer. See the module docs.
#[derive(Debug)]
pub struct AuditConsumer {
    redis: RedisConn,
    sink: AuditSink,
    stream: String,
    /// The partition's outage key (see [`super::partition::mark_outage`]).
    outage: String,
    /// Redis was found unreachable and the outage is not marked yet.
    mark_due: bool,
    cfg: ConsumerConfig,
    totals: ConsumerTotals,
    last_claim: Option<Instant>,
    /// When the stream was last trimmed (see [`TRIM_EVERY`]).
    last_trim: Option<Instant>,
    /// New entries read and decoded while the previous batch was
    /// committing: delivered to this consumer (pending), not yet written or
    /// acknowledged.
    ahead: Option<Prepared>,
    /// When `partition_state.drained_at` was last written.
    last_drained: Option<Instant>,
    /// Since when Redis has been unreachable, while it is.
    redis_down_since: Option<chrono::DateTime<chrono::Utc>>,
    /// The lease the consumer writes under, if any, and its fencing token
    /// once taken.
    lease: Option<Lease>,
    /// True once the fence was found taken over: nothing more is written.
    fenced: bool,
    /// Whether the first pass of a fenced consumer, which claims every
    /// other consumer's entries at once, is still to come.
    takeover: bool,
    /// A read failed after it may have been applied: Redis may have
    /// delivered entries to this consumer that it never saw, pending under
    /// its name. The next step drains them, instead of the claim pass
    /// `AUDIT_CLAIM_IDLE_MS` later.
    own_pending: bool,
    /// The largest entry seen lately, bytes (decays by an eighth per read).
    entry_bytes: usize,
    /// The most entries the next read may ask for: grows while reads come
    /// back full (see [`FIRST_READ`]).
    count_cap: usize,
}

/// The lease a consumer writes under.
#[derive(Debug)]
struct Lease {
    /// The worker holding it.
    holder: String,
    /// `WORKER_LEASE_MS`.
    ttl: Duration,
    /// The token, once bumped (before the first commit).
    fence: Option<Fence>,
}

/// A batch decoded and ready to write.
#[derive(Debug)]
struct Prepared {
    /// Every entry's stream id, in stream order.
    ids: Vec<String>,
    /// The entries that decoded into events.
    batch: Vec<Incoming>,
    /// Valid entries delivered more than `AUDIT_MAX_DELIVERIES` times: each
    /// is written on its own.
    alone: Vec<Incoming>,
    /// The entries that did not decode.
    dead: Vec<DeadLetter>,
    /// Delivery counts of the entries delivered more than once.
    deliveries: HashMap<String, u64>,
    /// Whether the reads came back full: more may be waiting.
    full: bool,
    /// The entries' bytes (field names and values).
    bytes: usize,
    /// The largest entry's bytes.
    largest: usize,
}

impl Prepared {
    /// Decodes `entries`; `counts` holds delivery counts (1 when missing).
    fn new(
        stream: &str,
        entries: Vec<StreamId>,
        counts: &HashMap<String, u64>,
        max_deliveries: u64,
        full: bool,
    ) -> Self {
        let mut batch = Vec::with_capacity(entries.len());
        let mut alone = Vec::new();
        let mut dead = Vec::new();
        let mut deliveries = HashMap::new();
        let (mut bytes, mut largest) = (0, 0);
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        for entry in entries {
            let size = entry_bytes(&entry);
            bytes += size;
            largest = largest.max(size);
            let n = counts.get(&entry.id).copied().unwrap_or(1);
            if n > 1 {
                deliveries.insert(entry.id.clone(), n);
            }
            match decode(&entry) {
                Ok(event) => {
                    let i = Incoming {
                        stream_id: Some(entry.id),
                        event,
                    };
                    if n > max_deliveries {
                        alone.push(i);
                    } else {
                        batch.push(i);
                    }
                }
                Err(reason) => dead.push(dead_letter(stream, &entry, reason, n)),
            }
        }
        Prepared {
            ids,
            batch,
            alone,
            dead,
            deliveries,
            full,
            bytes,
            largest,
        }
    }
}

/// The largest entry of `entries`, bytes.
fn largest_entry(entries: &[StreamId]) -> usize {
    entries.iter().map(entry_bytes).max().unwrap_or(0)
}

/// Bytes of one entry: its field names and values.
fn entry_bytes(entry: &StreamId) -> usize {
    entry
        .map
        .iter()
        .map(|(k, v)| {
            k.len()
                + match v {
                    Value::BulkString(b) => b.len(),
                    Value::SimpleString(s) => s.len(),
                    _ => 8,
                }
        })
        .sum()
}

/// Where a batch came from; decides how delivery counts are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    New,
    Pending,
}

impl AuditConsumer {
    /// Connects its own Redis connection (response timeout longer than the
    /// block) and prepares the group, on the stream of the first partition
    /// (the only one without partitions).
    pub async fn new(config: &Config, sink: AuditSink, cfg: ConsumerConfig) -> Result<Self> {
        let keys = crate::keys::KeySpace::new(config);
        Self::for_partition(config, keys.part(0), sink, cfg).await
    }

    /// Like [`AuditConsumer::new`], on one partition's stream.
    pub async fn for_partition(
        config: &Config,
        keys: &Keys,
        sink: AuditSink,
        cfg: ConsumerConfig,
    ) -> Result<Self> {
        let opts = ConnOptions {
            response_timeout: cfg.block + Duration::from_secs(5),
            retries: 2,
        };
        let redis = RedisConn::connect(config, opts).await?;
        Ok(AuditConsumer {
            redis,
            sink,
            stream: keys.stream.clone(),
            outage: keys.outage.clone(),
            mark_due: false,
            cfg,
            totals: ConsumerTotals::default(),
            last_claim: None,
            last_trim: None,
            ahead: None,
            last_drained: None,
            redis_down_since: None,
            lease: None,
            fenced: false,
            takeover: false,
            own_pending: false,
            entry_bytes: 0,
            count_cap: FIRST_READ,
        })
    }

    /// Writes under the audit lease of its stream, which the worker
    /// `holder` has just taken (it runs out after `ttl`): before its first
    /// commit the consumer bumps the stream's fencing token
    /// ([`Fence::acquire`]), and every commit checks it is still current; the
    /// first pass claims every other consumer's pending entries, since no
    /// one else may commit them any more.
    pub fn with_lease(mut self, holder: impl Into<String>, ttl: Duration) -> Self {
        self.lease = Some(Lease {
            holder: holder.into(),
            ttl,
            fence: None,
        });
        self.takeover = true;
        self
    }

    /// Like [`AuditConsumer::with_lease`], with a token already taken.
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.lease = Some(Lease {
            holder: self.cfg.consumer.clone(),
            ttl: fence.ttl,
            fence: Some(fence),
        });
        self.takeover = true;
        self
    }

    /// What it has done so far.
    pub fn totals(&self) -> &ConsumerTotals {
        &self.totals
    }

    /// This consumer's name in the group.
    pub fn name(&self) -> &str {
        &self.cfg.consumer
    }

    /// True once another worker took its lease over (it stops then).
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Creates the group unless it exists (and the stream with it).
    pub async fn ensure_group(&mut self) -> Result<()> {
        let r: redis::RedisResult<()> = self
            .redis
            .xgroup_create_mkstream(&self.stream, &self.cfg.group, "0")
            .await;
        match r {
            Ok(()) => {
                tracing::info!(group = %self.cfg.group, "created the consumer group");
                Ok(())
            }
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs until `shutdown` is cancelled, or until another worker takes
    /// its lease over; the batch in hand is finished and acknowledged before
    /// it returns (unless the lease is lost: then it is left pending for the
    /// new holder).
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<ConsumerTotals> {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() && !self.fenced {
            match self.step(&shutdown).await {
                Ok(_) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(err = %e, "audit consumer step failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.cfg.retry_max);
                }
            }
        }
        // Entries read ahead are in hand too: finish them before returning.
        if let Some(ready) = self.ahead.take()
            && !self.fenced
            && let Err(e) = self.write_batch(ready, Origin::New, &shutdown).await
        {
            tracing::warn!(err = %e, "the batch read ahead was left pending");
        }
        if self.fenced {
            tracing::warn!(
                stream = %self.stream,
                "audit consumer stopped: another worker holds this partition now"
            );
        }
        self.totals.fenced = self.fenced;
        tracing::info!(acked = self.totals.acked, "audit consumer stopped");
        Ok(self.totals)
    }

    /// One unit of work: claim idle entries when due, otherwise read and
    /// process one batch. Returns the number of entries acknowledged. When
    /// Redis cannot be reached, records since when (see
    /// [`super::partition`]) before returning the error.
    pub async fn step(&mut self, shutdown: &CancellationToken) -> Result<usize> {
        if self.fenced {
            return Ok(0);
        }
        let result = self.step_inner(shutdown).await;
        match &result {
            Err(e) if e.is_unavailable() => {
                self.mark_due = true;
                self.note_redis_down().await;
            }
            // Back after an outage: writes may have been staged meanwhile by
            // app servers that have not reached Redis again (or never will).
            Ok(_) if self.mark_due => {
                match super::partition::mark_outage(&mut self.redis, &self.outage).await {
                    Ok(()) => self.mark_due = false,
                    Err(e) => tracing::debug!(err = %e, "marking the outage failed"),
                }
            }
            _ => {}
        }
        result
    }

    async fn step_inner(&mut self, shutdown: &CancellationToken) -> Result<usize> {
        if let Some(ready) = self.ahead.take() {
            return self.write_batch(ready, Origin::New, shutdown).await;
        }
        let recovered = if self.claim_due() {
            // Set before the attempt: a recovery that fails does not keep
            // new entries from being read, and is tried again when next due.
            self.last_claim = Some(Instant::now());
            self.recover(shutdown).await?
        } else if self.own_pending {
            self.drain_own(shutdown).await?
        } else {
            0
        };
        if recovered > 0 || self.fenced {
            return Ok(recovered);
        }
        let read_at = chrono::Utc::now();
        let (entries, full) = match self.read_new().await {
            Ok(r) => r,
            Err(e) if is_nogroup(&e) => {
                self.ensure_group().await?;
                return Ok(0);
            }
            Err(e) => {
                self.own_pending = true;
                return Err(e.into());
            }
        };
        let n = self.process(entries, Origin::New, full, shutdown).await?;
        if !full && self.ahead.is_none() && !self.fenced {
            self.note_drained(read_at).await;
        }
        Ok(n)
    }

    /// Reads a batch of new entries: one blocking read, then, while reads
    /// come back full, more reads without blocking until the batch holds
    /// `AUDIT_BATCH_SIZE` entries or `AUDIT_BATCH_BYTES`, each read sized
    /// from the entries seen so far. Returns the entries and whether the
    /// last read came back full (more may be waiting).
    async fn read_new(&mut self) -> redis::RedisResult<(Vec<StreamId>, bool)> {
        let budget = self.cfg.batch_bytes;
        let count = self.read_count(budget);
        let mut entries = self.read(">", true, count).await?;
        let mut full = entries.len() >= count;
        self.note_read(largest_entry(&entries), full);
        let mut bytes: usize = entries.iter().map(entry_bytes).sum();
        while full && entries.len() < self.cfg.batch {
            let left = budget.saturating_sub(bytes);
            if left < self.entry_bytes.max(1) {
                break;
            }
            let count = self.read_count(left).min(self.cfg.batch - entries.len());
            // Entries a failed read delivered stay pending and are drained
            // at the next step; the ones in hand are written now.
            let more = match self.read(">", false, count).await {
                Ok(more) => more,
                Err(e) => {
                    tracing::debug!(err = %e, "reading more of the batch failed");
                    self.own_pending = true;
                    break;
                }
            };
            full = more.len() >= count;
            self.note_read(largest_entry(&more), full);
            bytes += more.iter().map(entry_bytes).sum::<usize>();
            entries.extend(more);
        }
        Ok((entries, full))
    }

    /// After a read that returned everything the stream had at `read_at`,
    /// committed and acknowledged: when the group has nothing pending either,
    /// records in `partition_state` that the database holds every entry
    /// appended before `read_at` (at most every 100 ms).
    async fn note_drained(&mut self, read_at: chrono::DateTime<chrono::Utc>) {
        if self.redis_down_since.is_none()
            && self
                .last_drained
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        let pending: redis::RedisResult<redis::streams::StreamPendingReply> =
            self.redis.xpending(&self.stream, &self.cfg.group).await;
        match pending {
            Ok(redis::streams::StreamPendingReply::Empty) => {}
            Ok(redis::streams::StreamPendingReply::Data(d)) if d.count == 0 => {}
            _ => return,
        }
        match super::partition::record_drained(self.sink.db(), &self.stream, read_at).await {
            Ok(()) => {
                self.last_drained = Some(Instant::now());
                self.redis_down_since = None;
            }
            Err(e) => tracing::debug!(err = %e, "recording the drained stream failed"),
        }
    }

    /// Redis is unreachable: records since when in `partition_state`, so
    /// that app servers know how current the database is (best effort; the
    /// database may be unreachable too, then it is tried on the next failure).
    async fn note_redis_down(&mut self) {
        let since = *self.redis_down_since.get_or_insert_with(chrono::Utc::now);
        if let Err(e) =
            super::partition::record_redis_down(self.sink.db(), &self.stream, since).await
        {
            tracing::debug!(err = %e, "recording that redis is unreachable failed");
        }
    }

    /// Drains this consumer's own pending entries, removes dead consumers,
    /// then claims other consumers' idle entries (all of them, on a fenced
    /// consumer's first pass).
    async fn recover(&mut self, shutdown: &CancellationToken) -> Result<usize> {
        let mut total = self.drain_own(shutdown).await?;
        if self.fenced {
            return Ok(total);
        }
        self.remove_dead_consumers().await;
        let min_idle = if self.takeover {
            Duration::ZERO
        } else {
            self.cfg.claim_idle
        };
        let mut cursor = "0-0".to_owned();
        loop {
            let count = self.read_count(self.cfg.batch_bytes);
            let reply: StreamAutoClaimReply = match redis::cmd("XAUTOCLAIM")
                .arg(&self.stream)
                .arg(&self.cfg.group)
                .arg(&self.cfg.consumer)
                .arg(min_idle.as_millis() as u64)
                .arg(&cursor)
                .arg("COUNT")
                .arg(count)
                .query_async(&mut self.redis)
                .await
            {
                Ok(r) => r,
                Err(e) if is_nogroup(&e) => {
                    self.ensure_group().await?;
                    return Ok(total);
                }
                Err(e) => return Err(e.into()),
            };
            if !reply.deleted_ids.is_empty() {
                // Entries trimmed away while pending: nothing left to audit.
                let _: redis::RedisResult<u64> = self
                    .redis
                    .xack(&self.stream, &self.cfg.group, &reply.deleted_ids)
                    .await;
            }
            if !reply.claimed.is_empty() {
                tracing::info!(count = reply.claimed.len(), "claimed idle entries");
                let full = reply.claimed.len() >= count;
                self.note_read(largest_entry(&reply.claimed), full);
                total += self
                    .process(reply.claimed, Origin::Pending, full, shutdown)
                    .await?;
                if self.fenced {
                    return Ok(total);
                }
            }
            cursor = reply.next_stream_id;
            if cursor == "0-0" {
                break;
            }
        }
        self.takeover = false;
        Ok(total)
    }

    /// Drains this consumer's own pending entries: a batch left pending
    /// when it stopped, or entries a read delivered whose reply it lost.
    async fn drain_own(&mut self, shutdown: &CancellationToken) -> Result<usize> {
        let mut total = 0;
        loop {
            let count = self.read_count(self.cfg.batch_bytes);
            let own = match self.read("0", false, count).await {
                Ok(e) => e,
                Err(e) if is_nogroup(&e) => {
                    // A new group: the entries pending in the old one are
                    // gone with it.
                    self.ensure_group().await?;
                    self.own_pending = false;
                    return Ok(total);
                }
                Err(e) => return Err(e.into()),
            };
            if own.is_empty() {
                break;
            }
            let full = own.len() >= count;
            self.note_read(largest_entry(&own), full);
            total += self.process(own, Origin::Pending, full, shutdown).await?;
            if self.fenced {
                return Ok(total);
            }
        }
        self.own_pending = false;
        Ok(total)
    }

    /// Removes the consumers that own no pending entry and have been idle
    /// longer than [`ConsumerConfig::dead_consumer_idle`] (best effort).
    async fn remove_dead_consumers(&mut self) {
        let mut inv = REMOVE_DEAD_CONSUMERS.key(&self.stream);
        inv.arg(&self.cfg.group)
            .arg(self.cfg.dead_consumer_idle().as_millis() as u64)
            .arg(&self.cfg.consumer);
        match inv.invoke_async::<u64>(&mut self.redis).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(removed = n, "removed dead consumers from the group");
                self.totals.consumers_removed += n;
            }
            Err(e) => tracing::debug!(err = %e, "removing dead consumers failed"),
        }
    }

    fn claim_due(&self) -> bool {
        self.last_claim
            .is_none_or(|t| t.elapsed() >= self.cfg.claim_idle.max(Duration::from_millis(100)))
    }

    /// How many entries a read may ask for so that they stay within
    /// `budget` bytes, judging by the largest entry seen lately; at least
    /// one, at most `AUDIT_BATCH_SIZE`, and growing from [`FIRST_READ`].
    fn read_count(&self, budget: usize) -> usize {
        let by_bytes = budget / self.entry_bytes.max(1);
        by_bytes.clamp(1, self.cfg.batch).min(self.count_cap)
    }

    /// Learns from a read: the largest entry (decaying), and whether reads
    /// may grow.
    fn note_read(&mut self, largest: usize, full: bool) {
        self.entry_bytes = largest.max(self.entry_bytes - self.entry_bytes / 8);
        if full {
            self.count_cap = (self.count_cap * 2).min(self.cfg.batch);
        }
    }

    async fn read(
        &mut self,
        id: &str,
        block: bool,
        count: usize,
    ) -> redis::RedisResult<Vec<StreamId>> {
        read_entries(self.read_cmd(id, block, count), &mut self.redis).await
    }

    fn read_cmd(&self, id: &str, block: bool, count: usize) -> redis::Cmd {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.cfg.group)
            .arg(&self.cfg.consumer)
            .arg("COUNT")
            .arg(count);
        if block {
            cmd.arg("BLOCK").arg(self.cfg.block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(id);
        cmd
    }

    /// Delivery counts of pending entries of this consumer.
    async fn deliveries(&mut self, first: &str, last: &str, n: usize) -> HashMap<String, u64> {
        let reply: redis::RedisResult<Vec<(String, String, u64, u64)>> = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&self.cfg.group)
            .arg(first)
            .arg(last)
            .arg(n)
            .arg(&self.cfg.consumer)
            .query_async(&mut self.redis)
            .await;
        reply
            .map(|rows| rows.into_iter().map(|(id, _, _, d)| (id, d)).collect())
            .unwrap_or_default()
    }

    async fn process(
        &mut self,
        entries: Vec<StreamId>,
        origin: Origin,
        full: bool,
        shutdown: &CancellationToken,
    ) -> Result<usize> {
        if entries.is_empty() {
            return Ok(0);
        }
        let counts = match origin {
            Origin::New => HashMap::new(),
            Origin::Pending => {
                let first = entries.first().map(|e| e.id.clone()).unwrap_or_default();
                let last = entries.last().map(|e| e.id.clone()).unwrap_or_default();
                self.deliveries(&first, &last, entries.len()).await
            }
        };
        let ready = Prepared::new(
            &self.stream,
            entries,
            &counts,
            self.cfg.max_deliveries,
            full,
        );
        self.write_batch(ready, origin, shutdown).await
    }

    /// Writes a decoded batch, acknowledges it and trims the stream.
    async fn write_batch(
        &mut self,
        ready: Prepared,
        origin: Origin,
        shutdown: &CancellationToken,
    ) -> Result<usize> {
        let full = ready.full;
        let bytes = ready.bytes;
        let Prepared {
            ids,
            batch,
            alone,
            dead,
            deliveries,
            ..
        } = ready;
        // One span per batch, linked to the traces of the requests that
        // caused its events: one trace runs from the request to the audit row.
        let span = tracing::info_span!(
            "audit batch",
            entries = ids.len(),
            inserted = tracing::field::Empty
        );
        #[cfg(feature = "tracing-opentelemetry")]
        let mut linked = std::collections::HashSet::new();
        #[cfg(feature = "tracing-opentelemetry")]
        for i in batch.iter().chain(&alone) {
            if let Some(sc) = i.event.traceparent.as_deref().and_then(parse_traceparent)
                && linked.len() < 128
                && linked.insert(sc.span_id())
            {
                span.add_link(sc);
            }
        }
        let started = Instant::now();
        // A full batch of new entries means a backlog: read and decode the
        // next batch (without blocking, on a clone of the same multiplexed
        // connection, on a task of its own so that decoding runs beside the
        // database's work) while this one commits, within what this batch
        // leaves of AUDIT_BATCH_BYTES. The entries read ahead are only
        // pending; they are written and acknowledged by the next step, after
        // this batch, so nothing is acknowledged before its commit and
        // batches still commit in stream order. Not when a claim is due, so
        // that recovery gets its turn, nor after shutdown.
        let left = self.cfg.batch_bytes.saturating_sub(bytes);
        let ahead_count = self.read_count(left);
        let read_ahead = (origin == Origin::New
            && full
            && left >= self.entry_bytes.max(1)
            && !self.claim_due()
            && !shutdown.is_cancelled())
        .then(|| {
            let cmd = self.read_cmd(">", false, ahead_count);
            let mut redis = self.redis.clone();
            let stream = self.stream.clone();
            let max_deliveries = self.cfg.max_deliveries;
            tokio::spawn(async move {
                let entries = read_entries(cmd, &mut redis).await?;
                let full = entries.len() >= ahead_count;
                Ok::<_, RedisError>(Prepared::new(
                    &stream,
                    entries,
                    &HashMap::new(),
                    max_deliveries,
                    full,
                ))
            })
        });
        let (outcome, ahead) = tokio::join!(
            self.commit(&batch, &dead, &deliveries, shutdown)
                .instrument(span.clone()),
            futures_util::future::OptionFuture::from(read_ahead)
        );
        match ahead {
            Some(Ok(Ok(ready))) if !ready.ids.is_empty() => {
                self.note_read(ready.largest, ready.full);
                self.ahead = Some(ready);
            }
            // Entries a failed read may have delivered stay pending and are
            // recovered like any other.
            Some(Ok(Err(e))) => tracing::debug!(err = %e, "reading ahead failed"),
            Some(Err(e)) => tracing::warn!(err = %e, "reading ahead failed"),
            _ => {}
        }
        let Some(mut outcome) = outcome? else {
            // Fenced: leave everything pending for the lease's new holder.
            self.ahead = None;
            return Ok(0);
        };
        for i in &alone {
            let n = deliveries.get(i.stream_id.as_deref().unwrap_or_default());
            tracing::warn!(
                stream_id = i.stream_id.as_deref().unwrap_or_default(),
                deliveries = n.copied().unwrap_or(0),
                "entry delivered too often without a commit; writing it on its own"
            );
            let Some(o) = self
                .commit(std::slice::from_ref(i), &[], &deliveries, shutdown)
                .instrument(span.clone())
                .await?
            else {
                self.ahead = None;
                return Ok(0);
            };
            outcome.add(&o);
            self.totals.written_alone += 1;
        }
        let acked: u64 = self
            .redis
            .xack(&self.stream, &self.cfg.group, &ids)
            .instrument(span.clone())
            .await?;
        span.record("inserted", outcome.inserted);
        let m = crate::telemetry::metrics();
        m.audit_batch_size.record(ids.len() as u64, &[]);
        m.audit_batch_duration
            .record(started.elapsed().as_secs_f64(), &[]);
        m.audit_events
            .add(outcome.inserted, &[KeyValue::new("result", "inserted")]);
        m.audit_events
            .add(outcome.duplicates, &[KeyValue::new("result", "duplicate")]);
        m.dead_letters.add(outcome.dead_letters, &[]);
        self.totals.batches += 1;
        self.totals.acked += acked;
        self.totals.inserted += outcome.inserted;
        self.totals.duplicates += outcome.duplicates;
        self.totals.dead_letters += outcome.dead_letters;
        self.totals.largest_batch_bytes = self.totals.largest_batch_bytes.max(bytes as u64);
        tracing::debug!(
            acked,
            bytes,
            inserted = outcome.inserted,
            duplicates = outcome.duplicates,
            dead_letters = outcome.dead_letters,
            gaps = outcome.gaps,
            "batch committed"
        );
        // During a backlog (full batches) trim at most every TRIM_EVERY: each
        // trim is three round trips, and the retention window dwarfs the
        // pause. A batch that is not full means the consumer caught up: trim.
        let trim_due = self.last_trim.is_none_or(|t| t.elapsed() >= TRIM_EVERY);
        if !full || trim_due {
            self.last_trim = Some(Instant::now());
            if let Err(e) = self.trim().await {
                tracing::warn!(err = %e, "trimming the stream failed");
            }
        }
        Ok(ids.len())
    }

    /// Bumps the fencing token before the first commit under a lease.
    async fn ensure_fence(&mut self) -> Result<()> {
        if let Some(lease) = &mut self.lease
            && lease.fence.is_none()
        {
            let f = Fence::acquire(
                self.sink.db(),
                &self.stream,
                Role::Audit,
                &lease.holder,
                lease.ttl,
            )
            .await?;
            lease.fence = Some(f);
        }
        Ok(())
    }

    /// One write of the sink, fenced when the consumer holds a lease (the
    /// token is taken by [`AuditConsumer::commit`] first).
    ///
    /// The commit checks that Redis still holds the batch's first entry:
    /// entries read from a data set that Redis lost before they were
    /// committed are not recorded ([`crate::error::Error::DataLost`]), so
    /// that a session restored from the database meanwhile cannot diverge
    /// from what the database records after it.
    async fn write(&mut self, batch: &[Incoming], dead: &[DeadLetter]) -> Result<Commit> {
        let origin: Vec<StreamOrigin> = batch
            .iter()
            .find_map(|i| StreamOrigin::of(self.redis.clone(), self.stream.clone(), i))
            .into_iter()
            .collect();
        match &self.lease {
            None => self
                .sink
                .write_held(batch, dead, &origin)
                .await
                .map(Commit::Done),
            Some(Lease {
                fence: Some(fence), ..
            }) => {
                self.sink
                    .write_fenced_held(fence, batch, dead, &origin)
                    .await
            }
            Some(Lease { fence: None, .. }) => Err(crate::error::Error::Schema(
                "internal: a write under a lease before its fence was taken".to_owned(),
            )),
        }
    }

    /// Writes the batch: retries without limit while the connection or the
    /// server is at fault, isolates the entries at fault otherwise. `None`
    /// when the fence was taken over (nothing more is written).
    async fn commit(
        &mut self,
        batch: &[Incoming],
        dead: &[DeadLetter],
        deliveries: &HashMap<String, u64>,
        shutdown: &CancellationToken,
    ) -> Result<Option<BatchOutcome>> {
        let mut backoff = Duration::from_millis(50);
        loop {
            // Taking the fence can only fail for the server's reasons (it is
            // unreachable, or a predecessor's transaction still holds the old
            // token): never a reason to isolate entries.
            let attempt = match self.ensure_fence().await {
                Err(e) => Err(e),
                Ok(()) => match self.write(batch, dead).await {
                    Err(e) if cause_of(&e) == Cause::Entry => {
                        tracing::warn!(err = %e, "batch refused for its data; isolating the entries at fault");
                        self.isolate(batch, dead, deliveries).await
                    }
                    Ok(Commit::Done(o)) => Ok(Some(o)),
                    Ok(Commit::Fenced { .. }) => Ok(None),
                    Err(e) => Err(e),
                },
            };
            match attempt {
                Ok(Some(o)) => return Ok(Some(o)),
                Ok(None) => {
                    self.fenced = true;
                    return Ok(None);
                }
                // Redis lost the data set these entries were read from:
                // nothing to record and nothing to acknowledge; the group is
                // made again on the new stream.
                Err(e @ crate::error::Error::DataLost { .. }) => {
                    tracing::warn!(err = %e, entries = batch.len(), "redis lost its data before the batch was committed; dropped");
                    return Ok(None);
                }
                Err(e) => {
                    // Unreachable, locked, a deadlock, a timeout, a missing
                    // table or permission: the batch is fine, the database
                    // is not; try the same batch again (what an isolation
                    // committed before it is deduplicated).
                    tracing::warn!(err = %e, "audit database unavailable; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(e),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.cfg.retry_max);
                }
            }
        }
    }

    /// A batch was refused for its data: writes the dead letters, then the
    /// events in halves, and halves of halves, until each entry at fault is
    /// alone and becomes a dead letter. An error of the connection or the
    /// server is returned (the caller retries the whole batch); `None` when
    /// the fence was taken over.
    async fn isolate(
        &mut self,
        batch: &[Incoming],
        dead: &[DeadLetter],
        deliveries: &HashMap<String, u64>,
    ) -> Result<Option<BatchOutcome>> {
        let mut total = BatchOutcome::default();
        if !dead.is_empty() {
            match self.write(&[], dead).await {
                Ok(Commit::Done(o)) => total.add(&o),
                Ok(Commit::Fenced { .. }) => return Ok(None),
                Err(e) if cause_of(&e) == Cause::Entry => {
                    for d in dead {
                        match self.store_dead_letter(d).await? {
                            Some(o) => total.add(&o),
                            None => return Ok(None),
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        // Ranges still to write, the next one last; the whole batch first
        // (the failure may have been the dead letters').
        let mut todo = vec![(0, batch.len())];
        while let Some((lo, hi)) = todo.pop() {
            if lo == hi {
                continue;
            }
            match self.write(&batch[lo..hi], &[]).await {
                Ok(Commit::Done(o)) => total.add(&o),
                Ok(Commit::Fenced { .. }) => return Ok(None),
                Err(e) if cause_of(&e) == Cause::Entry && hi - lo == 1 => {
                    let i = &batch[lo];
                    let stream_id = i.stream_id.clone().unwrap_or_default();
                    let n = deliveries.get(&stream_id).copied().unwrap_or(1);
                    let reason = if n > self.cfg.max_deliveries {
                        format!(
                            "delivered {n} times, then refused on its own: {}",
                            refusal(&e)
                        )
                    } else {
                        refusal(&e)
                    };
                    tracing::warn!(stream_id = %stream_id, reason = %reason, "dead letter");
                    let d = DeadLetter {
                        stream: self.stream.clone(),
                        stream_id,
                        fields: fields_json(&i.event),
                        reason,
                        deliveries: n as i64,
                    };
                    match self.store_dead_letter(&d).await? {
                        Some(o) => total.add(&o),
                        None => return Ok(None),
                    }
                }
                Err(e) if cause_of(&e) == Cause::Entry => {
                    let mid = lo + (hi - lo) / 2;
                    todo.push((mid, hi));
                    todo.push((lo, mid));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Some(total))
    }

    /// Writes one dead letter alone; if even its storable form is refused,
    /// its escaped form (ASCII only).
    async fn store_dead_letter(&mut self, d: &DeadLetter) -> Result<Option<BatchOutcome>> {
        match self.write(&[], std::slice::from_ref(d)).await {
            Ok(Commit::Done(o)) => Ok(Some(o)),
            Ok(Commit::Fenced { .. }) => Ok(None),
            Err(e) if cause_of(&e) == Cause::Entry => {
                let escaped = d.escaped(&refusal(&e));
                match self.write(&[], &[escaped]).await? {
                    Commit::Done(o) => Ok(Some(o)),
                    Commit::Fenced { .. } => Ok(None),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Trims what the group has acknowledged, keeping the retention window.
    pub async fn trim(&mut self) -> Result<u64> {
        let safe = match safe_trim_point(&mut self.redis, &self.stream, &self.cfg.group).await? {
            Some(s) => s,
            None => return Ok(0),
        };
        let now_ms = chrono::Utc::now().timestamp_millis();
        let keep_from = (now_ms - self.cfg.retention.as_millis() as i64).max(0);
        let minid = min_id(&safe, &format!("{keep_from}-0"));
        let n: u64 = redis::cmd("XTRIM")
            .arg(&self.stream)
            .arg("MINID")
            .arg("~")
            .arg(&minid)
            .query_async(&mut self.redis)
            .await?;
        Ok(n)
    }
}

/// A stream entry of `stream` set aside, with its raw fields.
fn dead_letter(stream: &str, entry: &StreamId, reason: String, deliveries: u64) -> DeadLetter {
    let fields: serde_json::Map<String, serde_json::Value> = entry
        .map
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(lossy(v))))
        .collect();
    let reason = super::sink::storable_text(&reason);
    tracing::warn!(stream_id = %entry.id, reason = %reason, "dead letter");
    DeadLetter {
        stream: stream.to_owned(),
        stream_id: entry.id.clone(),
        fields: serde_json::Value::Object(fields).to_string(),
        reason,
        deliveries: deliveries as i64,
    }
}

/// The lowest id the stream must keep for `group`: its oldest pending entry,
/// or the entry right after its last delivered one. `None` when the group is
/// missing.
pub(crate) async fn safe_trim_point(
    conn: &mut RedisConn,
    stream: &str,
    group: &str,
) -> Result<Option<String>> {
    let groups: redis::streams::StreamInfoGroupsReply = match conn.xinfo_groups(stream).await {
        Ok(g) => g,
        Err(e) if e.code() == Some("ERR") => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(g) = groups.groups.into_iter().find(|g| g.name == group) else {
        return Ok(None);
    };
    let after_delivered = next_id(&g.last_delivered_id);
    let summary: redis::streams::StreamPendingReply = conn.xpending(stream, group).await?;
    Ok(Some(match summary {
        redis::streams::StreamPendingReply::Data(d) if d.count > 0 => {
            min_id(&d.start_id, &after_delivered)
        }
        _ => after_delivered,
    }))
}

fn parse_id(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').unwrap_or((id, "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

fn next_id(id: &str) -> String {
    let (ms, seq) = parse_id(id);
    match seq.checked_add(1) {
        Some(s) => format!("{ms}-{s}"),
        None => format!("{}-0", ms + 1),
    }
}

fn min_id(a: &str, b: &str) -> String {
    if parse_id(a) <= parse_id(b) {
        a.to_owned()
    } else {
        b.to_owned()
    }
}

/// Runs one `XREADGROUP` and returns its entries.
async fn read_entries(cmd: redis::Cmd, redis: &mut RedisConn) -> redis::RedisResult<Vec<StreamId>> {
    let reply: Option<StreamReadReply> = cmd.query_async(redis).await?;
    Ok(entries_of(reply))
}

fn entries_of(reply: Option<StreamReadReply>) -> Vec<StreamId> {
    reply
        .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
        .unwrap_or_default()
}

fn is_nogroup(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

fn lossy(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// Decodes a stream entry into the event it carries, with its entry id.
pub fn decode_incoming(entry: &StreamId) -> std::result::Result<Incoming, String> {
    Ok(Incoming {
        stream_id: Some(entry.id.clone()),
        event: decode(entry)?,
    })
}

/// Decodes a stream entry into an event, or says why it cannot be.
pub fn decode(entry: &StreamId) -> std::result::Result<Event, String> {
    let mut fields = HashMap::with_capacity(entry.map.len());
    for (k, v) in &entry.map {
        let s = match v {
            Value::BulkString(b) => {
                String::from_utf8(b.clone()).map_err(|_| format!("field `{k}` is not UTF-8"))?
            }
            Value::SimpleString(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            _ => return Err(format!("field `{k}` is not a string")),
        };
        fields.insert(k.clone(), s);
    }
    Event::from_fields(&fields).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_order_numerically() {
        assert_eq!(min_id("10-0", "9-5"), "9-5");
        assert_eq!(min_id("9-10", "9-9"), "9-9");
        assert_eq!(next_id("5-3"), "5-4");
        assert_eq!(next_id("0-0"), "0-1");
    }

    #[test]
    fn worker_settings_are_validated() {
        let cfg = ConsumerConfig::from_lookup(|k| (k == "HEAL_CHECK_MS").then(|| "250".to_owned()))
            .expect("valid");
        assert_eq!(cfg.heal_check, Duration::from_millis(250));
        assert_eq!(
            ConsumerConfig::default().heal_check,
            Duration::from_millis(1000)
        );
        let e = ConsumerConfig::from_lookup(|k| (k == "HEAL_CHECK_MS").then(|| "soon".to_owned()))
            .expect_err("invalid");
        assert_eq!(e.var, "HEAL_CHECK_MS");
        assert_eq!(e.value, "soon");
        assert_eq!(ConsumerConfig::default().batch_bytes, DEFAULT_BATCH_BYTES);
        let e =
            ConsumerConfig::from_lookup(|k| (k == "AUDIT_BATCH_BYTES").then(|| "10".to_owned()))
                .expect_err("too small");
        assert_eq!(e.var, "AUDIT_BATCH_BYTES");
    }
}
