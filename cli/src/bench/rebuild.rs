//! The rebuild suite: `--sessions` sessions (50,000 by default) of one to
//! six events each, inserted in bulk into the event table of each audit
//! database, then `snapshots rebuild` ([`vedfolnir_sessions::audit::rebuild`]) into an
//! empty snapshot table, and again over the rebuilt one (nothing changes:
//! the idempotent pass). Same run, same connection: the floor, one read of
//! the whole event table in the same order and pages, which no rebuild can
//! beat.

use std::time::Instant;

use chrono::Utc;
use rand::Rng as _;
use sea_orm::{ConnectionTrait as _, EntityTrait as _, Set, Statement, TransactionTrait as _};
use serde_json::{Map, Value, json};

use super::databases::{self, BenchDb};
use super::driver::Client;
use super::store::new_session;
use super::{BenchArgs, Report, Suite, machine, progress, ratio, round, target, targets_text};
use vedfolnir_sessions::audit::entity::session_events::{self, EventSource};
use vedfolnir_sessions::audit::rebuild::{self, PAGE};
use vedfolnir_sessions::config::Config;
use vedfolnir_sessions::error::{Error, Result};
use vedfolnir_sessions::event::{DestroyReason, EventKind, SCHEMA_VERSION};
use vedfolnir_sessions::id::Token;
use vedfolnir_sessions::store::SessionStore;

const DEFAULT_SESSIONS: usize = 50_000;

/// The event rows of `n` sessions: `created`, up to four `updated`, and a
/// `destroyed` for one session in four.
fn rows(n: usize) -> Vec<session_events::ActiveModel> {
    let mut c = Client::new(7);
    let users = (n / 4).max(1) as u64;
    let now = Utc::now();
    let mut out = Vec::with_capacity(n * 4);
    for k in 0..n {
        let id = Token::generate().session_id().to_string();
        let fields = new_session(&mut c.rng, users).fields;
        let user = vedfolnir_sessions::session::user_id_of(&fields);
        let mut kinds = vec![EventKind::Created {
            fields,
            imported: None,
            rotated_from: None,
        }];
        for v in 0..c.rng.random_range(0..=4u64) {
            let mut set = Map::new();
            set.insert("page_views".to_owned(), Value::from(v));
            kinds.push(EventKind::Updated {
                set,
                unset: Vec::new(),
            });
        }
        if k % 4 == 0 {
            kinds.push(EventKind::Destroyed {
                reason: DestroyReason::Logout,
            });
        }
        for (seq, kind) in kinds.into_iter().enumerate() {
            let at = now + chrono::Duration::milliseconds(seq as i64);
            out.push(session_events::ActiveModel {
                id: Default::default(),
                event_id: Set(uuid::Uuid::now_v7()),
                session_id: Set(id.clone()),
                seq: Set(seq as i64 + 1),
                event_type: Set(kind.type_name().to_owned()),
                user_id: Set(user.clone()),
                occurred_at: Set(at),
                recorded_at: Set(at),
                stream_id: Set(Some(format!("{}-{seq}", at.timestamp_millis()))),
                schema_version: Set(SCHEMA_VERSION as i32),
                payload: Set(kind.payload_json()),
                traceparent: Set(None),
                source: Set(EventSource::Stream),
            });
        }
    }
    out
}

