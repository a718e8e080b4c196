//! The `SessionStore` Python class: the library's store, method for method.
//!
//! Sessions come back as the dict of their stored JSON (the fields and
//! `_version`). Every call blocks on the process's runtime with the GIL
//! released (see `runtime`).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt, PyString};
use serde_json::Value;
use vedfolnir_sessions::audit::{self, AuditSink};
use vedfolnir_sessions::config::SameSite;
use vedfolnir_sessions::{
    Changes, Config, Created, DestroyReason, NewSession, Platform, Record, SessionId, SessionStore,
    Token,
};

use crate::convert::{dict_from_py, session_to_py, to_py};
use crate::errors::{self, invalid};
use crate::runtime::block_on;

/// An event-sourced session store on Redis, shared with every other process
/// (Python or Rust) configured with the same Redis and namespace.
///
/// Made with `SessionStore.from_env()`, which reads the same environment
/// variables as the Rust side (`REDIS_URL`, `REDIS_SESSION_PREFIX`,
/// `REDIS_SESSION_TIMEOUT`, `SESSION_COOKIE_*`, …).
#[pyclass(name = "SessionStore", module = "vedfolnir_sessions", frozen)]
pub(crate) struct PySessionStore {
    config: Config,
    audit: bool,
    /// The store and the process that opened it: a forked child opens its
    /// own (the parent's connections live on the parent's runtime).
    inner: Mutex<Option<(u32, SessionStore)>>,
}

/// Opens the store; with `audit`, attaches the audit database at
/// `DATABASE_URL` (migrated, as the example app does) for
/// `DB_SESSION_SYNC` and `DB_SESSION_FALLBACK`.
async fn open(
    config: &Config,
    audit: bool,
    lazy: bool,
) -> vedfolnir_sessions::Result<SessionStore> {
    let store = if lazy {
        SessionStore::connect_lazy(config)?
    } else {
        match SessionStore::connect(config).await {
            Ok(s) => s,
            // With the fallback the store serves from the audit database
            // until Redis answers.
            Err(e) if e.is_unavailable() && audit && config.db_fallback => {
                SessionStore::connect_lazy(config)?
            }
            Err(e) => return Err(e),
        }
    };
    if !audit {
        return Ok(store);
    }
    let db = audit::db::connect(&config.database_url).await?;
    audit::db::migrate(&db).await?;
    Ok(store.with_audit(AuditSink::new(
        db,
        config.session_timeout,
        config.event_stream.clone(),
    )))
}

fn session_id(text: &str) -> PyResult<SessionId> {
    text.parse()
        .map_err(|_| invalid("a session id is 64 lowercase hex characters"))
}

fn user_id(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    if obj.is_instance_of::<PyInt>() {
        return Ok(obj.str()?.to_cow()?.into_owned());
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(s.to_cow()?.into_owned());
    }
    Err(invalid("a user id is an int or a str"))
}

fn reason(text: &str) -> PyResult<DestroyReason> {
    serde_json::from_value(Value::String(text.to_owned())).map_err(|_| {
        invalid(format!(
            "unknown destroy reason {text:?} (logout, rotated, logout_all, evicted, fingerprint, admin)"
        ))
    })
}

/// A session dict as read by the caller (its fields and `_version`).
fn base_session(d: &Bound<'_, PyDict>) -> PyResult<Record> {
    let mut data = dict_from_py(d)?;
    let version = data
        .remove("_version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| invalid("`base` is a session dict with its `_version`"))?;
    Ok(Record::from_parts(data, version))
}

fn changes(
    set: Option<&Bound<'_, PyDict>>,
    unset: Option<Vec<String>>,
    expect: Option<&Bound<'_, PyDict>>,
    expect_absent: Option<Vec<String>>,
) -> PyResult<Changes> {
    let mut c = Changes::new();
    if let Some(set) = set {
        c.set = dict_from_py(set)?;
    }
    c.unset = unset.unwrap_or_default();
    if let Some(expect) = expect {
        for (k, v) in dict_from_py(expect)? {
            c.expect.insert(k, Some(v));
        }
    }
    for k in expect_absent.unwrap_or_default() {
        c.expect.insert(k, None);
    }
    Ok(c)
}

fn created<'py>(py: Python<'py>, c: &Created) -> PyResult<(String, String, Bound<'py, PyDict>)> {
    Ok((
        c.token.expose().to_owned(),
        c.session_id.to_string(),
        session_to_py(py, &c.session)?,
    ))
}

