//! Moving the Vedfolnir application's sessions over without logging anyone
//! out (`vedfolnir-sessions import-legacy`).
//!
//! The application's previous store kept each session as one key,
//! `<REDIS_SESSION_PREFIX><uuid4>`, holding the session's JSON with a TTL;
//! the browser's cookie holds the UUID. For each such key, [`import_legacy`]:
//!
//! 1. reads the JSON and the remaining TTL;
//! 2. creates the event-sourced session whose token is the UUID text (its
//!    id is `hex(SHA-256(uuid))`, see [`Token::legacy`]), with the JSON's
//!    fields and the same remaining lifetime: one `created` event whose
//!    payload carries `"imported": {"format": "legacy", "created_at": …}`;
//! 3. removes the raw-UUID key (only if it still holds what was read), so no
//!    bearer secret stays at rest in Redis.
//!
//! It is idempotent and resumable: the keys are found with `SCAN` each run,
//! a key already imported is only removed (the `created` event is not
//! written twice), and an interrupted run is finished by running it again.
//! The old application should be stopped while it runs: a write it makes to
//! a raw key after that key was imported is not carried over (the key is
//! then left in place and counted as `changed_meanwhile`).

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::event::Import;
use crate::id::Token;
use crate::session::RESERVED_KEYS;
use crate::store::{Imported, SessionStore};

/// Keys handled at once.
const CONCURRENCY: usize = 32;

/// Removes a key only while it holds the value that was imported:
/// 1 removed, 0 already gone, -1 changed since it was read.
const DELETE_IF_SAME: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if v == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return -1
";

/// What one run did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct LegacySummary {
    /// Keys of the legacy form found.
    pub found: u64,
    /// Sessions created (or that would be).
    pub imported: u64,
    /// Keys whose session had been imported by an earlier run: only the
    /// raw key was removed.
    pub already_imported: u64,
    /// Keys that expired between the scan and their import.
    pub expired_meanwhile: u64,
    /// Keys whose value is not a session (not a JSON object, or fields the
    /// store refuses); left in place.
    pub invalid: u64,
    /// Keys the old application changed while they were imported; left in
    /// place (the session was imported with what was read).
    pub changed_meanwhile: u64,
    /// Nothing was written.
    pub dry_run: bool,
    /// Wall time of the run.
    pub seconds: f64,
    /// Keys handled per second.
    pub rate: f64,
}

/// The fate of one key.
enum Outcome {
    Imported,
    AlreadyImported,
    Expired,
    Invalid,
    Changed,
}

/// The `SCAN` pattern of the legacy keys: the session prefix (glob
/// characters escaped) and a hyphenated UUID of version 4.
pub fn pattern(session_prefix: &str) -> String {
    let mut p = String::with_capacity(session_prefix.len() + 40);
    for c in session_prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push_str("????????-????-4???-????-????????????");
    p
}

/// The session fields of a legacy session's JSON, and its `created_at`.
/// `None` when the value is not a JSON object.
pub fn legacy_fields(json: &str) -> Option<(Map<String, Value>, Option<String>)> {
    let Ok(Value::Object(mut fields)) = serde_json::from_str::<Value>(json) else {
        return None;
    };
    let created_at = match fields.get("created_at") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    fields.retain(|k, _| !RESERVED_KEYS.contains(&k.as_str()));
    Some((fields, created_at))
}

/// Imports every legacy session of the store's namespace. `progress` is
/// called with (keys done, keys found) as the run goes.
pub async fn import_legacy(
    store: &SessionStore,
    dry_run: bool,
    mut progress: impl FnMut(u64, u64),
) -> Result<LegacySummary> {
    let started = Instant::now();
    let prefix = store.config().session_prefix.clone();
    let keys = store.connection().scan_all(&pattern(&prefix)).await?;
    let total = keys.len() as u64;
    let mut summary = LegacySummary {
        found: total,
        dry_run,
        ..LegacySummary::default()
    };
    progress(0, total);
    let mut results = futures_util::stream::iter(keys.into_iter().map(|key| {
        let prefix = prefix.as_str();
        async move { import_one(store, prefix, &key, dry_run).await }
    }))
    .buffer_unordered(CONCURRENCY);
    let mut done = 0u64;
    while let Some(outcome) = results.next().await {
        match outcome? {
            Outcome::Imported => summary.imported += 1,
            Outcome::AlreadyImported => summary.already_imported += 1,
            Outcome::Expired => summary.expired_meanwhile += 1,
            Outcome::Invalid => summary.invalid += 1,
            Outcome::Changed => summary.changed_meanwhile += 1,
        }
        done += 1;
        progress(done, total);
    }
    summary.seconds = started.elapsed().as_secs_f64();
    summary.rate = if summary.seconds > 0.0 {
        total as f64 / summary.seconds
    } else {
        0.0
    };
    Ok(summary)
}