async fn insert(bdb: &BenchDb, rows: &[session_events::ActiveModel]) -> Result<f64> {
    let start = Instant::now();
    let txn = bdb.db.begin().await?;
    for chunk in rows.chunks(1000) {
        session_events::Entity::insert_many(chunk.iter().cloned())
            .exec_without_returning(&txn)
            .await?;
    }
    txn.commit().await?;
    if bdb.engine == databases::Engine::Postgres {
        bdb.db.execute_unprepared("ANALYZE session_events").await?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The floor: every event row read once, in `(session_id, seq)` order and
/// pages of the rebuild's size, decoded into the same columns.
async fn read_only(bdb: &BenchDb) -> Result<f64> {
    let start = Instant::now();
    let backend = bdb.db.get_database_backend();
    let (mut sid, mut seq) = (String::new(), 0i64);
    let placeholders = if backend == sea_orm::DbBackend::Postgres {
        ("$1", "$2")
    } else {
        ("?", "?")
    };
    loop {
        let sql = format!(
            r#"SELECT "session_id", "seq", "event_type", "user_id", "occurred_at", "stream_id", "schema_version", "payload"
               FROM "session_events" WHERE ("session_id", "seq") > ({}, {})
               ORDER BY "session_id", "seq" LIMIT {PAGE}"#,
            placeholders.0, placeholders.1
        );
        let rows = bdb
            .db
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                sql,
                [sid.clone().into(), seq.into()],
            ))
            .await?;
        let n = rows.len();
        for r in &rows {
            let _: String = r.try_get_by_index(7)?;
        }
        let Some(last) = rows.last() else { break };
        sid = last.try_get_by_index(0)?;
        seq = last.try_get_by_index(1)?;
        if (n as u64) < PAGE {
            break;
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

struct Measured {
    json: Value,
    rate: f64,
}

async fn one(
    config: &Config,
    bdb: &BenchDb,
    rows: &[session_events::ActiveModel],
    n: usize,
) -> Result<Measured> {
    progress(
        Suite::Rebuild,
        format!(
            "{}: inserting {} events of {n} sessions",
            bdb.label,
            rows.len()
        ),
    );
    let insert_secs = insert(bdb, rows).await?;
    let read_secs = read_only(bdb).await?;
    progress(Suite::Rebuild, format!("{}: rebuilding", bdb.label));
    let first = rebuild::rebuild(&bdb.db, config.session_timeout, None, |_, _| {}).await?;
    if first.sessions != n as u64 || first.rebuilt != n as u64 || first.gapped != 0 {
        return Err(Error::InvalidInput(format!(
            "the rebuild folded {} sessions, wrote {}, for {n}: {first:?}",
            first.sessions, first.rebuilt
        )));
    }
    progress(Suite::Rebuild, format!("{}: again (idempotent)", bdb.label));
    let second = rebuild::rebuild(&bdb.db, config.session_timeout, None, |_, _| {}).await?;
    if second.rebuilt != 0 {
        return Err(Error::InvalidInput(format!(
            "a second rebuild rewrote {} snapshots",
            second.rebuilt
        )));
    }
    let floor_rate = ratio(n as f64, read_secs);
    Ok(Measured {
        rate: first.sessions_per_sec,
        json: json!({
            "database": bdb.label,
            "version": bdb.version,
            "sessions": n,
            "events": first.events,
            "rebuild_seconds": round(first.seconds, 3),
            "sessions_per_sec": round(first.sessions_per_sec, 0),
            "idempotent_pass_seconds": round(second.seconds, 3),
            "idempotent_sessions_per_sec": round(second.sessions_per_sec, 0),
            "read_only_seconds": round(read_secs, 3),
            "read_only_sessions_per_sec": round(floor_rate, 0),
            "ratio_to_read_only": round(ratio(first.sessions_per_sec, floor_rate), 3),
            "bulk_insert_seconds": round(insert_secs, 3),
        }),
    })
}

pub(super) async fn run(args: &BenchArgs, config: Config) -> Result<Report> {
    let n = args.sessions.unwrap_or(DEFAULT_SESSIONS);
    progress(Suite::Rebuild, format!("making the events of {n} sessions"));
    let rows = rows(n);
    let dbs = databases::open(args, Suite::Rebuild).await?;
    let mut results = Vec::new();
    let mut targets = Vec::new();
    let mut failed = None;
    for bdb in &dbs {
        match one(&config, bdb, &rows, n).await {
            Ok(m) => {
                if bdb.engine == databases::Engine::Postgres {
                    targets.push(target(
                        &format!("{}: snapshots rebuild >= 20000 sessions/s", bdb.label),
                        m.rate,
                        m.rate >= 20_000.0,
                    ));
                }
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
        "suite": "rebuild",
        "machine": machine,
        "sessions": n,
        "events": rows.len(),
        "page": PAGE,
        "results": results,
        "targets": targets,
    });
    let text = render(&json);
    Ok(Report { json, text })
}

fn render(j: &Value) -> String {
    let mut out = format!(
        "rebuild suite: {} sessions, {} events, pages of {}\n\n",
        j["sessions"], j["events"], j["page"]
    );
    out.push_str(&format!(
        "{:<10} {:>15} {:>9} {:>18} {:>15} {:>6}\n",
        "database", "rebuild sess/s", "seconds", "idempotent sess/s", "read-only s/s", "ratio"
    ));
    let n = |v: &Value| v.as_f64().unwrap_or(0.0);
    for r in j["results"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<10} {:>15.0} {:>9.3} {:>18.0} {:>15.0} {:>6.2}\n",
            r["database"].as_str().unwrap_or_default(),
            n(&r["sessions_per_sec"]),
            n(&r["rebuild_seconds"]),
            n(&r["idempotent_sessions_per_sec"]),
            n(&r["read_only_sessions_per_sec"]),
            n(&r["ratio_to_read_only"]),
        ));
    }
    out.push_str(
        "\nbaseline: one read of the event table in the same order and pages (the floor)\n\ntargets:\n",
    );
    out.push_str(&targets_text(
        j["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]),
    ));
    out
}