fn opt_session<'py>(py: Python<'py>, s: Option<Record>) -> PyResult<Option<Bound<'py, PyDict>>> {
    s.map(|s| session_to_py(py, &s)).transpose()
}

fn json<'py>(py: Python<'py>, v: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let v = serde_json::to_value(v)
        .map_err(|e| errors::VedfolnirSessionError::new_err(e.to_string()))?;
    to_py(py, &v)
}

impl PySessionStore {
    /// This process's store.
    fn store(&self, py: Python<'_>) -> PyResult<SessionStore> {
        let pid = std::process::id();
        let mut slot = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((owner, store)) = slot.as_ref()
            && *owner == pid
        {
            return Ok(store.clone());
        }
        let (config, audit) = (self.config.clone(), self.audit);
        let store = block_on(py, async move { open(&config, audit, true).await })?
            .map_err(errors::to_py)?;
        *slot = Some((pid, store.clone()));
        Ok(store)
    }

    /// Runs one store call with the GIL released.
    fn run<T, F, Fut>(&self, py: Python<'_>, f: F) -> PyResult<T>
    where
        F: FnOnce(SessionStore) -> Fut,
        Fut: Future<Output = vedfolnir_sessions::Result<T>> + Send,
        T: Send,
    {
        let store = self.store(py)?;
        block_on(py, f(store))?.map_err(errors::to_py)
    }
}

#[pymethods]
impl PySessionStore {
    /// A store configured from the environment, like the Rust side.
    ///
    /// `env`: read the variables from this mapping instead of the process
    /// environment. `namespace`: another key namespace (session prefix
    /// `<namespace>session:`, stream `<namespace>events`). `audit`: attach
    /// the audit database at `DATABASE_URL` (synchronous audit commits and
    /// the fallback while Redis is unreachable). `lazy`: connect on first
    /// use instead of now (a web app that starts while Redis is down).
    #[staticmethod]
    #[pyo3(signature = (env=None, namespace=None, audit=false, lazy=false))]
    fn from_env(
        py: Python<'_>,
        env: Option<HashMap<String, String>>,
        namespace: Option<String>,
        audit: bool,
        lazy: bool,
    ) -> PyResult<Self> {
        let config = match env {
            Some(vars) => Config::from_map(&vars),
            None => Config::from_env(),
        }
        .map_err(|e| errors::ConfigError::new_err(e.to_string()))?;
        let config = match namespace {
            Some(ns) => config.with_namespace(&ns),
            None => config,
        };
        let store = {
            let config = config.clone();
            block_on(py, async move { open(&config, audit, lazy).await })?.map_err(errors::to_py)?
        };
        Ok(PySessionStore {
            config,
            audit,
            inner: Mutex::new(Some((std::process::id(), store))),
        })
    }

    /// Creates a session with these fields: `(token, session_id, session)`.
    /// The token goes into the cookie and is never stored; only its
    /// SHA-256, the session id, is.
    #[pyo3(signature = (fields=None))]
    fn create<'py>(
        &self,
        py: Python<'py>,
        fields: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<(String, String, Bound<'py, PyDict>)> {
        let fields = fields.map(dict_from_py).transpose()?.unwrap_or_default();
        let c = self.run(py, |s| async move { s.create(NewSession { fields }).await })?;
        created(py, &c)
    }

