//! The per-request [`Session`] handle and axum extractor.
//!
//! The layer loads the session once (one `GET`, sliding expiry inside
//! [`SessionStore::load`](crate::SessionStore::load)) and hands the handler a
//! [`Session`]: a cheap, cloneable handle on a working copy of the session's
//! fields. Reads and writes of application keys touch only that copy; when
//! the handler returns, the layer compares it with what was loaded and writes
//! the difference as one `updated` event, or nothing at all when nothing
//! changed. An anonymous request that writes gets a new session (one
//! `created` event) and a cookie; one that does not write gets neither.
//!
//! The operations that must happen at a precise moment go to the store at
//! once: [`Session::login`] and [`Session::rotate`] (a new id, the old one
//! tombstoned), [`Session::logout`] and [`Session::destroy`],
//! [`Session::logout_all`], [`Session::switch_platform`].

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::csrf::{self, CSRF_KEY};
use super::error::SessionError;
use super::fingerprint::FINGERPRINT_KEY;
use super::layer::Shared;
use crate::event::{DestroyReason, Platform};
use crate::id::{SessionId, Token};
use crate::session::{
    Changes, NewSession, RESERVED_KEYS, Session as Stored, user_id_of, user_value,
};
use crate::store::Created;

/// What the response does with the cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CookieAction {
    /// Nothing: no `Set-Cookie`.
    Keep,
    /// Send the current token (new session, rotation, or a refresh of
    /// `Max-Age` after the store recorded activity).
    Set,
    /// Tell the browser to drop the cookie (logout, ended session).
    Clear,
}

/// The mutable state behind a handle.
#[derive(Debug)]
pub(crate) struct State {
    /// The bearer of `id`; `Debug` is redacted.
    pub(crate) token: Option<Token>,
    /// The live session this request is bound to, `None` when anonymous.
    pub(crate) id: Option<SessionId>,
    /// The fields as stored, as of the last read or write.
    pub(crate) base: Map<String, Value>,
    /// The working copy the handler reads and writes.
    pub(crate) data: Map<String, Value>,
    /// `_version` of `base`.
    pub(crate) version: u64,
    /// This request's fingerprint, when the layer binds sessions.
    pub(crate) fingerprint: Option<String>,
    /// What the response does with the cookie.
    pub(crate) cookie: CookieAction,
    /// The request carried a cookie of the configured name.
    pub(crate) presented: bool,
    /// Application keys the handler read: a concurrent change of one of them
    /// refuses this request's changes (409) instead of merging them.
    pub(crate) read: std::collections::BTreeSet<String>,
}

impl State {
    pub(crate) fn anonymous(fingerprint: Option<String>, presented: bool) -> Self {
        State {
            token: None,
            id: None,
            base: Map::new(),
            data: Map::new(),
            version: 0,
            fingerprint,
            cookie: CookieAction::Keep,
            presented,
            read: Default::default(),
        }
    }

    pub(crate) fn loaded(
        token: Token,
        id: SessionId,
        session: &Stored,
        fingerprint: Option<String>,
    ) -> Self {
        State {
            token: Some(token),
            id: Some(id),
            base: session.data().clone(),
            data: session.data().clone(),
            version: session.version(),
            fingerprint,
            cookie: CookieAction::Keep,
            presented: true,
            read: Default::default(),
        }
    }

    /// Binds the state to a session the store just created or rotated to.
    pub(crate) fn adopt(&mut self, created: Created) {
        self.token = Some(created.token);
        self.id = Some(created.session_id);
        self.base = created.session.data().clone();
        self.data = self.base.clone();
        self.version = created.session.version();
        self.cookie = CookieAction::Set;
    }

    /// The preconditions of this request's changes: the value each key it
    /// read had in the state it read (`None` when absent).
    pub(crate) fn expectations(&self) -> std::collections::BTreeMap<String, Option<Value>> {
        self.read
            .iter()
            .filter(|k| !managed(k))
            .map(|k| (k.clone(), self.base.get(k).cloned()))
            .collect()
    }

    /// Takes a newer stored state as the base, keeping the handler's pending
    /// changes on top of it.
    pub(crate) fn rebase(&mut self, session: &Stored) {
        let pending = diff(&self.base, &self.data);
        self.base = session.data().clone();
        self.data = self.base.clone();
        for k in pending.unset {
            self.data.remove(&k);
        }
        self.data.extend(pending.set);
        self.version = session.version();
    }

