//! The tower [`SessionLayer`] and its [`SessionService`].
//!
//! Per request:
//!
//! 1. Read the cookie (bytes, never trusted). No cookie, or one that is not a
//!    token, means an anonymous request; no store call is made.
//! 2. With a token: one [`SessionStore::load`] (one `GET`; a `touched` event
//!    at most once per touch interval). Unknown, expired or destroyed ids are
//!    anonymous. Redis unreachable is served from the audit database when
//!    the store has the fallback, else a 503 (see `Shared::load_unavailable`),
//!    never an empty session in place of a real one.
//! 3. Fingerprint check, when configured: a mismatch destroys the session
//!    with reason `fingerprint` and continues anonymously.
//! 4. CSRF check on unsafe methods: 403 before the handler runs.
//! 5. The handler runs with the [`Session`] handle in the request extensions.
//! 6. The difference between what was loaded and the handle's working copy is
//!    written: one `updated` event (one `created` event for an anonymous
//!    request that wrote), or nothing. A 5xx response from the handler writes
//!    nothing. A concurrent request that changed a key this handler read
//!    makes the write fail with 409 (`session_conflict`): a change computed
//!    from a stale value is never merged.
//! 7. `Set-Cookie` when the session is new, rotated or was just refreshed in
//!    the store (so the cookie's `Max-Age` slides with it); a removal cookie
//!    after a logout. Error details attached to the response are logged here,
//!    once.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{HeaderValue, Request, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use subtle::ConstantTimeEq as _;
use tower::{Layer, Service};
use tracing::Instrument as _;

use super::cookies::{self, Presented};
use super::csrf::CsrfPolicy;
use super::error::{ErrorReport, SessionError};
use super::fingerprint::{FINGERPRINT_KEY, Fingerprint};
use super::handle::{CookieAction, Session, State, diff};
use crate::config::{CookieConfig, SameSite};
use crate::error::Error;
use crate::event::DestroyReason;
use crate::id::SessionId;
use crate::session::{NewSession, Session as Stored};
use crate::store::SessionStore;
use crate::time::Timestamp;

/// Settings shared by every request of one layer.
#[derive(Debug, Clone)]
pub(crate) struct Shared {
    pub(crate) store: SessionStore,
    pub(crate) cookie: CookieConfig,
    pub(crate) csrf: CsrfPolicy,
    pub(crate) fingerprint: Option<Fingerprint>,
}

impl Shared {
    /// What a request with a session cookie gets when the store reports
    /// Redis unreachable.
    ///
    /// The store answers from the audit database by itself when it has one
    /// (`SessionStore::with_audit`) and `DB_SESSION_FALLBACK` is on, so this
    /// is reached only without that fallback. It is the one place where the
    /// layer decides what such a request gets: today a 503, because serving
    /// an empty session in place of the real one would silently log the
    /// user out or, worse, let a later write replace their session. A
    /// fallback of the layer's own would return the session here
    /// (`Ok(Some(_))`).
    pub(crate) async fn load_unavailable(
        &self,
        _id: &SessionId,
        err: Error,
    ) -> Result<Option<Stored>, SessionError> {
        Err(SessionError::Unavailable(err))
    }

    /// Sorts a failed store call into the client's error. Writes that fail
    /// because Redis is unreachable (and the store had no fallback) pass
    /// through here too: the write-side companion of
    /// [`Shared::load_unavailable`].
    pub(crate) fn write_failed(&self, err: Error) -> SessionError {
        SessionError::from_store(err)
    }
}

/// The session layer: put it around an axum `Router` (or any tower service
/// of `Request<B>` → `Response`) and extract [`Session`] in handlers.
///
/// ```no_run
/// use axum::{Router, routing::get};
/// use vedfolnir_sessions::web::{CsrfPolicy, Session, SessionLayer};
/// use vedfolnir_sessions::{Config, SessionStore};
///
/// # async fn run() -> anyhow::Result<()> {
/// let store = SessionStore::connect(&Config::from_env()?).await?;
/// let app: Router = Router::new()
///     .route("/", get(|s: Session| async move { format!("{:?}", s.user_id()) }))
///     .layer(SessionLayer::new(store).with_csrf(CsrfPolicy::default().exempt("/login")));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SessionLayer {
    shared: Arc<Shared>,
}