async fn import_one(
    store: &SessionStore,
    prefix: &str,
    key: &str,
    dry_run: bool,
) -> Result<Outcome> {
    let Some(token) = key
        .strip_prefix(prefix)
        .and_then(|uuid| Token::legacy(uuid).ok())
    else {
        // The pattern matched, but it is not a lowercase UUID of version 4.
        return Ok(Outcome::Invalid);
    };
    let mut conn = store.connection();
    let (json, pttl): (Option<String>, i64) = redis::pipe()
        .get(key)
        .pttl(key)
        .query_async(&mut conn)
        .await?;
    let Some(json) = json else {
        return Ok(Outcome::Expired);
    };
    let ttl = match pttl {
        // No TTL: a session of the configured lifetime.
        -1 => store.config().session_timeout,
        ms if ms > 0 => Duration::from_millis(ms as u64),
        _ => return Ok(Outcome::Expired),
    };
    let Some((fields, created_at)) = legacy_fields(&json) else {
        tracing::warn!(session_id = %token.session_id(), "legacy key does not hold a JSON object; left in place");
        return Ok(Outcome::Invalid);
    };
    if let Err(e) = crate::session::check_fields(&fields) {
        tracing::warn!(session_id = %token.session_id(), err = %e, "legacy session refused; left in place");
        return Ok(Outcome::Invalid);
    }
    if dry_run {
        let id = token.session_id();
        let exists: u64 = redis::cmd("EXISTS")
            .arg(store.keys().session(&id))
            .query_async(&mut conn)
            .await?;
        let ledger: u64 = redis::cmd("EXISTS")
            .arg(store.keys().ledger(&id))
            .query_async(&mut conn)
            .await?;
        return Ok(if exists + ledger > 0 {
            Outcome::AlreadyImported
        } else {
            Outcome::Imported
        });
    }
    let import = Import {
        created_at,
        format: "legacy".to_owned(),
    };
    let outcome = match store.import(&token, fields, ttl, import).await {
        Ok(Imported::Created(_)) => Outcome::Imported,
        Ok(Imported::Exists) => Outcome::AlreadyImported,
        Err(e @ (Error::InvalidInput(_) | Error::TooLarge { .. })) => {
            tracing::warn!(session_id = %token.session_id(), err = %e, "legacy session refused; left in place");
            return Ok(Outcome::Invalid);
        }
        Err(e) => return Err(e),
    };
    let removed: i64 = redis::Script::new(DELETE_IF_SAME)
        .key(key)
        .arg(&json)
        .invoke_async(&mut conn)
        .await?;
    Ok(match removed {
        -1 => {
            tracing::warn!(session_id = %token.session_id(), "legacy key changed while it was imported; left in place");
            Outcome::Changed
        }
        _ => outcome,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_escapes_the_prefix() {
        assert_eq!(
            pattern("vedfolnir:session:"),
            "vedfolnir:session:????????-????-4???-????-????????????"
        );
        assert_eq!(
            pattern("a*[b]:"),
            "a\\*\\[b\\]:????????-????-4???-????-????????????"
        );
    }

    #[test]
    fn legacy_json_keeps_the_application_fields() {
        let (fields, created) = legacy_fields(
            r#"{"user_id":1,"username":"admin","csrf_token":"abc","created_at":"2025-08-20T16:38:25.802836+00:00","last_activity":"x","_last_updated":"y"}"#,
        )
        .expect("an object");
        assert_eq!(created.as_deref(), Some("2025-08-20T16:38:25.802836+00:00"));
        let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
        assert_eq!(keys, ["csrf_token", "user_id", "username"]);
        assert!(legacy_fields("[1]").is_none());
        assert!(legacy_fields("not json").is_none());
    }
}
