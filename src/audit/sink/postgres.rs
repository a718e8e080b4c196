//! The sink's statements on PostgreSQL: one constant statement text per step,
//! every row passed as binary arrays and spread with `unnest`, each request
//! kept under [`REQUEST_BYTES`].
//!
//! # Why requests are kept under 16 KiB
//!
//! sqlx 0.9.0 no longer sets `TCP_NODELAY` on its TCP sockets (reported as
//! transact-rs/sqlx#4335; the fix, #4336, is not released). On its own that
//! costs nothing here: each request goes out in one `write`, and the server's
//! reply acknowledges it. But a PostgreSQL URL over TCP negotiates TLS unless
//! it says `sslmode=disable` (sqlx's default is `prefer`, and PostgreSQL
//! packages turn `ssl` on), and sqlx's rustls stream writes each TLS record
//! with its own `write`. A TLS record holds at most 16 KiB of plaintext, so a
//! larger request is two or more writes: the first goes out as a segment
//! smaller than the loopback MSS (64 KiB), and Nagle's algorithm holds the
//! next one until that segment is acknowledged, which the server, waiting
//! for the rest of the request, delays by its delayed-ACK timer: about 40 ms
//! on every request over 16 KiB. Measured with a client that speaks the
//! protocol like sqlx does (Nagle on, one `write` per TLS record): requests
//! of 16,000 bytes take 0.3 ms, of 16,500 to 64,000 bytes 41–48 ms every
//! time; without TLS, or with `TCP_NODELAY`, there is no stall at any size.
//! (BENCHMARKS.md, "Audit suite", has the numbers and the commands.)
//!
//! So on a connection that may use TLS, every statement here carries at most
//! [`REQUEST_BYTES`] of messages
//! (`Bind`, `Execute`, `Sync`; the statement text itself is sent once, when
//! sqlx prepares it, in a request of its own), estimated from the rows'
//! sizes in PostgreSQL's binary array format. A single row larger than that
//! (a session near `SESSION_MAX_BYTES`) still goes, alone, and pays the
//! stall once. Once a sqlx release sets `TCP_NODELAY` again the bound costs
//! only the extra round trips of smaller statements. A connection that cannot
//! use TLS (a Unix socket, or `sslmode=disable`) has no stall to avoid, and
//! its statements are bounded by [`PLAIN_REQUEST_BYTES`] only, so a batch is
//! one statement per step ([`request_bytes`]).
//!
//! # Inserting events: plain first
//!
//! `ON CONFLICT DO NOTHING` makes PostgreSQL insert speculatively, checking
//! every unique index before and after the row goes in: measured on the same
//! 100,000 rows, a plain `INSERT … SELECT` took 22–25 µs per row and the same
//! statement with `ON CONFLICT DO NOTHING` 31–39 µs. A batch of entries read
//! for the first time almost never holds an event already in the table, so
//! the sink first inserts it with a plain statement ([`Insert::Plain`]); a
//! unique violation (a redelivery, a seq conflict) rolls that transaction
//! back and the batch is written again with the checked statement
//! ([`Insert::Checked`]), which tells duplicates and conflicts apart.
//!
//! # Opening a transaction, taking turns per session
//!
//! Every transaction starts with [`open`]: it bounds how long the
//! transaction may sit idle (`idle_in_transaction_session_timeout`, so a
//! writer stopped inside it cannot hold its locks for ever) and, for a
//! fenced writer, reads its fencing token with `FOR SHARE`, which a
//! successor's bump waits for. Then [`lock_sessions`] locks the snapshot row
//! of every session of the batch, in session order, inserting a placeholder
//! (`seq` 0) where there is none: two writers of one session take turns, and
//! the second reads what the first committed. Placeholders are replaced by
//! the real snapshot or deleted ([`delete_snapshots`]) before the commit.
//!
//! Nullable text columns travel as text arrays whose empty strings become
//! `NULL` (`NULLIF`): sea-query binds arrays without null elements. An empty
//! `user_id`, `stream_id` or `traceparent` means "none" everywhere else too
//! (the stream codec reads an empty field as absent).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveEnum as _, ConnectionTrait, DatabaseConnection, DatabaseConnectionType, DbBackend,
    Statement, Value,
};
use uuid::Uuid;

