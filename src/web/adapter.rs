//! A `tower_sessions::SessionStore` over the event-sourced store, so an
//! existing tower-sessions application switches with one line:
//!
//! ```no_run
//! use tower_sessions::SessionManagerLayer;
//! use vedfolnir_sessions::web::TowerSessionsStore;
//! use vedfolnir_sessions::{Config, SessionStore};
//!
//! # async fn run() -> anyhow::Result<()> {
//! let store = SessionStore::connect(&Config::from_env()?).await?;
//! let layer = SessionManagerLayer::new(TowerSessionsStore::new(store));
//! # Ok(()) }
//! ```
//!
//! # Ids
//!
//! tower-sessions owns its cookie value: a 128-bit random [`Id`] (an `i128`
//! from a CSPRNG, 22 base64url characters in the cookie), which it generates
//! itself. The event-sourced store generates its own 256-bit token and keys
//! the session by `hex(SHA-256(token))`, and offers no way to create a
//! session under a token chosen by the caller. The adapter therefore keeps an
//! alias key per tower-sessions id:
//!
//! `<ns>tower:<hex(SHA-256(id as text))>` → `<session id> <record expiry, ms>`,
//! living as long as the session plus `SESSION_TOMBSTONE_TTL`, set again
//! whenever the session's own TTL changes.
//!
//! Like every key of the store it holds only a hash of the bearer value, so
//! a copy of Redis still lets no one present a valid cookie. The store's own
//! token is never used (nobody holds it). The bearer strength is
//! tower-sessions' 128 bits: the floor the design allows, below the 256 bits
//! of the native [`SessionLayer`](super::SessionLayer).
//!
//! # Expiry
//!
//! The Redis TTL follows the record's `expiry_date`, which tower-sessions
//! computes from the layer's [`Expiry`](tower_sessions::Expiry) on every
//! save, so the cookie and the store agree:
//!
//! - `Expiry::OnInactivity(d)`: the session ends `d` after the last save.
//!   tower-sessions saves a session when a request changed it (or on every
//!   request with `with_always_save(true)`), and only then sends the cookie
//!   again: a request that only reads extends neither.
//! - `Expiry::AtDateTime(t)`: the session ends at `t`, however it is used.
//! - `Expiry::OnSessionEnd` (a browser-session cookie, and tower-sessions'
//!   default): tower-sessions gives the record an expiry two weeks ahead,
//!   which is past `REDIS_SESSION_TIMEOUT`: the store's idle timeout
//!   governs, and reads slide it as [`SessionStore::load`] does (one
//!   `touched` event per `SESSION_TOUCH_INTERVAL` at most).
//!
//! A TTL is at most `REDIS_SESSION_TIMEOUT` (see
//! [`SessionStore::create_with_ttl`] for why): a record whose expiry is
//! further ahead lives in Redis as long as it is used within the timeout,
//! sliding with each read, never past its expiry. An expiry in the past
//! ends the session at once (an `expired` event).
//!
//! # Saves
//!
//! tower-sessions saves whole records. A loaded record carries, under the key
//! [`BASE_KEY`], the version and the fields it was loaded with; a save
//! appends one `updated` event with the keys the request changed relative to
//! that base (nothing when none), so concurrent requests that change
//! different keys all survive. A key the request changed that a concurrent
//! request changed too is refused (the save fails, and tower-sessions
//! answers 500) instead of being overwritten with a value computed from a
//! stale read: tower-sessions does not say which keys a handler read, so
//! every changed key is treated as read. For counters use
//! [`SessionStore::increment`] directly, which never conflicts. Keys the
//! store maintains (`_version`, `created_at`, `last_activity`,
//! `_last_updated`) cannot be saved and are left out of loaded records. A
//! save that changes no key but moves the expiry (`set_expiry`, or
//! `always_save` with `OnInactivity`) writes one `touched` event when the
//! deadline comes earlier, or later by at least a touch interval, and
//! nothing otherwise.
//!
//! The cookie is tower-sessions' own: its name (`id`), attributes and
//! `Max-Age` come from the `SessionManagerLayer`, and the `SESSION_COOKIE_*`
//! variables do not apply.
//!
//! # Ends
//!
//! `delete` destroys the session with reason `logout` (configurable with
//! [`TowerSessionsStore::with_delete_reason`]) and tombstones it: a save
//! still in flight for that id fails instead of bringing it back.
//! tower-sessions' `cycle_id` reaches a store as `delete` followed by
//! `create`, so in the log it reads as a `destroyed` and an unrelated
//! `created`, not as one rotation.

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands as _;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tower_sessions::session::{Id, Record};
use tower_sessions::session_store;

