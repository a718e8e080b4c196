//! The audit consumer: the consumer group `audit` on the event stream, feeding
//! the [`AuditSink`].
//!
//! Start-up: create the group (with `MKSTREAM`, from the stream's beginning)
//! unless it exists, drain this consumer's own pending entries, then claim
//! entries that other consumers left idle longer than `AUDIT_CLAIM_IDLE_MS`
//! (`XAUTOCLAIM`). Then read new entries in batches (`XREADGROUP … COUNT n
//! BLOCK t`) on a connection of its own whose response timeout is longer than
//! the block, and claim idle entries again every `AUDIT_CLAIM_IDLE_MS`.
//! While a full batch commits, the next one is read without blocking and
//! decoded on another task, so the database, Redis and the decoding work at
//! the same time during a backlog; that batch is written and acknowledged
//! after the first, and finished on shutdown.
//!
//! Each batch is decoded; entries that cannot be decoded, and entries
//! delivered more than `AUDIT_MAX_DELIVERIES` times, become dead letters. The
//! sink writes events, snapshots and dead letters in one transaction; only
//! after it commits are the entries acknowledged (`XACK`). A database that
//! cannot be reached is retried with exponential backoff and nothing is
//! acknowledged meanwhile. A batch that fails while the database is reachable
//! is retried one entry at a time, and an entry that still fails becomes a
//! dead letter, so one poisoned entry cannot stall the stream.
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
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{AsyncCommands as _, RedisError, Value};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::sink::{AuditSink, BatchOutcome, DeadLetter, Incoming, fields_json, reachable};
use crate::config::{Config, ConfigError, non_empty, parse};
use crate::conn::{ConnOptions, RedisConn};
use crate::error::Result;
use crate::event::Event;
use crate::keys::Keys;
use crate::telemetry::parse_traceparent;