    /// Forgets the session: anonymous from here on, and the browser is told
    /// to drop the cookie if it sent one.
    pub(crate) fn end(&mut self) {
        self.token = None;
        self.id = None;
        self.base.clear();
        self.data.clear();
        self.version = 0;
        self.cookie = if self.presented {
            CookieAction::Clear
        } else {
            CookieAction::Keep
        };
    }

    /// The fields a new session starts with: the handler's application keys,
    /// a fresh CSRF token and the fingerprint.
    pub(crate) fn new_session_fields(&self, extra: &Map<String, Value>) -> Map<String, Value> {
        let mut fields: Map<String, Value> = self
            .data
            .iter()
            .filter(|(k, _)| !RESERVED_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        fields.extend(extra.clone());
        self.stamp(&mut fields);
        fields
    }

    /// Adds a fresh CSRF token and the fingerprint to a field map.
    pub(crate) fn stamp(&self, fields: &mut Map<String, Value>) {
        fields.insert(CSRF_KEY.to_owned(), Value::String(csrf::generate()));
        if let Some(fp) = &self.fingerprint {
            fields.insert(FINGERPRINT_KEY.to_owned(), Value::String(fp.clone()));
        }
    }
}

/// The application keys that differ between two field maps: what one
/// `updated` event must carry. Keys the store maintains are ignored.
pub(crate) fn diff(base: &Map<String, Value>, data: &Map<String, Value>) -> Changes {
    let reserved = |k: &str| RESERVED_KEYS.contains(&k);
    Changes {
        expect: Default::default(),
        set: data
            .iter()
            .filter(|(k, v)| !reserved(k) && base.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        unset: base
            .keys()
            .filter(|k| !reserved(k) && !data.contains_key(*k))
            .cloned()
            .collect(),
    }
}

/// Keys the application cannot set or remove through the handle: the ones
/// the store maintains, the CSRF token and fingerprint (the layer's), and
/// `user_id`, which only [`Session::login`] sets, so that no code path can
/// authenticate a session without rotating its id.
fn managed(key: &str) -> bool {
    RESERVED_KEYS.contains(&key) || key == CSRF_KEY || key == FINGERPRINT_KEY || key == "user_id"
}

/// The request's session: typed access to its fields, and the login, logout
/// and platform operations. Extract it in a handler behind
/// [`SessionLayer`](super::SessionLayer):
///
/// ```no_run
/// use vedfolnir_sessions::web::{Session, SessionError};
///
/// async fn theme(session: Session) -> Result<String, SessionError> {
///     let theme: Option<String> = session.get("theme")?;
///     session.insert("visits", session.get::<u64>("visits")?.unwrap_or(0) + 1)?;
///     Ok(theme.unwrap_or_else(|| "light".to_owned()))
/// }
/// ```
///
/// Clones share one state. Reads see the request's own writes; other
/// requests see them once the layer stores them, when the handler returns.
#[derive(Clone)]
pub struct Session {
    pub(crate) state: Arc<Mutex<State>>,
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("Session")
            .field("id", &s.id)
            .field("version", &s.version)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn new(state: State, shared: Arc<Shared>) -> Self {
        Session {
            state: Arc::new(Mutex::new(state)),
            shared,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements, so a panic in
        // another holder leaves nothing half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The session id (`hex(SHA-256(token))`), `None` while anonymous.
    pub fn id(&self) -> Option<SessionId> {
        self.lock().id.clone()
    }

    /// The logged-in user as stored (`42` after
    /// `NewSession::for_user(42, …)`, `"alice"` after
    /// `NewSession::for_user("alice", …)`), `None` when anonymous.
    pub fn user_id(&self) -> Option<Value> {
        user_value(&self.lock().data).cloned()
    }

    /// The logged-in user, deserialized: `Ok(None)` when anonymous, an error
    /// when the stored value is not a `T`.
    pub fn user_id_as<T: DeserializeOwned>(&self) -> Result<Option<T>, SessionError> {
        self.user_id()
            .map(serde_json::from_value)
            .transpose()
            .map_err(SessionError::from)
    }

    /// True when a user is logged in.
    pub fn is_authenticated(&self) -> bool {
        self.user_id().is_some()
    }

    /// The session's CSRF token, to hand to the client (in a page or a JSON
    /// body) for its `X-CSRF-Token` header.
    pub fn csrf_token(&self) -> Option<String> {
        self.lock()
            .data
            .get(CSRF_KEY)
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    /// `_version` of the session as last read or written by this request
    /// (0 when there is none).
    pub fn version(&self) -> u64 {
        self.lock().version
    }

    /// All fields as this request sees them (the fingerprint hash left out).
    /// Counts as a read of every field: a concurrent change of any of them
    /// refuses this request's own changes (see [`Session::get_value`]).
    pub fn fields(&self) -> Map<String, Value> {
        let mut s = self.lock();
        let keys: Vec<String> = s.base.keys().chain(s.data.keys()).cloned().collect();
        s.read.extend(keys);
        let mut m = s.data.clone();
        m.remove(FINGERPRINT_KEY);
        m
    }

    /// One field as JSON.
    ///
    /// The key counts as read: when the handler then changes the session and
    /// a concurrent request has changed this key meanwhile, the changes are
    /// refused with [`SessionError::Conflict`] (409) rather than applied on
    /// top of a value the handler never saw. A counter or any value computed
    /// from the current one is best changed with [`Session::increment`] or
    /// [`Session::modify`], which never conflict.
    pub fn get_value(&self, key: &str) -> Option<Value> {
        let mut s = self.lock();
        s.read.insert(key.to_owned());
        s.data.get(key).cloned()
    }

    /// One field, deserialized. `Ok(None)` when absent; an error when the
    /// stored value does not have the requested type.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        self.get_value(key)
            .map(serde_json::from_value)
            .transpose()
            .map_err(SessionError::from)
    }

    /// Sets a field (stored when the handler returns). Returns the previous
    /// value, which counts as a read (see [`Session::get_value`]).
    pub fn insert_value(&self, key: &str, value: Value) -> Result<Option<Value>, SessionError> {
        let old = self.set_value(key, value)?;
        self.lock().read.insert(key.to_owned());
        Ok(old)
    }

    fn set_value(&self, key: &str, value: Value) -> Result<Option<Value>, SessionError> {
        if managed(key) {
            return Err(SessionError::ReservedKey(key.to_owned()));
        }
        Ok(self.lock().data.insert(key.to_owned(), value))
    }

    /// Sets a field to any serializable value (stored when the handler
    /// returns). A blind write: it reads nothing, so it never conflicts; of
    /// two concurrent writes of one key, the later one wins.
    pub fn insert<T: Serialize>(&self, key: &str, value: T) -> Result<(), SessionError> {
        self.set_value(key, serde_json::to_value(value)?)
            .map(|_| ())
    }

    /// Removes a field (stored when the handler returns). Returns its value,
    /// which counts as a read (see [`Session::get_value`]).
    pub fn remove_value(&self, key: &str) -> Result<Option<Value>, SessionError> {
        if managed(key) {
            return Err(SessionError::ReservedKey(key.to_owned()));
        }
        let mut s = self.lock();
        s.read.insert(key.to_owned());
        Ok(s.data.remove(key))
    }

    /// Adds `by` to an integer field (absent counts as 0) and returns the new
    /// value. Stored at once, atomically, and re-applied on the current
    /// value if another request changed the session meanwhile: concurrent
    /// increments are never lost. An anonymous request gets a session.
    pub async fn increment(&self, key: &str, by: i64) -> Result<i64, SessionError> {
        let stored = self
            .modify_value(key, move |v| {
                let now = match v {
                    None => 0,
                    Some(v) => v.as_i64().ok_or_else(|| {
                        crate::Error::InvalidInput(format!("`{key}` holds {v}, not an integer"))
                    })?,
                };
                now.checked_add(by)
                    .map(|n| Some(Value::from(n)))
                    .ok_or_else(|| crate::Error::InvalidInput(format!("`{key}` would overflow")))
            })
            .await?;
        Ok(stored.and_then(|v| v.as_i64()).unwrap_or_default())
    }

    /// Changes one field with a function of its current value (`None` when
    /// absent; returning `None` removes it) and returns the stored value.
    /// Stored at once; the function runs again on the current value if
    /// another request changed the session meanwhile, so nothing is lost.
    pub async fn modify(
        &self,
        key: &str,
        f: impl Fn(Option<&Value>) -> Option<Value>,
    ) -> Result<Option<Value>, SessionError> {
        self.modify_value(key, move |v| Ok(f(v))).await
    }

    async fn modify_value(
        &self,
        key: &str,
        f: impl Fn(Option<&Value>) -> crate::Result<Option<Value>>,
    ) -> Result<Option<Value>, SessionError> {
        if managed(key) {
            return Err(SessionError::ReservedKey(key.to_owned()));
        }
        let (id, current) = {
            let s = self.lock();
            (s.id.clone(), Stored::from_parts(s.base.clone(), s.version))
        };
        let store = &self.shared.store;
        match id {
            Some(id) => {
                let stored = store
                    .modify_from(&id, current, key, &f)
                    .await
                    .map_err(|e| self.shared.write_failed(e))?;
                let value = stored.get(key).cloned();
                let mut s = self.lock();
                s.rebase(&stored);
                // The pending change of this key, if any, is superseded.
                match &value {
                    Some(v) => s.data.insert(key.to_owned(), v.clone()),
                    None => s.data.remove(key),
                };
                if s.cookie == CookieAction::Keep {
                    s.cookie = CookieAction::Set;
                }
                Ok(value)
            }
            None => {
                let value = f(None).map_err(|e| self.shared.write_failed(e))?;
                let mut extra = Map::new();
                if let Some(v) = &value {
                    extra.insert(key.to_owned(), v.clone());
                }
                let fields = self.lock().new_session_fields(&extra);
                let created = self.create(fields).await?;
                let value = created.session.get(key).cloned();
                self.lock().adopt(created);
                Ok(value)
            }
        }
    }

    /// Removes a field and returns its value, deserialized.
    pub fn remove<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        self.remove_value(key)?
            .map(serde_json::from_value)
            .transpose()
            .map_err(SessionError::from)
    }

    /// Logs a user in, after the application has authenticated them.
    ///
    /// `user` carries the user's fields (`user_id` is required; `username`,
    /// `email`, `role`, …). With a live session the id is rotated (session
    /// fixation defence): the old id is destroyed with reason `rotated` and
    /// tombstoned, and the new session carries its fields, this request's
    /// pending changes, the user's fields and a fresh CSRF token, in one
    /// atomic step. When the session belonged to another user, none of its
    /// fields are carried over. Without a session, one is created. Either
    /// way the response sets the new cookie.
    pub async fn login(&self, user: NewSession) -> Result<(), SessionError> {
        let Some(new_user) = user_id_of(&user.fields) else {
            return Err(SessionError::InvalidInput(
                "login needs a `user_id` field".to_owned(),
            ));
        };
        if let Some(k) = user.fields.keys().find(|k| {
            RESERVED_KEYS.contains(&k.as_str()) || *k == CSRF_KEY || *k == FINGERPRINT_KEY
        }) {
            return Err(SessionError::ReservedKey(k.clone()));
        }
        let (id, changes, fresh) = {
            let s = self.lock();
            let mut set = user.fields.clone();
            s.stamp(&mut set);
            let previous = user_id_of(&s.base);
            let mut changes = if previous.as_ref().is_some_and(|p| *p != new_user) {
                // Another user's session: start clean.
                Changes {
                    expect: Default::default(),
                    set: Map::new(),
                    unset: s
                        .base
                        .keys()
                        .filter(|k| !RESERVED_KEYS.contains(&k.as_str()))
                        .cloned()
                        .collect(),
                }
            } else {
                diff(&s.base, &s.data)
            };
            changes.unset.retain(|k| !set.contains_key(k));
            changes.set.extend(set.clone());
            let fresh = if s.id.is_some() {
                set
            } else {
                s.new_session_fields(&user.fields)
            };
            (s.id.clone(), changes, fresh)
        };
        let store = &self.shared.store;
        let created = match id {
            Some(old) => match store.rotate(&old, changes).await {
                Ok(c) => {
                    tracing::info!(old = %old, session_id = %c.session_id, user_id = %new_user, "login rotated the session id");
                    c
                }
                Err(crate::Error::Ended { .. } | crate::Error::NotFound(_)) => {
                    // Ended meanwhile (a logout elsewhere): start afresh.
                    let c = self.create(fresh).await?;
                    tracing::info!(session_id = %c.session_id, user_id = %new_user, "login created a session");
                    c
                }
                Err(e) => return Err(self.shared.write_failed(e)),
            },
            None => {
                let c = self.create(fresh).await?;
                tracing::info!(session_id = %c.session_id, user_id = %new_user, "login created a session");
                c
            }
        };
        self.lock().adopt(created);
        Ok(())
    }

    async fn create(&self, fields: Map<String, Value>) -> Result<Created, SessionError> {
        self.shared
            .store
            .create(NewSession { fields })
            .await
            .map_err(|e| self.shared.write_failed(e))
    }

    /// Gives the session a new id and a new CSRF token, keeping its fields
    /// (do it on every privilege change). The old id is destroyed with reason
    /// `rotated`. Does nothing for an anonymous request.
    pub async fn rotate(&self) -> Result<(), SessionError> {
        let (id, changes) = {
            let s = self.lock();
            let mut changes = diff(&s.base, &s.data);
            s.stamp(&mut changes.set);
            (s.id.clone(), changes)
        };
        let Some(old) = id else {
            return Ok(());
        };
        let created = self
            .shared
            .store
            .rotate(&old, changes)
            .await
            .map_err(|e| self.shared.write_failed(e))?;
        tracing::info!(old = %old, session_id = %created.session_id, "session id rotated");
        self.lock().adopt(created);
        Ok(())
    }

    /// Logs out: destroys the session with reason `logout` and clears the
    /// cookie. Returns false when there was no live session.
    pub async fn logout(&self) -> Result<bool, SessionError> {
        self.destroy(DestroyReason::Logout).await
    }

    /// Destroys the session with the given reason (a tombstone keeps any
    /// request still in flight from bringing it back) and clears the cookie.
    /// Returns false when there was no live session.
    pub async fn destroy(&self, reason: DestroyReason) -> Result<bool, SessionError> {
        let id = self.lock().id.clone();
        let ended = match &id {
            Some(id) => self
                .shared
                .store
                .destroy(id, reason)
                .await
                .map_err(|e| self.shared.write_failed(e))?,
            None => false,
        };
        if let Some(id) = id {
            tracing::info!(session_id = %id, reason = reason.as_str(), "session destroyed");
        }
        self.lock().end();
        Ok(ended)
    }

    /// Logs the user out everywhere: every live session of this user ends
    /// (reason `logout_all`) in one atomic step, this one included, and the
    /// cookie is cleared. Returns how many sessions ended.
    pub async fn logout_all(&self) -> Result<usize, SessionError> {
        let (user, id) = {
            let s = self.lock();
            (user_id_of(&s.data), s.id.clone())
        };
        let (Some(user), Some(id)) = (user, id) else {
            return Err(SessionError::Unauthenticated);
        };
        let store = &self.shared.store;
        let mut ended = store
            .destroy_all_for_user(&user, DestroyReason::LogoutAll)
            .await
            .map_err(|e| self.shared.write_failed(e))?;
        if !ended.contains(&id)
            && store
                .destroy(&id, DestroyReason::LogoutAll)
                .await
                .map_err(|e| self.shared.write_failed(e))?
        {
            ended.push(id);
        }
        tracing::info!(user_id = %user, sessions = ended.len(), "user logged out everywhere");
        self.lock().end();
        Ok(ended.len())
    }

    /// Moves the session to another platform connection: one
    /// `platform_switched` event, stored at once.
    pub async fn switch_platform(&self, platform: Platform) -> Result<(), SessionError> {
        let Some(id) = self.lock().id.clone() else {
            return Err(SessionError::Unauthenticated);
        };
        let session = self
            .shared
            .store
            .switch_platform(&id, platform)
            .await
            .map_err(|e| self.shared.write_failed(e))?;
        self.lock().rebase(&session);
        Ok(())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = SessionError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Session>()
            .cloned()
            .ok_or(SessionError::LayerMissing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn diff_carries_only_what_changed() {
        let base = map(
            json!({"a": 1, "b": [1, 2], "c": "x", "_last_updated": "t1", "last_activity": "t1"}),
        );
        let data = map(json!({"a": 1, "b": [1, 3], "d": null, "_last_updated": "t2"}));
        let c = diff(&base, &data);
        assert_eq!(c.set, map(json!({"b": [1, 3], "d": null})));
        assert_eq!(c.unset, vec!["c".to_owned()]);
        assert!(diff(&base, &base).is_empty());
    }

    #[test]
    fn rebase_keeps_pending_changes() {
        let mut s = State::anonymous(None, false);
        s.base = map(json!({"a": 1, "b": 2}));
        s.data = map(json!({"a": 5, "b": 2}));
        let newer =
            Stored::from_json(r#"{"a":1,"b":3,"platform_name":"P","_version":7}"#).expect("json");
        s.rebase(&newer);
        assert_eq!(s.data, map(json!({"a": 5, "b": 3, "platform_name": "P"})));
        assert_eq!(s.version, 7);
        assert_eq!(diff(&s.base, &s.data).set, map(json!({"a": 5})));
    }

    #[test]
    fn managed_keys() {
        for k in [
            "_version",
            "created_at",
            "last_activity",
            "csrf_token",
            "_fingerprint",
            "user_id",
        ] {
            assert!(managed(k), "{k}");
        }
        assert!(!managed("theme"));
    }
}