use super::{Incoming, Loaded};
use crate::audit::entity::session_events;
use crate::audit::entity::session_snapshots::{self, SnapshotStatus};
use crate::error::{Error, Result};

/// The most bytes of protocol messages one statement may send: one TLS
/// record's plaintext (see the module docs).
pub(super) const REQUEST_BYTES: usize = 16 * 1024;

/// The most bytes one statement may send on a connection without TLS: enough
/// for a whole batch of events at the largest `AUDIT_BATCH_SIZE`, while
/// bounding what one request holds in memory.
pub(super) const PLAIN_REQUEST_BYTES: usize = 8 * 1024 * 1024;

/// The request bound for `db`: [`REQUEST_BYTES`] when its connections may
/// negotiate TLS over TCP, [`PLAIN_REQUEST_BYTES`] when they cannot.
pub(super) fn request_bytes(db: &DatabaseConnection) -> usize {
    use sea_orm::sqlx::postgres::PgSslMode;
    let DatabaseConnectionType::SqlxPostgresPoolConnection(_) = &db.inner else {
        return REQUEST_BYTES;
    };
    let options = db.get_postgres_connection_pool().connect_options();
    let unix = options.get_socket().is_some() || options.get_host().starts_with('/');
    if unix || matches!(options.get_ssl_mode(), PgSslMode::Disable) {
        PLAIN_REQUEST_BYTES
    } else {
        REQUEST_BYTES
    }
}

/// How [`insert_events`] treats rows whose `event_id` or `(session_id, seq)`
/// is already taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Insert {
    /// A plain `INSERT`: any such row fails the statement (and the
    /// transaction) with a unique violation.
    Plain,
    /// `ON CONFLICT DO NOTHING RETURNING event_id`: such rows are skipped and
    /// the inserted ones named.
    Checked,
}

/// True when `e` is the unique violation a plain insert fails with.
pub(super) fn is_unique_violation(e: &Error) -> bool {
    matches!(e, Error::Database(db)
        if matches!(db.sql_err(), Some(sea_orm::SqlErr::UniqueConstraintViolation(_))))
}

/// What a statement sends besides its rows, generously: the `Bind` header
/// (statement name, format codes, one array header of 20 bytes per
/// parameter), `Execute` and `Sync`.
const STATEMENT_OVERHEAD: usize = 640;

/// Bytes one text element takes in a binary array.
fn text(s: &str) -> usize {
    4 + s.len()
}

/// Bytes one fixed-size element (`uuid` 16, `int8` 8, `timestamptz` 8,
/// `int4` 4, `bool` 1) takes in a binary array.
const fn fixed(n: usize) -> usize {
    4 + n
}