/// Settings of the audit consumer.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Consumer group name (`audit`).
    pub group: String,
    /// This process's consumer name: host, pid and a random suffix.
    pub consumer: String,
    /// `AUDIT_BATCH_SIZE` (1000): entries per read.
    pub batch: usize,
    /// `AUDIT_BLOCK_MS` (1000): how long a read waits for new entries; also
    /// the longest a shutdown waits for the read in flight.
    pub block: Duration,
    /// `AUDIT_CLAIM_IDLE_MS` (30000): entries pending longer than this at a
    /// consumer are taken over.
    pub claim_idle: Duration,
    /// `AUDIT_MAX_DELIVERIES` (5): deliveries before an entry is dead-lettered.
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
        Ok(ConsumerConfig {
            group: "audit".to_owned(),
            consumer: unique_consumer_name(),
            batch,
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
pub fn unique_consumer_name() -> String {
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
}

/// The audit consumer. See the module docs.
#[derive(Debug)]
pub struct AuditConsumer {
    redis: RedisConn,
    sink: AuditSink,
    stream: String,
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
}

/// A batch decoded and ready to write.
#[derive(Debug)]
struct Prepared {
    /// Every entry's stream id, in stream order.
    ids: Vec<String>,
    /// The entries that decoded into events.
    batch: Vec<Incoming>,
    /// The entries that did not, or were delivered too often.
    dead: Vec<DeadLetter>,
}

impl Prepared {
    /// Decodes `entries`; `counts` holds delivery counts (1 when missing).
    fn new(
        stream: &str,
        entries: Vec<StreamId>,
        counts: &HashMap<String, u64>,
        max_deliveries: u64,
    ) -> Self {
        let mut batch = Vec::with_capacity(entries.len());
        let mut dead = Vec::new();
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        for entry in entries {
            let deliveries = counts.get(&entry.id).copied().unwrap_or(1);
            match decode(&entry) {
                Ok(event) if deliveries <= max_deliveries => batch.push(Incoming {
                    stream_id: Some(entry.id),
                    event,
                }),
                Ok(_) => dead.push(dead_letter(
                    stream,
                    &entry,
                    format!("delivered {deliveries} times without being committed"),
                    deliveries,
                )),
                Err(reason) => dead.push(dead_letter(stream, &entry, reason, deliveries)),
            }
        }
        Prepared { ids, batch, dead }
    }
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
            cfg,
            totals: ConsumerTotals::default(),
            last_claim: None,
            last_trim: None,
            ahead: None,
            last_drained: None,
            redis_down_since: None,
        })
    }

    /// What it has done so far.
    pub fn totals(&self) -> &ConsumerTotals {
        &self.totals
    }

    /// This consumer's name in the group.
    pub fn name(&self) -> &str {
        &self.cfg.consumer
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

    /// Runs until `shutdown` is cancelled; the batch in hand is finished and
    /// acknowledged before it returns.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<ConsumerTotals> {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
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
            && let Err(e) = self.write_batch(ready, Origin::New, &shutdown).await
        {
            tracing::warn!(err = %e, "the batch read ahead was left pending");
        }
        tracing::info!(acked = self.totals.acked, "audit consumer stopped");
        Ok(self.totals)
    }

    /// One unit of work: claim idle entries when due, otherwise read and
    /// process one batch. Returns the number of entries acknowledged. When
    /// Redis cannot be reached, records since when (see
    /// [`super::partition`]) before returning the error.
    pub async fn step(&mut self, shutdown: &CancellationToken) -> Result<usize> {
        let result = self.step_inner(shutdown).await;
        if let Err(e) = &result
            && e.is_unavailable()
        {
            self.note_redis_down().await;
        }
        result
    }

    async fn step_inner(&mut self, shutdown: &CancellationToken) -> Result<usize> {
        if let Some(ready) = self.ahead.take() {
            return self.write_batch(ready, Origin::New, shutdown).await;
        }
        if self.claim_due() {
            let n = self.recover(shutdown).await?;
            self.last_claim = Some(Instant::now());
            if n > 0 {
                return Ok(n);
            }
        }
        let read_at = chrono::Utc::now();
        let entries = match self.read(">", true).await {
            Ok(e) => e,
            Err(e) if is_nogroup(&e) => {
                self.ensure_group().await?;
                return Ok(0);
            }
            Err(e) => return Err(e.into()),
        };
        let full = entries.len() >= self.cfg.batch;
        let n = self.process(entries, Origin::New, shutdown).await?;
        if !full && self.ahead.is_none() {
            self.note_drained(read_at).await;
        }
        Ok(n)
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

    /// Drains this consumer's own pending entries, then claims other
    /// consumers' idle ones.
    async fn recover(&mut self, shutdown: &CancellationToken) -> Result<usize> {
        let mut total = 0;
        loop {
            let own = match self.read("0", false).await {
                Ok(e) => e,
                Err(e) if is_nogroup(&e) => {
                    self.ensure_group().await?;
                    return Ok(total);
                }
                Err(e) => return Err(e.into()),
            };
            if own.is_empty() {
                break;
            }
            total += self.process(own, Origin::Pending, shutdown).await?;
        }
        let mut cursor = "0-0".to_owned();
        loop {
            let reply: StreamAutoClaimReply = match redis::cmd("XAUTOCLAIM")
                .arg(&self.stream)
                .arg(&self.cfg.group)
                .arg(&self.cfg.consumer)
                .arg(self.cfg.claim_idle.as_millis() as u64)
                .arg(&cursor)
                .arg("COUNT")
                .arg(self.cfg.batch)
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
                total += self
                    .process(reply.claimed, Origin::Pending, shutdown)
                    .await?;
            }
            cursor = reply.next_stream_id;
            if cursor == "0-0" {
                break;
            }
        }
        Ok(total)
    }

    fn claim_due(&self) -> bool {
        self.last_claim
            .is_none_or(|t| t.elapsed() >= self.cfg.claim_idle.max(Duration::from_millis(100)))
    }

    async fn read(&mut self, id: &str, block: bool) -> redis::RedisResult<Vec<StreamId>> {
        read_entries(self.read_cmd(id, block), &mut self.redis).await
    }

    fn read_cmd(&self, id: &str, block: bool) -> redis::Cmd {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.cfg.group)
            .arg(&self.cfg.consumer)
            .arg("COUNT")
            .arg(self.cfg.batch);
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
        let ready = Prepared::new(&self.stream, entries, &counts, self.cfg.max_deliveries);
        self.write_batch(ready, origin, shutdown).await
    }

    /// Writes a decoded batch, acknowledges it and trims the stream.
    async fn write_batch(
        &mut self,
        ready: Prepared,
        origin: Origin,
        shutdown: &CancellationToken,
    ) -> Result<usize> {
        let Prepared { ids, batch, dead } = ready;
        // One span per batch, linked to the traces of the requests that
        // caused its events: one trace runs from the request to the audit row.
        let span = tracing::info_span!(
            "audit batch",
            entries = ids.len(),
            inserted = tracing::field::Empty
        );
        let mut linked = std::collections::HashSet::new();
        for i in &batch {
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
        // database's work) while this one commits. The entries read ahead are
        // only pending; they are written and acknowledged by the next step,
        // after this batch, so nothing is acknowledged before its commit and
        // batches still commit in stream order. Not when a claim is due, so
        // that recovery gets its turn, nor after shutdown.
        let read_ahead = (origin == Origin::New
            && ids.len() >= self.cfg.batch
            && !self.claim_due()
            && !shutdown.is_cancelled())
        .then(|| {
            let cmd = self.read_cmd(">", false);
            let mut redis = self.redis.clone();
            let stream = self.stream.clone();
            let max_deliveries = self.cfg.max_deliveries;
            tokio::spawn(async move {
                let entries = read_entries(cmd, &mut redis).await?;
                Ok::<_, RedisError>(Prepared::new(
                    &stream,
                    entries,
                    &HashMap::new(),
                    max_deliveries,
                ))
            })
        });
        let (outcome, ahead) = tokio::join!(
            self.commit(&batch, &dead, shutdown)
                .instrument(span.clone()),
            futures::future::OptionFuture::from(read_ahead)
        );
        match ahead {
            Some(Ok(Ok(ready))) if !ready.ids.is_empty() => self.ahead = Some(ready),
            // Entries a failed read may have delivered stay pending and are
            // recovered like any other.
            Some(Ok(Err(e))) => tracing::debug!(err = %e, "reading ahead failed"),
            Some(Err(e)) => tracing::warn!(err = %e, "reading ahead failed"),
            _ => {}
        }
        let outcome = outcome?;
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
        tracing::debug!(
            acked,
            inserted = outcome.inserted,
            duplicates = outcome.duplicates,
            dead_letters = outcome.dead_letters,
            "batch committed"
        );
        // During a backlog (full batches) trim at most every TRIM_EVERY: each
        // trim is three round trips, and the retention window dwarfs the
        // pause. A batch that is not full means the consumer caught up: trim.
        let trim_due = self.last_trim.is_none_or(|t| t.elapsed() >= TRIM_EVERY);
        if ids.len() < self.cfg.batch || trim_due {
            self.last_trim = Some(Instant::now());
            if let Err(e) = self.trim().await {
                tracing::warn!(err = %e, "trimming the stream failed");
            }
        }
        Ok(ids.len())
    }

    /// Writes the batch, retrying while the database is unreachable and
    /// isolating entries that fail on their own.
    async fn commit(
        &mut self,
        batch: &[Incoming],
        dead: &[DeadLetter],
        shutdown: &CancellationToken,
    ) -> Result<BatchOutcome> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.sink.write(batch, dead).await {
                Ok(o) => return Ok(o),
                Err(e) => {
                    if is_data_error(&e) && reachable(self.sink.db()).await {
                        tracing::warn!(err = %e, "batch refused for its data; isolating entries");
                        return self.commit_one_by_one(batch, dead).await;
                    }
                    // Unreachable, locked, a deadlock, a timeout: the batch is
                    // fine, the database is not; try the same batch again.
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

    async fn commit_one_by_one(
        &mut self,
        batch: &[Incoming],
        dead: &[DeadLetter],
    ) -> Result<BatchOutcome> {
        let mut total = self.sink.write(&[], dead).await?;
        for i in batch {
            let o = match self.sink.write(std::slice::from_ref(i), &[]).await {
                Ok(o) => o,
                // Not this entry's fault: leave the batch unacknowledged.
                Err(e) if !is_data_error(&e) => return Err(e),
                Err(e) => {
                    let d = DeadLetter {
                        stream: self.stream.clone(),
                        stream_id: i.stream_id.clone().unwrap_or_default(),
                        fields: fields_json(&i.event),
                        reason: format!("the audit database refused it: {e}"),
                        deliveries: 1,
                    };
                    self.sink.write(&[], &[d]).await?
                }
            };
            total.inserted += o.inserted;
            total.duplicates += o.duplicates;
            total.snapshots += o.snapshots;
            total.dead_letters += o.dead_letters;
            total.seq_conflicts += o.seq_conflicts;
        }
        Ok(total)
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
pub async fn safe_trim_point(
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

/// True when the database refused a write because of the data itself
/// (a constraint, a value out of range, a row that does not decode), as
/// opposed to its own state (unreachable, locked, a deadlock, a timeout),
/// which only calls for another try.
pub fn is_data_error(e: &crate::error::Error) -> bool {
    use crate::error::Error;
    match e {
        Error::Corrupt(_) | Error::InvalidInput(_) => true,
        Error::Database(db) => {
            if db.sql_err().is_some() {
                return true;
            }
            let code = match db {
                sea_orm::DbErr::Exec(sea_orm::RuntimeErr::SqlxError(x))
                | sea_orm::DbErr::Query(sea_orm::RuntimeErr::SqlxError(x)) => match &**x {
                    sea_orm::sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
                    _ => None,
                },
                _ => None,
            };
            code.is_some_and(|c| {
                if c.len() == 5 {
                    // PostgreSQL SQLSTATE classes 22 (data exception) and
                    // 23 (integrity constraint violation).
                    c.starts_with("22") || c.starts_with("23")
                } else {
                    // SQLite primary codes 19 (constraint), 20 (mismatch)
                    // and 25 (range), plain or extended.
                    c.parse::<u32>()
                        .is_ok_and(|n| matches!(n & 0xff, 19 | 20 | 25))
                }
            })
        }
        _ => false,
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
    }
}