    /// The session behind a cookie token, with sliding expiry (at most one
    /// `touched` event per touch interval). `None` for a value that is not
    /// a token, or no live session.
    fn load<'py>(&self, py: Python<'py>, token: &str) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Ok(token) = Token::parse(token) else {
            return Ok(None);
        };
        let s = self.run(py, |s| async move { s.load_by_token(&token).await })?;
        opt_session(py, s)
    }

    /// The session with this id, read without writing. `None` when none is live.
    fn get<'py>(&self, py: Python<'py>, session_id: &str) -> PyResult<Option<Bound<'py, PyDict>>> {
        let id = self::session_id(session_id)?;
        let s = self.run(py, |s| async move { s.get(&id).await })?;
        opt_session(py, s)
    }

    /// Sets and removes keys: one `updated` event with only these keys.
    /// Concurrent changes of other keys all survive (the change is folded
    /// again on the current state after a version conflict).
    ///
    /// `expect` / `expect_absent`: the values (or absence) the change was
    /// computed from; a concurrent change of one of them raises
    /// `ConflictError` and writes nothing. `base`: the session dict the
    /// caller read (saves one read; the version check still applies).
    #[pyo3(signature = (session_id, set=None, unset=None, expect=None, expect_absent=None, base=None))]
    #[allow(clippy::too_many_arguments)]
    fn update<'py>(
        &self,
        py: Python<'py>,
        session_id: &str,
        set: Option<&Bound<'py, PyDict>>,
        unset: Option<Vec<String>>,
        expect: Option<&Bound<'py, PyDict>>,
        expect_absent: Option<Vec<String>>,
        base: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let id = self::session_id(session_id)?;
        let changes = changes(set, unset, expect, expect_absent)?;
        let base = base.map(base_session).transpose()?;
        let s = self.run(py, |s| async move {
            match base {
                Some(current) => s.update_from(&id, current, changes).await,
                None => s.update(&id, changes).await,
            }
        })?;
        session_to_py(py, &s)
    }

    /// Adds `by` to an integer key (absent counts as 0) and returns the new
    /// value; never loses a concurrent increment.
    #[pyo3(signature = (session_id, key, by=1))]
    fn increment(&self, py: Python<'_>, session_id: &str, key: String, by: i64) -> PyResult<i64> {
        let id = self::session_id(session_id)?;
        self.run(py, |s| async move { s.increment(&id, &key, by).await })
    }

    /// Appends a `touched` event now (refreshes `last_activity` and the TTL).
    fn touch<'py>(&self, py: Python<'py>, session_id: &str) -> PyResult<Bound<'py, PyDict>> {
        let id = self::session_id(session_id)?;
        let s = self.run(py, |s| async move { s.touch(&id).await })?;
        session_to_py(py, &s)
    }

    /// Moves the session to another platform connection: one
    /// `platform_switched` event.
    fn switch_platform<'py>(
        &self,
        py: Python<'py>,
        session_id: &str,
        platform_connection_id: i64,
        platform_name: String,
        platform_type: String,
        platform_instance_url: String,
    ) -> PyResult<Bound<'py, PyDict>> {
        let id = self::session_id(session_id)?;
        let platform = Platform {
            platform_connection_id,
            platform_name,
            platform_type,
            platform_instance_url,
        };
        let s = self.run(
            py,
            |s| async move { s.switch_platform(&id, platform).await },
        )?;
        session_to_py(py, &s)
    }

    /// A new id for the session (session fixation defence): the old one ends
    /// as `rotated`, the new one carries its fields plus these changes, in
    /// one atomic step. Returns `(token, session_id, session)`.
    #[pyo3(signature = (session_id, set=None, unset=None, expect=None, expect_absent=None))]
    fn rotate<'py>(
        &self,
        py: Python<'py>,
        session_id: &str,
        set: Option<&Bound<'py, PyDict>>,
        unset: Option<Vec<String>>,
        expect: Option<&Bound<'py, PyDict>>,
        expect_absent: Option<Vec<String>>,
    ) -> PyResult<(String, String, Bound<'py, PyDict>)> {
        let id = self::session_id(session_id)?;
        let changes = changes(set, unset, expect, expect_absent)?;
        let c = self.run(py, |s| async move { s.rotate(&id, changes).await })?;
        created(py, &c)
    }

    /// Ends the session (one `destroyed` event with this reason; its id is
    /// tombstoned). False when no live session had this id.
    #[pyo3(signature = (session_id, reason="logout"))]
    fn destroy(&self, py: Python<'_>, session_id: &str, reason: &str) -> PyResult<bool> {
        let id = self::session_id(session_id)?;
        let reason = self::reason(reason)?;
        self.run(py, |s| async move { s.destroy(&id, reason).await })
    }

    /// Ends every live session of the user (atomically per partition);
    /// returns their ids.
    #[pyo3(signature = (user_id, reason="logout_all"))]
    fn destroy_all_for_user(
        &self,
        py: Python<'_>,
        user_id: &Bound<'_, PyAny>,
        reason: &str,
    ) -> PyResult<Vec<String>> {
        let user = self::user_id(user_id)?;
        let reason = self::reason(reason)?;
        let ids = self.run(py, |s| async move {
            s.destroy_all_for_user(&user, reason).await
        })?;
        Ok(ids.iter().map(ToString::to_string).collect())
    }

    /// The user's live sessions, oldest first: `[(session_id, session), …]`.
    fn user_sessions<'py>(
        &self,
        py: Python<'py>,
        user_id: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<(String, Bound<'py, PyDict>)>> {
        let user = self::user_id(user_id)?;
        let list = self.run(py, |s| async move { s.user_sessions(&user).await })?;
        list.iter()
            .map(|(id, s)| Ok((id.to_string(), session_to_py(py, s)?)))
            .collect()
    }

    /// Live sessions, sessions awaiting expiry, stream length and the users
    /// with most sessions.
    #[pyo3(signature = (top=10))]
    fn stats<'py>(&self, py: Python<'py>, top: usize) -> PyResult<Bound<'py, PyAny>> {
        let stats = self.run(py, |s| async move { s.stats(top).await })?;
        json(py, &stats)
    }

    /// Redis reachable, its latency, its eviction policy and any warnings.
    fn health<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let health = self.run(py, |s| async move { Ok(s.health().await) })?;
        json(py, &health)
    }

    /// `destroyed` or `expired` for an id that ended (while its tombstone
    /// lasts), `None` otherwise.
    fn tombstone(&self, py: Python<'_>, session_id: &str) -> PyResult<Option<&'static str>> {
        let id = self::session_id(session_id)?;
        let status = self.run(py, |s| async move { s.tombstone(&id).await })?;
        Ok(status.map(|s| s.as_str()))
    }

    /// The session cookie's attributes from `SESSION_COOKIE_*`: `name`,
    /// `http_only`, `secure`, `same_site` (`Lax`, `Strict`, `None`),
    /// `max_age` (seconds).
    #[getter]
    fn cookie<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.config.cookie;
        let d = PyDict::new(py);
        d.set_item("name", &c.name)?;
        d.set_item("http_only", c.http_only)?;
        d.set_item("secure", c.secure)?;
        d.set_item(
            "same_site",
            match c.same_site {
                SameSite::Lax => "Lax",
                SameSite::Strict => "Strict",
                SameSite::None => "None",
            },
        )?;
        d.set_item("max_age", c.max_age.as_secs())?;
        Ok(d)
    }

    /// The key namespace (`vedfolnir:` by default).
    #[getter]
    fn namespace(&self) -> String {
        self.config
            .session_prefix
            .strip_suffix("session:")
            .unwrap_or(&self.config.session_prefix)
            .to_owned()
    }

    /// `REDIS_SESSION_TIMEOUT` in seconds.
    #[getter]
    fn session_timeout(&self) -> u64 {
        self.config.session_timeout.as_secs()
    }

    /// True when the audit database is attached.
    #[getter]
    fn audit(&self) -> bool {
        self.audit
    }

    fn __repr__(&self) -> String {
        format!(
            "SessionStore(redis={:?}, namespace={:?})",
            self.config.redis_redacted(),
            self.namespace()
        )
    }
}
