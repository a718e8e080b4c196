//! The audit suite: how fast the real [`AuditConsumer`] and [`AuditSink`]
//! move events from the stream into each database, beside what the database
//! itself can insert, and how far the consumer lags behind a steady load.
//!
//! 1. **Fill.** `--clients` clients make sessions and change them through the
//!    store until the stream holds `--events` events (creates, updates,
//!    touches, platform switches, logouts: what app servers write).
//! 2. **Drain**, per database: a consumer group of its own reads the whole
//!    stream with the production code path (`AuditConsumer::step`: read,
//!    decode, one transaction per batch with events and snapshots, `XACK`,
//!    trim), timed from the first read to the last ack.
//! 3. **Ceiling**, same run, same rows: PostgreSQL inserts as many rows into
//!    an identical table (`CREATE TABLE … (LIKE session_events INCLUDING
//!    ALL)`) with one server-side `INSERT … SELECT … FROM generate_series`,
//!    with the event types and payloads of the drained rows; SQLite inserts
//!    the drained rows themselves into an identical table in one transaction
//!    with one prepared statement. Two more references, for the analysis:
//!    the drained rows inserted as the sink inserts events and nothing else
//!    ("events-only"), and copied inside the engine ("in-engine").
//!    Every statement the sink sends during the drain is timed (sea-orm's
//!    metric callback), so the report says where a batch's time goes.
//! 4. **Lag**, per database: a consumer (`AuditConsumer::run`, the worker's
//!    loop) on a fresh stream while writers add `--rate` events/s for
//!    `--lag-duration` seconds. Lag of an event = its `recorded_at` minus the
//!    millisecond time of its stream id. `recorded_at` is stamped when the
//!    batch's transaction starts, so the commit itself is not in it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::Rng as _;
use sea_orm::sqlx;
use sea_orm::{
    ColumnTrait as _, ConnectionTrait as _, EntityTrait as _, PaginatorTrait as _,
    QueryFilter as _, QueryOrder as _, QuerySelect as _, Statement,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::databases::{self, BenchDb, Engine};
use super::driver::{Client, Latency, Usage};
use super::store::{changes, new_session};
use super::{
    BenchArgs, Report, Suite, delete_namespace, machine, namespace, progress, ratio, round, target,
    targets_text,
};
use vedfolnir_sessions::audit::entity::session_events;
use vedfolnir_sessions::audit::sink::stream_id_millis;
use vedfolnir_sessions::audit::{AuditConsumer, AuditSink, ConsumerConfig};
use vedfolnir_sessions::config::Config;
use vedfolnir_sessions::error::{Error, Result};
use vedfolnir_sessions::event::{DestroyReason, Platform};
use vedfolnir_sessions::id::SessionId;
use vedfolnir_sessions::store::SessionStore;

const USERS: u64 = 1000;
const CEILING_TABLE: &str = "bench_ceiling_events";

/// An app server's client: one session at a time, a few changes, then a
/// logout or a new login. Every step appends exactly one event.
struct Writer {
    client: Client,
    current: Option<(SessionId, u32)>,
}

impl Writer {
    fn new(seed: u64) -> Self {
        Writer {
            client: Client::new(seed),
            current: None,
        }
    }

    /// One mutation; returns true when it created a session.
    async fn step(&mut self, store: &SessionStore) -> Result<bool> {
        self.client.counter += 1;
        match self.current.take() {
            Some((id, 0)) if self.client.rng.random_bool(0.5) => {
                store.destroy(&id, DestroyReason::Logout).await?;
                Ok(false)
            }
            Some((id, left)) if left > 0 => {
                let r = self.client.rng.random_range(0..100);
                if r < 60 {
                    store.update(&id, changes(&mut self.client)).await?;
                } else if r < 85 {
                    store.touch(&id).await?;
                } else {
                    let n = self.client.rng.random_range(1..=5i64);
                    store
                        .switch_platform(
                            &id,
                            Platform {
                                platform_connection_id: 100 + n,
                                platform_name: format!("Platform {n}"),
                                platform_type: "pixelfed".to_owned(),
                                platform_instance_url: format!("https://pixelfed{n}.example.com"),
                            },
                        )
                        .await?;
                }
                self.current = Some((id, left - 1));
                Ok(false)
            }
            // A new login (the previous session, if any, is left to expire).
            _ => {
                let created = store
                    .create(new_session(&mut self.client.rng, USERS))
                    .await?;
                let left = self.client.rng.random_range(3..=7);
                self.current = Some((created.session_id, left));
                Ok(true)
            }
        }
    }
}

/// Fills the store's stream with at least `events` events.
async fn fill(store: &SessionStore, clients: usize, events: u64) -> Result<(u64, u64, f64)> {
    let written = Arc::new(AtomicU64::new(0));
    let sessions = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let store = store.clone();
        let written = written.clone();
        let sessions = sessions.clone();
        tasks.push(tokio::spawn(async move {
            let mut w = Writer::new(100 + i as u64);
            while written.load(Ordering::Relaxed) < events {
                if w.step(&store).await? {
                    sessions.fetch_add(1, Ordering::Relaxed);
                }
                written.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        match t.await {
            Ok(r) => r?,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let mut conn = store.connection();
    let len: u64 = redis::cmd("XLEN")
        .arg(&store.keys().part(0).stream)
        .query_async(&mut conn)
        .await?;
    Ok((len, sessions.load(Ordering::Relaxed), secs))
}

fn consumer_config(group: &str) -> Result<ConsumerConfig> {
    let mut cfg = ConsumerConfig::from_env()?;
    cfg.group = group.to_owned();
    // Several groups read the same stream here; trimming for one must not
    // take entries from the next. (The trim calls still run.)
    cfg.retention = Duration::from_secs(24 * 3600);
    Ok(cfg)
}

/// One database's drain of the filled stream.
struct Drain {
    events: u64,
    seconds: f64,
    batches: u64,
    inserted: u64,
    dead_letters: u64,
    /// Statement kind → (count, time), as the database connection saw them.
    statements: BTreeMap<&'static str, (u64, Duration)>,
    redis: Usage,
}

/// What a statement the sink sends does, from its SQL.
fn statement_kind(sql: &str) -> &'static str {
    let s = sql.trim_start();
    let insert = s.starts_with("INSERT");
    if insert && s.contains("\"session_events\"") {
        "insert events"
    } else if insert && s.contains("\"session_snapshots\"") {
        "upsert snapshots"
    } else if insert && s.contains("\"dead_letters\"") {
        "insert dead letters"
    } else if s.starts_with("SELECT") && s.contains("\"session_snapshots\"") && s.contains("max(") {
        "select snapshots and newest seq per session"
    } else if s.starts_with("SELECT") && s.contains("MAX(") {
        "select newest seq per session"
    } else if s.starts_with("SELECT") && s.contains("FROM \"session_snapshots\"") {
        "select snapshots"
    } else if s.starts_with("SELECT") && s.contains("\"seq\" >") {
        "select history (out-of-order path)"
    } else if s.starts_with("SELECT") && s.contains("FROM \"session_events\"") {
        "select present event ids"
    } else {
        "other"
    }
}

async fn drain(config: &Config, bdb: &BenchDb, expected: u64) -> Result<Drain> {
    type Stats = BTreeMap<&'static str, (u64, Duration)>;
    let stats: Arc<Mutex<Stats>> = Arc::default();
    let mut db = bdb.db.clone();
    {
        let stats = stats.clone();
        db.set_metric_callback(move |info| {
            if let Ok(mut s) = stats.lock() {
                let e = s.entry(statement_kind(&info.statement.sql)).or_default();
                e.0 += 1;
                e.1 += info.elapsed;
            }
        });
    }
    let sink = AuditSink::new(db, config.session_timeout, config.event_stream.clone());
    let cfg = consumer_config(&format!("bench-{}", bdb.label))?;
    let mut consumer = AuditConsumer::new(config, sink, cfg).await?;
    consumer.ensure_group().await?;
    let token = CancellationToken::new();
    let mut conn = SessionStore::connect(config).await?.connection();
    let before = Usage::now(&mut conn).await?;
    let start = Instant::now();
    let mut done = 0u64;
    let mut idle = 0;
    while done < expected {
        let n = consumer.step(&token).await? as u64;
        done += n;
        idle = if n == 0 { idle + 1 } else { 0 };
        if idle >= 5 {
            return Err(Error::InvalidInput(format!(
                "the consumer stopped at {done} of {expected} entries"
            )));
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let redis = Usage::now(&mut conn).await?.since(&before);
    let t = consumer.totals();
    let statements = stats.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(Drain {
        events: done,
        seconds,
        batches: t.batches,
        inserted: t.inserted,
        dead_letters: t.dead_letters,
        statements,
        redis,
    })
}

const EVENT_COLUMNS: [&str; 12] = [
    "event_id",
    "session_id",
    "seq",
    "event_type",
    "user_id",
    "occurred_at",
    "recorded_at",
    "stream_id",
    "schema_version",
    "payload",
    "traceparent",
    "source",
];

/// Creates `table`, identical to `session_events` (columns, constraints,
/// indexes), empty.
async fn copy_events_table(bdb: &BenchDb, table: &str) -> Result<()> {
    let db = &bdb.db;
    db.execute_unprepared(&format!("DROP TABLE IF EXISTS {table}"))
        .await?;
    match bdb.engine {
        Engine::Postgres => {
            db.execute_unprepared(&format!(
                "CREATE TABLE {table} (LIKE session_events INCLUDING ALL)"
            ))
            .await?;
        }
        Engine::Sqlite => {
            // The same DDL, indexes included, renamed.
            let ddl = db
                .query_all_raw(Statement::from_string(
                    db.get_database_backend(),
                    "SELECT sql FROM sqlite_master WHERE tbl_name = 'session_events' \
                     AND sql IS NOT NULL ORDER BY type = 'table' DESC",
                ))
                .await?;
            for row in ddl {
                let sql: String = row.try_get("", "sql")?;
                db.execute_unprepared(&sql.replace("session_events", table))
                    .await?;
            }
        }
    }
    Ok(())
}

fn source_name(s: session_events::EventSource) -> &'static str {
    match s {
        session_events::EventSource::Stream => "stream",
        session_events::EventSource::Fallback => "fallback",
    }
}

/// The database's own rate for `rows.len()` rows like the drained ones.
async fn ceiling(
    bdb: &BenchDb,
    rows: &[session_events::Model],
    per_session: u64,
) -> Result<(f64, &'static str)> {
    let db = &bdb.db;
    copy_events_table(bdb, CEILING_TABLE).await?;
    let n = rows.len() as u64;
    let (secs, method) = match bdb.engine {
        Engine::Postgres => {
            let k = per_session.max(1);
            let sql = format!(
                "INSERT INTO {CEILING_TABLE} ({columns}) \
                 SELECT gen_random_uuid(), \
                   encode(sha256(convert_to((g / {k})::text, 'UTF8')), 'hex'), \
                   g % {k} + 1, \
                   s.types[g % s.n + 1], \
                   ((g / {k}) % {USERS} + 1)::text, \
                   now(), now(), \
                   (1700000000000 + g / 16)::text || '-' || (g % 16)::text, \
                   1, \
                   s.payloads[g % s.n + 1], \
                   NULL, 'stream' \
                 FROM generate_series(0, {last}) AS g, \
                   (SELECT array_agg(event_type ORDER BY id) AS types, \
                           array_agg(payload ORDER BY id) AS payloads, count(*)::int AS n \
                      FROM (SELECT id, event_type, payload FROM session_events \
                            ORDER BY id LIMIT 1000) t) AS s",
                columns = EVENT_COLUMNS.join(", "),
                last = n.saturating_sub(1),
            );
            let start = Instant::now();
            db.execute_unprepared(&sql).await?;
            (
                start.elapsed().as_secs_f64(),
                "one INSERT … SELECT FROM generate_series into a copy of session_events \
                 (LIKE … INCLUDING ALL), with the drained rows' types and payloads",
            )
        }
        Engine::Sqlite => {
            let pool = db.get_sqlite_connection_pool();
            let start = Instant::now();
            let mut tx = pool.begin().await.map_err(sqlx_error)?;
            for e in rows {
                sqlx::query(
                    "INSERT INTO bench_ceiling_events (event_id, session_id, seq, event_type, \
                       user_id, occurred_at, recorded_at, stream_id, schema_version, payload, \
                       traceparent, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(e.event_id)
                .bind(e.session_id.as_str())
                .bind(e.seq)
                .bind(e.event_type.as_str())
                .bind(e.user_id.as_deref())
                .bind(e.occurred_at)
                .bind(e.recorded_at)
                .bind(e.stream_id.as_deref())
                .bind(e.schema_version)
                .bind(e.payload.as_str())
                .bind(e.traceparent.as_deref())
                .bind(source_name(e.source))
                .execute(&mut *tx)
                .await
                .map_err(sqlx_error)?;
            }
            tx.commit().await.map_err(sqlx_error)?;
            (
                start.elapsed().as_secs_f64(),
                "the drained rows, one transaction, one prepared INSERT per row, \
                 into a copy of session_events",
            )
        }
    };
    db.execute_unprepared(&format!("DROP TABLE {CEILING_TABLE}"))
        .await?;
    Ok((ratio(n as f64, secs), method))
}

/// The drained rows copied inside the engine (`INSERT … SELECT … FROM
/// session_events` into an identical table): the engine's own rate for
/// exactly these rows, with no client in the way.
async fn engine_copy(bdb: &BenchDb, rows: u64) -> Result<f64> {
    const TABLE: &str = "bench_copied_events";
    copy_events_table(bdb, TABLE).await?;
    let columns = EVENT_COLUMNS.join(", ");
    let start = Instant::now();
    bdb.db
        .execute_unprepared(&format!(
            "INSERT INTO {TABLE} ({columns}) SELECT {columns} FROM session_events"
        ))
        .await?;
    let secs = start.elapsed().as_secs_f64();
    bdb.db
        .execute_unprepared(&format!("DROP TABLE {TABLE}"))
        .await?;
    Ok(ratio(rows as f64, secs))
}

/// The drained rows inserted as the sink inserts events (multi-row
/// `INSERT … ON CONFLICT DO NOTHING`, one transaction per batch of `batch`)
/// and nothing else: the events' share of a drain.
async fn batched_insert(
    bdb: &BenchDb,
    rows: &[session_events::Model],
    batch: usize,
) -> Result<f64> {
    use sea_orm::TransactionTrait as _;
    use sea_orm::sea_query::{Alias, OnConflict, Query, SimpleExpr};
    const TABLE: &str = "bench_batched_events";
    copy_events_table(bdb, TABLE).await?;
    let start = Instant::now();
    for chunk in rows.chunks(batch.max(1)) {
        let txn = bdb.db.begin().await?;
        let mut insert = Query::insert();
        insert
            .into_table(Alias::new(TABLE))
            .columns(EVENT_COLUMNS.map(Alias::new))
            .on_conflict(OnConflict::new().do_nothing().to_owned());
        for e in chunk {
            let values: [SimpleExpr; 12] = [
                e.event_id.into(),
                e.session_id.clone().into(),
                e.seq.into(),
                e.event_type.clone().into(),
                e.user_id.clone().into(),
                e.occurred_at.into(),
                e.recorded_at.into(),
                e.stream_id.clone().into(),
                e.schema_version.into(),
                e.payload.clone().into(),
                e.traceparent.clone().into(),
                source_name(e.source).into(),
            ];
            insert
                .values(values)
                .map_err(|err| Error::Database(sea_orm::DbErr::Custom(err.to_string())))?;
        }
        txn.execute(&insert).await?;
        txn.commit().await?;
    }
    let secs = start.elapsed().as_secs_f64();
    bdb.db
        .execute_unprepared(&format!("DROP TABLE {TABLE}"))
        .await?;
    Ok(ratio(rows.len() as f64, secs))
}

fn sqlx_error(e: sqlx::Error) -> Error {
    Error::Database(sea_orm::DbErr::Custom(e.to_string()))
}

/// Consumer lag under a steady write load.
struct Lag {
    written: u64,
    achieved_rate: f64,
    latency: Latency,
    mean_ms: f64,
    batches: u64,
}

async fn lag(args: &BenchArgs, config: &Config, bdb: &BenchDb) -> Result<Lag> {
    let ns = namespace();
    let config = config.clone().with_namespace(&ns);
    let store = SessionStore::connect(&config).await?;
    let mut conn = store.connection();
    let outcome = lag_in(args, &config, &store, bdb).await;
    if let Err(e) = delete_namespace(&mut conn, &ns).await {
        eprintln!("bench audit: could not delete the keys of {ns}: {e}");
    }
    outcome
}

async fn lag_in(
    args: &BenchArgs,
    config: &Config,
    store: &SessionStore,
    bdb: &BenchDb,
) -> Result<Lag> {
    let sink = AuditSink::new(
        bdb.db.clone(),
        config.session_timeout,
        config.event_stream.clone(),
    );
    let mut consumer = AuditConsumer::new(config, sink, ConsumerConfig::from_env()?).await?;
    consumer.ensure_group().await?;
    let token = CancellationToken::new();
    let worker = tokio::spawn(consumer.run(token.clone()));
    let since: DateTime<Utc> = Utc::now();
    let writers = 16u32.min(args.rate);
    let period = Duration::from_secs_f64(f64::from(writers) / f64::from(args.rate));
    let duration = Duration::from_secs_f64(args.lag_duration);
    let start = tokio::time::Instant::now();
    let written = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..writers {
        let store = store.clone();
        let written = written.clone();
        tasks.push(tokio::spawn(async move {
            let mut w = Writer::new(1000 + u64::from(i));
            // Writers start spread over one period.
            let first = start + period.mul_f64(f64::from(i) / f64::from(writers));
            let mut tick = tokio::time::interval_at(first, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            loop {
                tick.tick().await;
                if start.elapsed() >= duration {
                    return Ok::<_, Error>(());
                }
                w.step(&store).await?;
                written.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut failed = None;
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = failed.or(Some(e)),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let written = written.load(Ordering::Relaxed);
    // Wait for the consumer to commit everything that was written.
    let deadline = Instant::now() + Duration::from_secs(120);
    let committed = loop {
        let n = session_events::Entity::find()
            .filter(session_events::Column::OccurredAt.gte(since))
            .count(&bdb.db)
            .await?;
        if n >= written || Instant::now() > deadline || failed.is_some() {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    token.cancel();
    let totals = match worker.await {
        Ok(r) => r?,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    if let Some(e) = failed {
        return Err(e);
    }
    if committed < written {
        return Err(Error::InvalidInput(format!(
            "the consumer committed {committed} of {written} events within 120 s"
        )));
    }
    let rows: Vec<(Option<String>, DateTime<Utc>)> = session_events::Entity::find()
        .select_only()
        .column(session_events::Column::StreamId)
        .column(session_events::Column::RecordedAt)
        .filter(session_events::Column::OccurredAt.gte(since))
        .into_tuple()
        .all(&bdb.db)
        .await?;
    let lags: Vec<f64> = rows
        .iter()
        .filter_map(|(sid, recorded)| {
            let ms = stream_id_millis(sid.as_deref()?)?;
            Some(recorded.timestamp_micros() as f64 / 1000.0 - ms as f64)
        })
        .collect();
    let mean_ms = ratio(lags.iter().sum::<f64>(), lags.len() as f64);
    Ok(Lag {
        written,
        achieved_rate: ratio(written as f64, elapsed),
        latency: Latency::of_ms(&lags),
        mean_ms,
        batches: totals.batches,
    })
}

pub(super) async fn run(args: &BenchArgs, config: Config) -> Result<Report> {
    let ns = namespace();
    let config = config.with_namespace(&ns);
    let store = SessionStore::connect(&config).await?;
    let mut conn = store.connection();
    let dbs = databases::open(args, Suite::Audit).await?;
    let outcome = measure(args, &config, &store, &dbs).await;
    databases::close_all(dbs).await;
    match delete_namespace(&mut conn, &ns).await {
        Ok(n) => progress(Suite::Audit, format!("deleted {n} keys of {ns}")),
        Err(e) => eprintln!("bench audit: could not delete the keys of {ns}: {e}"),
    }
    outcome
}

async fn measure(
    args: &BenchArgs,
    config: &Config,
    store: &SessionStore,
    dbs: &[BenchDb],
) -> Result<Report> {
    progress(
        Suite::Audit,
        format!(
            "filling the stream with {} events from {} clients",
            args.events, args.clients
        ),
    );
    let (events, sessions, fill_secs) = fill(store, args.clients, args.events).await?;
    let per_session = (events as f64 / sessions.max(1) as f64).round() as u64;
    progress(
        Suite::Audit,
        format!(
            "{events} events ({sessions} sessions) in {fill_secs:.1} s ({:.0}/s)",
            ratio(events as f64, fill_secs)
        ),
    );
    let mut results = Vec::new();
    let mut targets = Vec::new();
    for bdb in dbs {
        progress(
            Suite::Audit,
            format!("{}: draining {events} events", bdb.label),
        );
        let d = drain(config, bdb, events).await?;
        let rate = ratio(d.events as f64, d.seconds);
        progress(
            Suite::Audit,
            format!(
                "{}: {:.0} events/s; measuring the database's ceiling",
                bdb.label, rate
            ),
        );
        let rows = session_events::Entity::find()
            .order_by_asc(session_events::Column::Id)
            .all(&bdb.db)
            .await?;
        let (ceiling, method) = ceiling(bdb, &rows, per_session).await?;
        let batch = ConsumerConfig::from_env()?.batch;
        let batched = batched_insert(bdb, &rows, batch).await?;
        let copied = engine_copy(bdb, rows.len() as u64).await?;
        drop(rows);
        progress(
            Suite::Audit,
            format!(
                "{}: ceiling {ceiling:.0} rows/s; lag at {} events/s for {} s",
                bdb.label, args.rate, args.lag_duration
            ),
        );
        let l = lag(args, config, bdb).await?;
        let r = ratio(rate, ceiling);
        if bdb.engine == Engine::Postgres {
            targets.push(target(
                &format!("{}: worker >= 0.5x ceiling", bdb.label),
                r,
                r >= 0.5,
            ));
        }
        let met = l.latency.p99_ms < 1000.0 && l.achieved_rate >= 0.95 * f64::from(args.rate);
        targets.push(target(
            &format!("{}: lag p99 < 1 s at {} events/s", bdb.label, args.rate),
            l.latency.p99_ms / 1000.0,
            met,
        ));
        let mut statements = serde_json::Map::new();
        let mut in_statements = 0.0;
        for (kind, (count, time)) in &d.statements {
            let ms = time.as_secs_f64() * 1000.0;
            in_statements += ms;
            statements.insert(
                (*kind).to_owned(),
                json!({
                    "count": count,
                    "total_ms": round(ms, 1),
                    "ms_per_batch": round(ratio(ms, d.batches as f64), 2),
                    "share_of_drain": round(ratio(ms, d.seconds * 1000.0), 3),
                }),
            );
        }
        let rest = d.seconds * 1000.0 - in_statements;
        statements.insert(
            "outside statements (begin, commit, decode, fold, Redis)".to_owned(),
            json!({
                "total_ms": round(rest, 1),
                "ms_per_batch": round(ratio(rest, d.batches as f64), 2),
                "share_of_drain": round(ratio(rest, d.seconds * 1000.0), 3),
            }),
        );
        results.push(json!({
            "database": bdb.label,
            "version": bdb.version,
            "events": d.events,
            "inserted": d.inserted,
            "dead_letters": d.dead_letters,
            "batches": d.batches,
            "seconds": round(d.seconds, 3),
            "events_per_sec": round(rate, 0),
            "ceiling_events_per_sec": round(ceiling, 0),
            "ceiling": method,
            "ratio": round(r, 3),
            "events_only_batched_events_per_sec": round(batched, 0),
            "engine_copy_events_per_sec": round(copied, 0),
            "transport": bdb.transport,
            "db_time": statements,
            "redis_commands_per_event": d.redis.commands_json(d.events),
            "redis_cpu_us_per_event": d.redis.redis_us_per_op(d.events),
            "client_cpu_us_per_event": d.redis.client_us_per_op(d.events),
            "lag": {
                "target_rate": args.rate,
                "achieved_rate": round(l.achieved_rate, 0),
                "seconds": args.lag_duration,
                "events": l.written,
                "batches": l.batches,
                "p50_ms": round(l.latency.p50_ms, 1),
                "p95_ms": round(l.latency.p95_ms, 1),
                "p99_ms": round(l.latency.p99_ms, 1),
                "max_ms": round(l.latency.max_ms, 1),
                "mean_ms": round(l.mean_ms, 1),
            },
        }));
    }
    let mut conn = store.connection();
    let machine = machine(&mut conn).await;
    let json = json!({
        "suite": "audit",
        "machine": machine,
        "databases": dbs.iter().map(BenchDb::describe).collect::<Vec<_>>(),
        "fill": {
            "events": events,
            "sessions": sessions,
            "clients": args.clients,
            "seconds": round(fill_secs, 3),
            "events_per_sec": round(ratio(events as f64, fill_secs), 0),
        },
        "batch_size": ConsumerConfig::from_env()?.batch,
        "results": results,
        "targets": targets,
    });
    let text = render(&json);
    Ok(Report { json, text })
}

fn render(j: &Value) -> String {
    let f = &j["fill"];
    let mut out = format!(
        "audit suite: {} events ({} sessions) written by {} clients at {} events/s, \
         drained in batches of {}\n\n",
        f["events"], f["sessions"], f["clients"], f["events_per_sec"], j["batch_size"]
    );
    out.push_str(&format!(
        "{:<15} {:>12} {:>13} {:>6} {:>14} {:>12} | {:>10} {:>7} {:>7} {:>7} {:>7}\n",
        "database",
        "worker ev/s",
        "ceiling ev/s",
        "ratio",
        "events-only/s",
        "in-engine/s",
        "lag ev/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms"
    ));
    let n = |v: &Value| v.as_f64().unwrap_or(0.0);
    for r in j["results"].as_array().into_iter().flatten() {
        let l = &r["lag"];
        out.push_str(&format!(
            "{:<15} {:>12.0} {:>13.0} {:>6.2} {:>14.0} {:>12.0} | {:>10.0} {:>7.1} {:>7.1} {:>7.1} {:>7.1}\n",
            format!(
                "{} ({})",
                r["database"].as_str().unwrap_or_default(),
                r["transport"].as_str().unwrap_or_default()
            ),
            n(&r["events_per_sec"]),
            n(&r["ceiling_events_per_sec"]),
            n(&r["ratio"]),
            n(&r["events_only_batched_events_per_sec"]),
            n(&r["engine_copy_events_per_sec"]),
            n(&l["achieved_rate"]),
            n(&l["p50_ms"]),
            n(&l["p95_ms"]),
            n(&l["p99_ms"]),
            n(&l["max_ms"]),
        ));
    }
    out.push_str(
        "\nevents-only: the same rows inserted as the sink inserts events (multi-row INSERT … \
         ON CONFLICT DO NOTHING, one transaction per batch), without snapshots or Redis\n\
         in-engine: the same rows copied inside the database (INSERT … SELECT FROM session_events)\n\
         lag: recorded_at minus the stream id's time, at a steady write rate\n",
    );
    out.push_str("\nceilings:\n");
    for r in j["results"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {}: {}\n",
            r["database"].as_str().unwrap_or_default(),
            r["ceiling"].as_str().unwrap_or_default()
        ));
    }
    out.push_str("\nwhere a drain's time goes, per batch:\n");
    for r in j["results"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {} ({} batches):\n",
            r["database"].as_str().unwrap_or_default(),
            r["batches"]
        ));
        for (kind, t) in r["db_time"].as_object().into_iter().flatten() {
            out.push_str(&format!(
                "    {:<58} {:>8.2} ms {:>5.1}%\n",
                kind,
                t["ms_per_batch"].as_f64().unwrap_or(0.0),
                t["share_of_drain"].as_f64().unwrap_or(0.0) * 100.0
            ));
        }
    }
    out.push_str("\ntargets:\n");
    out.push_str(&targets_text(
        j["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]),
    ));
    out
}