/// Splits `items` into runs whose estimated size stays within `bound` bytes;
/// a run holds at least one item.
pub(super) fn chunks_by_bytes<T>(
    items: &[T],
    bound: usize,
    size: impl Fn(&T) -> usize,
) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = STATEMENT_OVERHEAD;
    for (k, item) in items.iter().enumerate() {
        let n = size(item);
        if k > start && bytes + n > bound {
            out.push(&items[start..k]);
            start = k;
            bytes = STATEMENT_OVERHEAD;
        }
        bytes += n;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// Estimated bytes of one event row, with its payload's JSON, in
/// [`insert_events`].
fn event_bytes(i: &Incoming, payload: &str) -> usize {
    let e = &i.event;
    fixed(16)
        + text(e.session_id.as_str())
        + fixed(8)
        + text(e.kind.type_name())
        + text(e.user_id.as_deref().unwrap_or_default())
        + fixed(8)
        + text(i.stream_id.as_deref().unwrap_or_default())
        + fixed(4)
        + text(payload)
        + text(e.traceparent.as_deref().unwrap_or_default())
}

const INSERT_EVENTS_HEAD: &str = r#"INSERT INTO "session_events" ("event_id", "session_id", "seq", "event_type", "user_id", "occurred_at", "recorded_at", "stream_id", "schema_version", "payload", "traceparent", "source")
SELECT e.event_id, e.session_id, e.seq, e.event_type, NULLIF(e.user_id, ''), e.occurred_at, $1,
       NULLIF(e.stream_id, ''), e.schema_version, e.payload, NULLIF(e.traceparent, ''),
       CASE WHEN e.stream_id = '' THEN 'fallback' ELSE 'stream' END
FROM unnest($2::uuid[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::timestamptz[],
            $8::text[], $9::int4[], $10::text[], $11::text[])
     AS e(event_id, session_id, seq, event_type, user_id, occurred_at, stream_id,
          schema_version, payload, traceparent)"#;

/// The event insert's statement text.
fn insert_events_sql(insert: Insert) -> String {
    match insert {
        Insert::Plain => INSERT_EVENTS_HEAD.to_owned(),
        Insert::Checked => {
            format!("{INSERT_EVENTS_HEAD}\nON CONFLICT DO NOTHING\nRETURNING \"event_id\"")
        }
    }
}

/// The statements that insert `batch` (distinct event ids): one per run of
/// rows under `bound` bytes. Pure work on the client, so it can run while the
/// database does something else.
pub(super) fn event_statements(
    batch: &[&Incoming],
    recorded_at: DateTime<Utc>,
    bound: usize,
    insert: Insert,
) -> Vec<Statement> {
    let rows: Vec<(&Incoming, String)> = batch
        .iter()
        .map(|i| (*i, i.event.kind.payload_json()))
        .collect();
    let sql = insert_events_sql(insert);
    let lens: Vec<usize> = chunks_by_bytes(&rows, bound, |(i, payload)| event_bytes(i, payload))
        .iter()
        .map(|c| c.len())
        .collect();
    // Each chunk takes its rows' payloads over instead of copying them.
    let mut rows = rows.into_iter();
    let mut out = Vec::with_capacity(lens.len());
    for n in lens {
        let mut event_id = Vec::with_capacity(n);
        let mut session_id = Vec::with_capacity(n);
        let mut seq = Vec::with_capacity(n);
        let mut event_type = Vec::with_capacity(n);
        let mut user_id = Vec::with_capacity(n);
        let mut occurred_at = Vec::with_capacity(n);
        let mut stream_id = Vec::with_capacity(n);
        let mut schema_version = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut traceparent = Vec::with_capacity(n);
        for (i, payload) in rows.by_ref().take(n) {
            let e = &i.event;
            event_id.push(e.event_id);
            session_id.push(e.session_id.to_string());
            seq.push(e.seq as i64);
            event_type.push(e.kind.type_name().to_owned());
            user_id.push(e.user_id.clone().unwrap_or_default());
            occurred_at.push(e.occurred_at.datetime());
            stream_id.push(i.stream_id.clone().unwrap_or_default());
            schema_version.push(e.schema as i32);
            payloads.push(payload);
            traceparent.push(e.traceparent.clone().unwrap_or_default());
        }
        let values: Vec<Value> = vec![
            recorded_at.into(),
            event_id.into(),
            session_id.into(),
            seq.into(),
            event_type.into(),
            user_id.into(),
            occurred_at.into(),
            stream_id.into(),
            schema_version.into(),
            payloads.into(),
            traceparent.into(),
        ];
        out.push(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql.as_str(),
            values,
        ));
    }
    out
}

/// Runs [`event_statements`] made with [`Insert::Plain`] and returns the rows
/// inserted (all of them: a row already taken fails the statement with a
/// unique violation).
pub(super) async fn insert_plain(
    txn: &impl ConnectionTrait,
    statements: Vec<Statement>,
) -> Result<u64> {
    let mut inserted = 0;
    for stmt in statements {
        inserted += txn.execute_raw(stmt).await?.rows_affected();
    }
    Ok(inserted)
}

/// Runs [`event_statements`] made with [`Insert::Checked`] and returns the
/// event ids inserted; rows whose `event_id` or `(session_id, seq)` is taken
/// are skipped.
pub(super) async fn insert_checked(
    txn: &impl ConnectionTrait,
    statements: Vec<Statement>,
) -> Result<HashSet<Uuid>> {
    let mut inserted = HashSet::new();
    for stmt in statements {
        for row in txn.query_all_raw(stmt).await? {
            inserted.insert(row.try_get_by_index::<Uuid>(0)?);
        }
    }
    Ok(inserted)
}

const STORED_EVENTS: &str = r#"SELECT * FROM "session_events" WHERE "event_id" = ANY($1::uuid[])"#;

/// The rows the table holds under the event ids `ids` (those a checked
/// insert skipped: redeliveries, or conflicts to tell apart from them).
pub(super) async fn stored_events(
    txn: &impl ConnectionTrait,
    ids: &[Uuid],
    bound: usize,
) -> Result<HashMap<Uuid, session_events::Model>> {
    use sea_orm::EntityTrait as _;
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in chunks_by_bytes(ids, bound, |_| fixed(16)) {
        let stmt = Statement::from_sql_and_values(
            DbBackend::Postgres,
            STORED_EVENTS,
            [Value::from(chunk.to_vec())],
        );
        let rows = session_events::Entity::find()
            .from_raw_sql(stmt)
            .all(txn)
            .await?;
        out.extend(rows.into_iter().map(|r| (r.event_id, r)));
    }
    Ok(out)
}

/// Each session's snapshot (if any) and the newest `seq` the table holds for
/// it, in one statement per chunk of sessions. The newest `seq` is one
/// backward probe of the unique `(session_id, seq)` index per session, so
/// the plan does not depend on the table's statistics (a `WHERE session_id
/// IN (…) GROUP BY session_id` is a sequential scan of the whole table until
/// the first `ANALYZE`).
const LOAD_SESSIONS: &str = r#"SELECT s.id, p."user_id", p."state", p."seq", p."status", p."expires_at", p."updated_at",
       (SELECT max(e."seq") FROM "session_events" e WHERE e."session_id" = s.id) AS newest
FROM unnest($1::text[]) AS s(id)
LEFT JOIN "session_snapshots" p ON p."session_id" = s.id"#;

/// Snapshots, and the newest `seq` in the table, of the sessions `ids`. A
/// snapshot row that cannot be read (an unknown status) is returned as
/// `Err(why)`, to be rebuilt from the events; a placeholder row of this
/// transaction ([`lock_sessions`]) is no snapshot.
pub(super) async fn load_sessions(
    txn: &impl ConnectionTrait,
    ids: &[&str],
    bound: usize,
) -> Result<(HashMap<String, Loaded>, HashMap<String, i64>)> {
    let mut snapshots = HashMap::with_capacity(ids.len());
    let mut newest = HashMap::with_capacity(ids.len());
    for chunk in chunks_by_bytes(ids, bound, |s| text(s)) {
        let arg: Vec<String> = chunk.iter().map(|s| (*s).to_owned()).collect();
        let stmt = Statement::from_sql_and_values(DbBackend::Postgres, LOAD_SESSIONS, [arg.into()]);
        for row in txn.query_all_raw(stmt).await? {
            let id: String = row.try_get_by_index(0)?;
            if let Some(n) = row.try_get_by_index::<Option<i64>>(7)? {
                newest.insert(id.clone(), n);
            }
            let Some(state) = row.try_get_by_index::<Option<String>>(2)? else {
                continue;
            };
            let seq: i64 = row.try_get_by_index(3)?;
            if seq == PLACEHOLDER_SEQ {
                continue;
            }
            let status: String = row.try_get_by_index(4)?;
            let loaded = match SnapshotStatus::try_from_value(&status) {
                Ok(status) => Ok(session_snapshots::Model {
                    session_id: id.clone(),
                    user_id: row.try_get_by_index(1)?,
                    state,
                    seq,
                    status,
                    expires_at: row.try_get_by_index(5)?,
                    updated_at: row.try_get_by_index(6)?,
                }),
                Err(e) => Err(format!("status {status:?}: {e}")),
            };
            snapshots.insert(id, loaded);
        }
    }
    Ok((snapshots, newest))
}

/// The `seq` of a placeholder snapshot row: real snapshots start at 1.
pub(super) const PLACEHOLDER_SEQ: i64 = 0;

/// Locks the snapshot row of every session `ids` (sorted), inserting a
/// placeholder row (`seq` 0, never committed) for sessions without one, so
/// that two transactions that fold the same session take turns: the second
/// waits here until the first commits, then reads what it committed. Rows
/// are locked in `ids` order, so two transactions never wait for each other
/// in a cycle. Returns the sessions that got a placeholder.
const LOCK_SESSIONS: &str = r#"INSERT INTO "session_snapshots" ("session_id", "user_id", "state", "seq", "status", "expires_at", "updated_at")
SELECT s.id, NULL, '', 0, 'live', NULL, $1 FROM unnest($2::text[]) AS s(id) ORDER BY s.id
ON CONFLICT ("session_id") DO UPDATE SET "seq" = "session_snapshots"."seq"
RETURNING "session_id", ("xmax" = 0) AS "inserted""#;

/// See [`LOCK_SESSIONS`].
pub(super) async fn lock_sessions(
    txn: &impl ConnectionTrait,
    ids: &[&str],
    now: DateTime<Utc>,
    bound: usize,
) -> Result<HashSet<String>> {
    let mut placeholders = HashSet::new();
    for chunk in chunks_by_bytes(ids, bound, |s| text(s)) {
        let arg: Vec<String> = chunk.iter().map(|s| (*s).to_owned()).collect();
        let stmt = Statement::from_sql_and_values(
            DbBackend::Postgres,
            LOCK_SESSIONS,
            [now.into(), arg.into()],
        );
        for row in txn.query_all_raw(stmt).await? {
            if row.try_get_by_index::<bool>(1)? {
                placeholders.insert(row.try_get_by_index::<String>(0)?);
            }
        }
    }
    Ok(placeholders)
}

const DELETE_SNAPSHOTS: &str =
    r#"DELETE FROM "session_snapshots" WHERE "session_id" = ANY($1::text[]) AND "seq" <= $2"#;

/// Deletes the snapshot rows of `ids` whose `seq` is at most `max_seq`:
/// placeholders left over (`max_seq` 0), or unreadable snapshots about to be
/// rebuilt (`max_seq` [`i64::MAX`]).
pub(super) async fn delete_snapshots(
    txn: &impl ConnectionTrait,
    ids: &[String],
    max_seq: i64,
    bound: usize,
) -> Result<()> {
    for chunk in chunks_by_bytes(ids, bound, |s| text(s)) {
        let stmt = Statement::from_sql_and_values(
            DbBackend::Postgres,
            DELETE_SNAPSHOTS,
            [chunk.to_vec().into(), max_seq.into()],
        );
        txn.execute_raw(stmt).await?;
    }
    Ok(())
}

/// Opens a transaction of the sink: bounds how long it may sit idle (a
/// process stopped inside it must not hold its locks for ever), and, for a
/// fenced writer, reads the fencing token of `(stream, role)` with a share
/// lock that a successor's bump waits for. Returns the token (`None` when
/// unfenced, or when there is no token).
pub(super) async fn open(
    txn: &impl ConnectionTrait,
    idle_timeout_ms: u128,
    fence: Option<(&str, &str)>,
) -> Result<Option<i64>> {
    let timeout = format!("{}ms", idle_timeout_ms.max(1));
    let stmt = match fence {
        Some((stream, role)) => Statement::from_sql_and_values(
            DbBackend::Postgres,
            r#"SELECT set_config('idle_in_transaction_session_timeout', $1, true),
       (SELECT "token" FROM "lease_fences" WHERE "stream" = $2 AND "role" = $3 FOR SHARE)"#,
            [timeout.into(), stream.into(), role.into()],
        ),
        None => Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT set_config('idle_in_transaction_session_timeout', $1, true), NULL::int8",
            [timeout.into()],
        ),
    };
    let row = txn.query_one_raw(stmt).await?;
    Ok(match row {
        Some(r) => r.try_get_by_index::<Option<i64>>(1)?,
        None => None,
    })
}