impl SessionLayer {
    /// A layer over `store`, with the cookie attributes of the store's
    /// configuration (`SESSION_COOKIE_*`), CSRF checks on every unsafe method
    /// and no fingerprinting.
    pub fn new(store: SessionStore) -> Self {
        let cookie = store.config().cookie.clone();
        if cookie.same_site == SameSite::None && !cookie.secure {
            tracing::warn!(
                "SESSION_COOKIE_SAMESITE=None without SESSION_COOKIE_SECURE: browsers refuse such cookies"
            );
        }
        SessionLayer {
            shared: Arc::new(Shared {
                store,
                cookie,
                csrf: CsrfPolicy::default(),
                fingerprint: None,
            }),
        }
    }

    /// Builder: other cookie attributes than the store's configuration.
    pub fn with_cookie(mut self, cookie: CookieConfig) -> Self {
        Arc::make_mut(&mut self.shared).cookie = cookie;
        self
    }

    /// Builder: the CSRF policy (exemptions, header name, or off).
    pub fn with_csrf(mut self, csrf: CsrfPolicy) -> Self {
        Arc::make_mut(&mut self.shared).csrf = csrf;
        self
    }

    /// Builder: bind sessions to their client (see [`Fingerprint`]).
    pub fn with_fingerprint(mut self, fingerprint: Fingerprint) -> Self {
        Arc::make_mut(&mut self.shared).fingerprint = Some(fingerprint);
        self
    }

    /// The store behind the layer.
    pub fn store(&self) -> &SessionStore {
        &self.shared.store
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`SessionLayer`] wraps around the application.
#[derive(Debug, Clone)]
pub struct SessionService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B> Service<Request<B>> for SessionService<S>
where
    S: Service<Request<B>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let shared = self.shared.clone();
        // Use the service that was polled ready; leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let span = tracing::info_span!(
            "session",
            method = %req.method(),
            path = req.uri().path(),
            session_id = tracing::field::Empty
        );
        // Continue the caller's trace (W3C `traceparent`), so that one trace
        // runs from the request to the audit row; the header alone is
        // enough when no propagator is installed, and when no span is
        // recorded at all the events still carry the caller's traceparent.
        let incoming = incoming_traceparent(req.headers());
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(req.headers()))
        });
        if opentelemetry::trace::TraceContextExt::has_active_span(&parent) {
            let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(&span, parent);
        } else if let Some(sc) = incoming
            .as_deref()
            .and_then(crate::telemetry::parse_traceparent)
        {
            let parent = opentelemetry::trace::TraceContextExt::with_remote_span_context(
                &opentelemetry::Context::new(),
                sc,
            );
            let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(&span, parent);
        }
        let fut = Box::pin(
            async move {
                let presented = cookies::presented(req.headers(), &shared.cookie.name);
                let fingerprint = shared.fingerprint.as_ref().map(|f| f.compute(&req));
                let state = match open(&shared, presented, fingerprint).await {
                    Ok(state) => state,
                    Err(e) => return Ok(finish_error(e.into_response())),
                };
                let session = Session::new(state, shared.clone());
                if shared.csrf.requires_token(req.method(), req.uri().path()) {
                    let expected = session.csrf_token();
                    if !shared.csrf.verify(req.headers(), expected.as_deref()) {
                        tracing::info!(
                            method = %req.method(),
                            path = req.uri().path(),
                            has_session = expected.is_some(),
                            "refused an unsafe request without a valid csrf token"
                        );
                        // Logged just above, with the method and path.
                        let mut res = SessionError::Csrf.into_response();
                        res.extensions_mut().remove::<ErrorReport>();
                        return Ok(apply_cookie(&shared, &session, res));
                    }
                }
                req.extensions_mut().insert(session.clone());
                let res = inner.call(req).await?;
                let res = commit(&shared, &session, res).await;
                Ok(apply_cookie(&shared, &session, finish_error(res)))
            }
            .instrument(span),
        );
        Box::pin(crate::telemetry::scope_traceparent_owned(incoming, fut))
    }
}

