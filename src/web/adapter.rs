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
//! `<ns>tower:<hex(SHA-256(id as text))>` → the store's session id,
//! TTL `REDIS_SESSION_TIMEOUT + SESSION_TOMBSTONE_TTL`, refreshed whenever
//! the session's own TTL is.
//!
//! Like every key of the store it holds only a hash of the bearer value, so
//! a copy of Redis still lets no one present a valid cookie. The store's own
//! token is never used (nobody holds it). The bearer strength is
//! tower-sessions' 128 bits: the floor the design allows, below the 256 bits
//! of the native [`SessionLayer`](super::SessionLayer).
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
//! `_last_updated`) cannot be saved and are left out of loaded records. The store's idle timeout governs
//! expiry; configure tower-sessions with
//! `Expiry::OnInactivity(REDIS_SESSION_TIMEOUT)` so the cookie agrees.
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

use redis::AsyncCommands as _;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tower_sessions::session::{Id, Record};
use tower_sessions::session_store;

use crate::error::Error;
use crate::event::DestroyReason;
use crate::id::SessionId;
use crate::session::Changes;
use crate::session::{NewSession, RESERVED_KEYS, Record as Stored};
use crate::store::SessionStore;
use crate::time::Timestamp;

/// The tower-sessions backend over [`SessionStore`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TowerSessionsStore {
    store: SessionStore,
    alias_prefix: String,
    delete_reason: DestroyReason,
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
        let v: Option<String> = self.store.connection().get(self.alias_key(id)).await?;
        Ok(v.and_then(|s| s.parse().ok()))
    }

    fn alias_ttl_ms(&self) -> u64 {
        let c = self.store.config();
        (c.session_timeout + c.tombstone_ttl).as_millis() as u64
    }

    async fn refresh_alias(&self, id: &Id) -> Result<(), Error> {
        let _: bool = self
            .store
            .connection()
            .pexpire(self.alias_key(id), self.alias_ttl_ms() as i64)
            .await?;
        Ok(())
    }

    fn expiry_of(&self, session: &Stored) -> cookie::time::OffsetDateTime {
        let last = session.last_activity().unwrap_or_else(Timestamp::now);
        let ms = last.millis() + self.store.config().session_timeout.as_millis() as i64;
        cookie::time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .unwrap_or_else(|_| cookie::time::OffsetDateTime::now_utc())
    }
}

/// The record key that carries the state a record was loaded with:
/// `{"v": <_version>, "data": {<every field>}}`. It never reaches the store.
pub const BASE_KEY: &str = "__vedfolnir_base";

fn backend(e: Error) -> session_store::Error {
    session_store::Error::Backend(e.to_string())
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

#[async_trait::async_trait]
impl tower_sessions::SessionStore for TowerSessionsStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let fields = fields_of(record)?;
        let created = self
            .store
            .create(NewSession { fields })
            .await
            .map_err(backend)?;
        let mut conn = self.store.connection();
        // A collision of 128-bit random ids does not happen in practice; the
        // bound only keeps a broken RNG from looping forever.
        for _ in 0..8 {
            let set: Option<String> = redis::cmd("SET")
                .arg(self.alias_key(&record.id))
                .arg(created.session_id.as_str())
                .arg("NX")
                .arg("PX")
                .arg(self.alias_ttl_ms())
                .query_async(&mut conn)
                .await
                .map_err(|e| backend(e.into()))?;
            if set.is_some() {
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
        let Some(sid) = self.resolve(&record.id).await.map_err(backend)? else {
            return Err(session_store::Error::Backend(
                "session not found".to_owned(),
            ));
        };
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
        let mut changes: Changes = Changes::between(base.data(), &fields);
        if changes.is_empty() {
            return Ok(());
        }
        // Every changed key counts as read (see the module docs).
        for k in changes.set.keys().chain(changes.unset.iter()) {
            changes.expect.insert(k.clone(), base.get(k).cloned());
        }
        self.store
            .update_from(&sid, base, changes)
            .await
            .map_err(backend)?;
        self.refresh_alias(&record.id).await.map_err(backend)
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let Some(sid) = self.resolve(id).await.map_err(backend)? else {
            return Ok(None);
        };
        let started = Timestamp::now();
        let Some(session) = self.store.load(&sid).await.map_err(backend)? else {
            return Ok(None);
        };
        if session.last_activity().is_some_and(|t| t >= started) {
            // The load slid the session's TTL; slide the alias with it.
            self.refresh_alias(id).await.map_err(backend)?;
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
            expiry_date: self.expiry_of(&session),
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