/// Estimated bytes of one snapshot row in [`upsert_snapshots`].
fn snapshot_bytes(m: &session_snapshots::Model) -> usize {
    text(&m.session_id)
        + text(m.user_id.as_deref().unwrap_or_default())
        + text(&m.state)
        + fixed(8)
        + text("destroyed")
        + fixed(8)
        + fixed(1)
}

const UPSERT_SNAPSHOTS: &str = r#"INSERT INTO "session_snapshots" ("session_id", "user_id", "state", "seq", "status", "expires_at", "updated_at")
SELECT s.session_id, NULLIF(s.user_id, ''), s.state, s.seq, s.status,
       CASE WHEN s.has_expiry THEN s.expires_at END, $1
FROM unnest($2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::timestamptz[], $8::bool[])
     AS s(session_id, user_id, state, seq, status, expires_at, has_expiry)
ON CONFLICT ("session_id") DO UPDATE SET
    "user_id" = "excluded"."user_id", "state" = "excluded"."state", "seq" = "excluded"."seq",
    "status" = "excluded"."status", "expires_at" = "excluded"."expires_at",
    "updated_at" = "excluded"."updated_at"
WHERE "session_snapshots"."seq" < "excluded"."seq""#;

/// Inserts the snapshots, or moves stored ones forward when the new `seq` is
/// higher. `rows` holds each session once.
pub(super) async fn upsert_snapshots(
    txn: &impl ConnectionTrait,
    rows: &[session_snapshots::Model],
    updated_at: DateTime<Utc>,
    bound: usize,
) -> Result<()> {
    for chunk in chunks_by_bytes(rows, bound, snapshot_bytes) {
        let n = chunk.len();
        let mut session_id = Vec::with_capacity(n);
        let mut user_id = Vec::with_capacity(n);
        let mut state = Vec::with_capacity(n);
        let mut seq = Vec::with_capacity(n);
        let mut status = Vec::with_capacity(n);
        let mut expires_at = Vec::with_capacity(n);
        let mut has_expiry = Vec::with_capacity(n);
        for m in chunk {
            session_id.push(m.session_id.clone());
            user_id.push(m.user_id.clone().unwrap_or_default());
            state.push(m.state.clone());
            seq.push(m.seq);
            status.push(m.status.to_value());
            expires_at.push(m.expires_at.unwrap_or(updated_at));
            has_expiry.push(m.expires_at.is_some());
        }
        let values: Vec<Value> = vec![
            updated_at.into(),
            session_id.into(),
            user_id.into(),
            state.into(),
            seq.into(),
            status.into(),
            expires_at.into(),
            has_expiry.into(),
        ];
        let stmt = Statement::from_sql_and_values(DbBackend::Postgres, UPSERT_SNAPSHOTS, values);
        txn.execute_raw(stmt).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_stay_under_the_bound_and_keep_every_item() {
        let sizes: Vec<usize> = (0..500).map(|k| 100 + (k * 37) % 900).collect();
        let chunks = chunks_by_bytes(&sizes, REQUEST_BYTES, |n| *n);
        assert!(chunks.len() > 1);
        for c in &chunks {
            let bytes: usize = STATEMENT_OVERHEAD + c.iter().sum::<usize>();
            assert!(bytes <= REQUEST_BYTES, "{bytes} bytes in one statement");
        }
        let flat: Vec<usize> = chunks.concat();
        assert_eq!(flat, sizes);
    }

    #[test]
    fn an_item_over_the_bound_goes_alone() {
        let sizes = [10, REQUEST_BYTES * 2, 10, 10];
        let chunks = chunks_by_bytes(&sizes, REQUEST_BYTES, |n| *n);
        assert_eq!(chunks, vec![&sizes[..1], &sizes[1..2], &sizes[2..]]);
        assert!(chunks_by_bytes(&[] as &[usize], REQUEST_BYTES, |n| *n).is_empty());
    }
}