/// The request's W3C `traceparent` header, when it has one that is text.
fn incoming_traceparent(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Axum middleware that carries a request's W3C `traceparent` into the
/// events it causes, for apps on the tower-sessions adapter (the
/// [`SessionLayer`] does it by itself):
/// `router.layer(axum::middleware::from_fn(carry_traceparent))`.
pub async fn carry_traceparent(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let incoming = incoming_traceparent(req.headers());
    crate::telemetry::scope_traceparent(incoming.as_deref(), next.run(req)).await
}

/// Reads trace context from request headers.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Steps 1 to 3: the request's session state.
async fn open(
    shared: &Shared,
    presented: Presented,
    fingerprint: Option<String>,
) -> Result<State, SessionError> {
    let token = match presented {
        Presented::Absent => return Ok(State::anonymous(fingerprint, false)),
        Presented::Invalid => {
            tracing::debug!("ignoring a session cookie that is not a valid token");
            return Ok(State::anonymous(fingerprint, true));
        }
        Presented::Token(token) => token,
    };
    let id = token.session_id();
    tracing::Span::current().record("session_id", tracing::field::display(&id));
    let started = Timestamp::now();
    let loaded = match shared.store.load(&id).await {
        Ok(s) => s,
        Err(e) if e.is_unavailable() => shared.load_unavailable(&id, e).await?,
        Err(e) => return Err(SessionError::from_store(e)),
    };
    let Some(session) = loaded else {
        tracing::debug!(session_id = %id, "session cookie names no live session");
        return Ok(State::anonymous(fingerprint, true));
    };
    if let (Some(now), Some(bound)) = (
        fingerprint.as_deref(),
        session.get(FINGERPRINT_KEY).and_then(Value::as_str),
    ) && !bool::from(now.as_bytes().ct_eq(bound.as_bytes()))
    {
        tracing::warn!(session_id = %id, "fingerprint mismatch: ending the session");
        shared
            .store
            .destroy(&id, DestroyReason::Fingerprint)
            .await
            .map_err(|e| shared.write_failed(e))?;
        let mut state = State::anonymous(fingerprint, true);
        state.cookie = CookieAction::Clear;
        return Ok(state);
    }
    let mut state = State::loaded(token, id, &session, fingerprint);
    if session.last_activity().is_some_and(|t| t >= started) {
        // The load recorded activity: let the cookie's Max-Age slide too.
        state.cookie = CookieAction::Set;
    }
    Ok(state)
}

/// Step 6: store what the handler changed.
async fn commit(shared: &Shared, session: &Session, res: Response) -> Response {
    if res.status().is_server_error() {
        return res;
    }
    enum Plan {
        Nothing,
        Update(SessionId, crate::session::Session, crate::session::Changes),
        Create(serde_json::Map<String, Value>),
    }
    let plan = {
        let s = session.lock();
        match &s.id {
            Some(id) => {
                let mut changes = diff(&s.base, &s.data);
                if !changes.is_empty()
                    && let Some(fp) = &s.fingerprint
                    && !s.base.contains_key(FINGERPRINT_KEY)
                {
                    // A session from before fingerprinting was on: bind it now.
                    changes
                        .set
                        .insert(FINGERPRINT_KEY.to_owned(), Value::String(fp.clone()));
                }
                if changes.is_empty() {
                    Plan::Nothing
                } else {
                    // What the handler read must not have changed meanwhile.
                    changes.expect = s.expectations();
                    // The state this request read: no need to read it again.
                    let current = crate::session::Session::from_parts(s.base.clone(), s.version);
                    Plan::Update(id.clone(), current, changes)
                }
            }
            None if diff(&s.base, &s.data).is_empty() => Plan::Nothing,
            None => Plan::Create(s.new_session_fields(&serde_json::Map::new())),
        }
    };
    match plan {
        Plan::Nothing => res,
        Plan::Update(id, current, changes) => {
            match shared.store.update_from(&id, current, changes).await {
                Ok(stored) => {
                    let mut s = session.lock();
                    s.rebase(&stored);
                    if s.cookie == CookieAction::Keep {
                        s.cookie = CookieAction::Set;
                    }
                    res
                }
                Err(e) => shared.write_failed(e).into_response(),
            }
        }
        Plan::Create(fields) => match shared.store.create(NewSession { fields }).await {
            Ok(created) => {
                tracing::info!(session_id = %created.session_id, "session created");
                session.lock().adopt(created);
                res
            }
            Err(e) => shared.write_failed(e).into_response(),
        },
    }
}

/// Logs and strips the internal detail of an error response, once.
fn finish_error(mut res: Response) -> Response {
    if let Some(report) = res.extensions_mut().remove::<ErrorReport>() {
        report.log();
    }
    res
}

/// Step 7: the cookie.
fn apply_cookie(shared: &Shared, session: &Session, mut res: Response) -> Response {
    let s = session.lock();
    let line = match (s.cookie, &s.token) {
        (CookieAction::Set, Some(token)) => cookies::set_cookie(&shared.cookie, token),
        (CookieAction::Clear, _) => cookies::removal_cookie(&shared.cookie),
        _ => return res,
    };
    drop(s);
    match HeaderValue::from_str(&line) {
        Ok(v) => {
            let headers = res.headers_mut();
            headers.append(header::SET_COOKIE, v);
            if !headers.contains_key(header::CACHE_CONTROL) {
                // A response that sets a session cookie must never be served
                // to someone else from a shared cache.
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            }
        }
        Err(_) => tracing::error!("session cookie is not a valid header value"),
    }
    res
}