use super::handle::diff;
use crate::error::Error;
use crate::event::DestroyReason;
use crate::id::SessionId;
use crate::session::Changes;
use crate::session::{NewSession, RESERVED_KEYS, Session as Stored};
use crate::store::SessionStore;

/// The tower-sessions backend over [`SessionStore`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TowerSessionsStore {
    store: SessionStore,
    alias_prefix: String,
    delete_reason: DestroyReason,
}

/// What an alias key says.
struct Alias {
    session_id: SessionId,
    /// The record's expiry at its last save (ms); `None` in an alias written
    /// before the adapter kept it (the store's idle timeout governs).
    expiry_ms: Option<i64>,
    /// When the session's key runs out (ms, this process's clock), from the
    /// alias's own remaining life.
    deadline_ms: i64,
}

impl TowerSessionsStore {
    /// The adapter over `store`. Alias keys go to `<ns>tower:`.
    pub fn new(store: SessionStore) -> Self {
        let alias_prefix = format!("{}tower:", store.keys().namespace());
        TowerSessionsStore {
            store,
            alias_prefix,
            delete_reason: DestroyReason::Logout,
        }
    }

    /// Builder: the reason recorded when tower-sessions deletes a session
    /// (default `logout`).
    pub fn with_delete_reason(mut self, reason: DestroyReason) -> Self {
        self.delete_reason = reason;
        self
    }

    /// The event-sourced store behind the adapter.
    pub fn store(&self) -> &SessionStore {
        &self.store
    }

    /// The alias key of a tower-sessions id.
    pub fn alias_key(&self, id: &Id) -> String {
        let digest = Sha256::digest(id.to_string().as_bytes());
        format!("{}{}", self.alias_prefix, hex::encode(digest))
    }

    /// The store's session id behind a tower-sessions id, if the alias is
    /// still there.
    pub async fn resolve(&self, id: &Id) -> Result<Option<SessionId>, Error> {
        Ok(self.alias(id).await?.map(|a| a.session_id))
    }

    /// The alias of a tower-sessions id, with its remaining life: one round
    /// trip.
    async fn alias(&self, id: &Id) -> Result<Option<Alias>, Error> {
        let key = self.alias_key(id);
        let (value, pttl): (Option<String>, i64) = redis::pipe()
            .get(&key)
            .pttl(&key)
            .query_async(&mut self.store.connection())
            .await?;
        let Some(value) = value else {
            return Ok(None);
        };
        let mut parts = value.split(' ');
        let Some(session_id) = parts.next().and_then(|s| s.parse().ok()) else {
            return Ok(None);
        };
        let expiry_ms = parts.next().and_then(|e| e.parse().ok());
        let deadline_ms = now_ms() + pttl.max(0) - self.tomb_ms();
        Ok(Some(Alias {
            session_id,
            expiry_ms,
            deadline_ms,
        }))
    }

    /// Writes the alias of a session that lives `ttl_ms` more (`NX` for a
    /// new one, else only while it exists).
    async fn set_alias(
        &self,
        id: &Id,
        session_id: &SessionId,
        expiry_ms: i64,
        ttl_ms: i64,
        new: bool,
    ) -> Result<bool, Error> {
        let set: Option<String> = redis::cmd("SET")
            .arg(self.alias_key(id))
            .arg(format!("{session_id} {expiry_ms}"))
            .arg(if new { "NX" } else { "XX" })
            .arg("PX")
            .arg(ttl_ms + self.tomb_ms())
            .query_async(&mut self.store.connection())
            .await?;
        Ok(set.is_some())
    }

    fn timeout_ms(&self) -> i64 {
        self.store.config().session_timeout.as_millis() as i64
    }

    fn tomb_ms(&self) -> i64 {
        self.store.config().tombstone_ttl.as_millis() as i64
    }

    fn interval_ms(&self) -> i64 {
        self.store.config().touch_interval.as_millis() as i64
    }

    /// The TTL a session with this expiry gets now: up to the expiry, at
    /// most the store's timeout, at least 1 ms.
    fn ttl_ms(&self, expiry_ms: i64, now: i64) -> i64 {
        expiry_ms.saturating_sub(now).clamp(1, self.timeout_ms())
    }
}

/// The record key that carries the state a record was loaded with:
/// `{"v": <_version>, "data": {<every field>}}`. It never reaches the store.
pub const BASE_KEY: &str = "__vedfolnir_base";

fn backend(e: Error) -> session_store::Error {
    session_store::Error::Backend(e.to_string())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn expiry_ms(record: &Record) -> i64 {
    let ms = record.expiry_date.unix_timestamp_nanos() / 1_000_000;
    i64::try_from(ms).unwrap_or(if ms < 0 { i64::MIN } else { i64::MAX })
}

fn date_of(ms: i64) -> cookie::time::OffsetDateTime {
    cookie::time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or_else(|_| cookie::time::OffsetDateTime::now_utc())
}

fn fields_of(record: &Record) -> session_store::Result<Map<String, Value>> {
    if let Some(k) = record
        .data
        .keys()
        .find(|k| RESERVED_KEYS.contains(&k.as_str()))
    {
        return Err(session_store::Error::Encode(format!(
            "`{k}` is maintained by the session store"
        )));
    }
    Ok(record
        .data
        .iter()
        .filter(|(k, _)| k.as_str() != BASE_KEY)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect())
}

/// The base a loaded record carries.
fn base_of(record: &Record) -> Option<Stored> {
    let base = record.data.get(BASE_KEY)?;
    let version = base.get("v")?.as_u64()?;
    let data = base.get("data")?.as_object()?.clone();
    Some(Stored::from_parts(data, version))
}

fn millis(ms: i64) -> Duration {
    Duration::from_millis(ms.max(1) as u64)
}

#[async_trait::async_trait]
impl tower_sessions::SessionStore for TowerSessionsStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let fields = fields_of(record)?;
        let expiry = expiry_ms(record);
        let ttl = self.ttl_ms(expiry, now_ms());
        let created = self
            .store
            .create_with_ttl(NewSession { fields }, millis(ttl))
            .await
            .map_err(backend)?;
        // A collision of 128-bit random ids does not happen in practice; the
        // bound only keeps a broken RNG from looping forever.
        for _ in 0..8 {
            if self
                .set_alias(&record.id, &created.session_id, expiry, ttl, true)
                .await
                .map_err(backend)?
            {
                tracing::debug!(session_id = %created.session_id, "tower-sessions session created");
                return Ok(());
            }
            record.id = Id::default();
        }
        Err(session_store::Error::Backend(
            "could not allocate a session id".to_owned(),
        ))
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        let fields = fields_of(record)?;
        let Some(alias) = self.alias(&record.id).await.map_err(backend)? else {
            return Err(session_store::Error::Backend(
                "session not found".to_owned(),
            ));
        };
        let sid = alias.session_id;
        let now = now_ms();
        let expiry = expiry_ms(record);
        let ttl = self.ttl_ms(expiry, now);
        let base = match base_of(record) {
            Some(b) => b,
            // A record that was not loaded through this adapter: compare
            // with the stored session.
            None => match self.store.get(&sid).await.map_err(backend)? {
                Some(current) => current,
                None => {
                    return Err(session_store::Error::Backend(format!(
                        "session {sid} has ended"
                    )));
                }
            },
        };
        let mut changes: Changes = diff(base.data(), &fields);
        if changes.is_empty() {
            // Only the expiry may have moved: write when the deadline comes
            // earlier, or later by a touch interval (sliding expiry writes
            // at most once per interval).
            let wanted = now + ttl;
            let earlier = wanted < alias.deadline_ms - 1000;
            let later = wanted >= alias.deadline_ms + self.interval_ms();
            if !(earlier || later) {
                return Ok(());
            }
            match self.store.touch_with_ttl(&sid, millis(ttl)).await {
                // Another request wrote just now; its save set the deadline.
                Ok(_) | Err(Error::Conflict { .. }) => {}
                Err(e) => return Err(backend(e)),
            }
        } else {
            // Every changed key counts as read (see the module docs).
            for k in changes.set.keys().chain(changes.unset.iter()) {
                changes.expect.insert(k.clone(), base.get(k).cloned());
            }
            self.store
                .update_from_with_ttl(&sid, base, changes, millis(ttl))
                .await
                .map_err(backend)?;
        }
        self.set_alias(&record.id, &sid, expiry, ttl, false)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let Some(alias) = self.alias(id).await.map_err(backend)? else {
            return Ok(None);
        };
        let now = now_ms();
        if alias.expiry_ms.is_some_and(|e| e <= now) {
            // Past the record's expiry: its key runs out by itself (the
            // reaper writes `expired`).
            return Ok(None);
        }
        let sid = alias.session_id;
        let Some(mut session) = self.store.get(&sid).await.map_err(backend)? else {
            return Ok(None);
        };
        let mut deadline = alias.deadline_ms;
        // Reads slide the deadline as the store's own do (at most one
        // `touched` event per touch interval), never past the record's
        // expiry: a no-op for `OnInactivity` below the timeout, whose
        // deadline is already its expiry.
        let wanted = (now + self.timeout_ms()).min(alias.expiry_ms.unwrap_or(i64::MAX));
        if wanted > deadline + 1000 && self.store.touch_due(&session) {
            match self.store.touch_with_ttl(&sid, millis(wanted - now)).await {
                Ok(s) => {
                    session = s;
                    deadline = wanted;
                    let expiry = alias.expiry_ms.unwrap_or(wanted);
                    self.set_alias(id, &sid, expiry, wanted - now, false)
                        .await
                        .map_err(backend)?;
                }
                // Someone else wrote (and so refreshed it) meanwhile.
                Err(Error::Conflict { .. }) => {}
                Err(Error::NotFound(_) | Error::Ended { .. }) => return Ok(None),
                Err(e) => return Err(backend(e)),
            }
        }
        let fields = session.app_fields();
        let mut data: HashMap<String, Value> =
            fields.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        data.insert(
            BASE_KEY.to_owned(),
            serde_json::json!({"v": session.version(), "data": session.data()}),
        );
        Ok(Some(Record {
            id: *id,
            data,
            expiry_date: date_of(deadline),
        }))
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        let Some(sid) = self.resolve(id).await.map_err(backend)? else {
            return Ok(());
        };
        self.store
            .destroy(&sid, self.delete_reason)
            .await
            .map_err(backend)?;
        let _: i64 = self
            .store
            .connection()
            .del(self.alias_key(id))
            .await
            .map_err(|e| backend(e.into()))?;
        tracing::debug!(session_id = %sid, reason = self.delete_reason.as_str(), "tower-sessions session deleted");
        Ok(())
    }
}
