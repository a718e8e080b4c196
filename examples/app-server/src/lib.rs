//! The example app server's routes, users and configuration, shared by the
//! binary (`app_server`, `src/main.rs`) and the end-to-end tests, which
//! serve this same router on a free port.
//!
//! | route | does |
//! |---|---|
//! | `GET /` | a minimal HTML login page |
//! | `POST /login` | `{"username", "password"}` → 200 with the session context, sets the cookie; 401 on bad credentials |
//! | `POST /logout` | 204, ends the session, clears the cookie |
//! | `POST /logout-all` | 204, ends every session of the user |
//! | `GET /me` | 200 with the session context, or 401 |
//! | `POST /platform` | the four platform fields → 200 with the session context |
//! | `PUT /session/data/{key}` | any JSON body → 204 |
//! | `GET /session/data/{key}` | the value, or 404 |
//! | `POST /session/incr/{key}` | optional `{"by": n}` (default 1) → 200 with the new value, a JSON number; `?via=modify` takes the closure-based path |
//! | `GET /healthz` | 200 when Redis answers, else 503 |
//!
//! Every unsafe route but `/login` needs the `X-CSRF-Token` header. Every
//! response that carries session data says `Cache-Control: no-store`, and
//! user input is never logged raw.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::TryRngCore as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use vedfolnir_sessions::audit::{self, AuditSink};
use vedfolnir_sessions::web::{CsrfPolicy, Fingerprint, Session, SessionError, SessionLayer};
use vedfolnir_sessions::{Config, NewSession, Platform, SessionStore};

/// The login page served at `/`.
pub const LOGIN_PAGE: &str = include_str!("login.html");

/// The built-in users when `APP_USERS` is not set.
pub const DEFAULT_USERS: &str = "admin:admin123:admin,user:user123:user";

/// One user of the built-in table.
#[derive(Debug, Clone)]
pub struct User {
    /// Position in the table, from 1.
    pub id: i64,
    /// Login name.
    pub name: String,
    /// `admin`, `user`, …
    pub role: String,
    /// `<name>@example.com`.
    pub email: String,
    /// Argon2id PHC string.
    hash: String,
}

/// The user table: names and argon2id hashes, never the passwords.
#[derive(Debug)]
pub struct Users {
    by_name: BTreeMap<String, User>,
    /// Verified against for unknown names, so a wrong name costs as much time
    /// as a wrong password.
    dummy: String,
}

impl Users {
    /// Parses `name:password:role,…` (the password may contain `:`) and hashes
    /// every password with argon2id and `params`. Errors name `APP_USERS` and
    /// the entry's position, never its password.
    pub fn from_spec(spec: &str, params: Params) -> anyhow::Result<Self> {
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let hash = |password: &str| -> anyhow::Result<String> {
            let mut salt = [0u8; 16];
            rand::rngs::OsRng
                .try_fill_bytes(&mut salt)
                .context("reading the OS random number generator")?;
            let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
            Ok(argon
                .hash_password(password.as_bytes(), &salt)
                .map_err(|e| anyhow::anyhow!("argon2: {e}"))?
                .to_string())
        };
        let mut by_name = BTreeMap::new();
        for (i, entry) in spec.split(',').map(str::trim).enumerate() {
            let position = i + 1;
            let parsed = entry
                .split_once(':')
                .and_then(|(name, rest)| rest.rsplit_once(':').map(|(pw, role)| (name, pw, role)));
            let Some((name, password, role)) =
                parsed.filter(|(n, p, r)| !n.is_empty() && !p.is_empty() && !r.is_empty())
            else {
                bail!("invalid APP_USERS: entry {position} is not name:password:role");
            };
            if by_name.contains_key(name) {
                bail!("invalid APP_USERS: entry {position} repeats the user name {name:?}");
            }
            by_name.insert(
                name.to_owned(),
                User {
                    id: position as i64,
                    name: name.to_owned(),
                    role: role.to_owned(),
                    email: format!("{name}@example.com"),
                    hash: hash(password)?,
                },
            );
        }
        let dummy = hash("not a password anyone has")?;
        Ok(Users { by_name, dummy })
    }

    /// The user names, for the start-up banner.
    pub fn names(&self) -> Vec<&str> {
        let mut users: Vec<&User> = self.by_name.values().collect();
        users.sort_by_key(|u| u.id);
        users.into_iter().map(|u| u.name.as_str()).collect()
    }

    /// Checks a password (CPU-bound: call it from `spawn_blocking`).
    pub fn verify(&self, name: &str, password: &str) -> Option<User> {
        let user = self.by_name.get(name);
        let hash = user.map_or(self.dummy.as_str(), |u| u.hash.as_str());
        let ok = PasswordHash::new(hash).is_ok_and(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        });
        user.filter(|_| ok).cloned()
    }
}

/// The example's own settings (the store's come from [`vedfolnir_sessions::Config`]).
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// `APP_LISTEN` (`127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// `APP_USERS` (`name:password:role,…`), the built-in table when unset.
    pub users: String,
    /// `APP_FINGERPRINT`: `off` (default), `user-agent`, `ip`, or `both`.
    pub fingerprint: Option<Fingerprint>,
}

impl AppConfig {
    /// Reads `APP_LISTEN`, `APP_USERS` and `APP_FINGERPRINT`.
    pub fn from_env() -> anyhow::Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let listen = var("APP_LISTEN").unwrap_or_else(|| "127.0.0.1:8080".to_owned());
        let listen = listen
            .trim()
            .parse()
            .with_context(|| format!("invalid APP_LISTEN={listen:?}: expected host:port"))?;
        let fingerprint = match var("APP_FINGERPRINT").as_deref().map(str::trim) {
            None | Some("off") => None,
            Some("user-agent") => Some(Fingerprint::user_agent()),
            Some("ip") => Some(Fingerprint::ip_prefix(24, 64)),
            Some("both") => Some(Fingerprint::user_agent().with_ip_prefix(24, 64)),
            Some(other) => {
                bail!("invalid APP_FINGERPRINT={other:?}: expected off, user-agent, ip or both")
            }
        };
        Ok(AppConfig {
            listen,
            users: var("APP_USERS").unwrap_or_else(|| DEFAULT_USERS.to_owned()),
            fingerprint,
        })
    }
}

/// Connects the store. With `DB_SESSION_SYNC` or `DB_SESSION_FALLBACK` on
/// (the defaults) the audit database at `DATABASE_URL` is attached: every
/// mutation is then committed to it as well, and while Redis is unreachable
/// sessions are served from it instead of failing. The example brings the
/// schema up to date itself so that nothing else is needed to start; a
/// production deployment runs `vedfolnir-sessions migrate` as a release step.
pub async fn connect_store(config: &Config) -> anyhow::Result<SessionStore> {
    let store = match SessionStore::connect(config).await {
        Ok(store) => store,
        // With the fallback the app serves from the audit database while
        // Redis is unreachable, at start too; the connection is made on
        // first use once Redis answers.
        Err(e) if e.is_unavailable() && config.db_fallback => {
            tracing::warn!(
                redis = %config.redis_redacted(),
                err = %e,
                "redis unreachable at start; serving from the audit database until it answers"
            );
            SessionStore::connect_lazy(config)?
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("connecting to redis at {}", config.redis_redacted()));
        }
    };
    if !(config.db_sync || config.db_fallback) {
        return Ok(store);
    }
    // The URL may hold a password: it is never printed.
    let db = audit::db::connect(&config.database_url)
        .await
        .context("connecting to the audit database (DATABASE_URL)")?;
    audit::db::migrate(&db)
        .await
        .context("migrating the audit database (DATABASE_URL)")?;
    Ok(store.with_audit(AuditSink::new(
        db,
        config.session_timeout,
        config.event_stream.clone(),
    )))
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The user table.
    pub users: Arc<Users>,
    /// The session store (for `/healthz`).
    pub store: SessionStore,
}

/// The session layer as the example uses it: cookie from `SESSION_COOKIE_*`,
/// CSRF on every unsafe route but `/login`, optional fingerprinting.
pub fn session_layer(store: SessionStore, fingerprint: Option<Fingerprint>) -> SessionLayer {
    let layer = SessionLayer::new(store).with_csrf(CsrfPolicy::default().exempt("/login"));
    match fingerprint {
        Some(f) => layer.with_fingerprint(f),
        None => layer,
    }
}

/// The routes, without state or session layer (tests add routes of their
/// own before [`finish`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Html(LOGIN_PAGE) }))
        .route("/healthz", get(healthz))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/logout-all", post(logout_all))
        .route("/me", get(me))
        .route("/platform", post(platform))
        .route("/session/data/{key}", get(get_data).put(put_data))
        .route("/session/incr/{key}", post(incr))
        .layer(axum::middleware::from_fn(no_store))
}

/// `Cache-Control: no-store` on every response of a route that reads or
/// writes session data (the login page and `/healthz` may be cached): the
/// context carries the CSRF token and the user's email, which no shared
/// cache may keep.
async fn no_store(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let cacheable = matches!(req.uri().path(), "/" | "/healthz");
    let mut res = next.run(req).await;
    if !cacheable {
        res.headers_mut().insert(
            axum::http::header::CACHE_CONTROL,
            axum::http::HeaderValue::from_static("no-store"),
        );
    }
    res
}

/// User input as it may appear in a log line: at most 64 characters, with
/// control characters and quotes escaped, so a value can neither forge a
/// line nor flood the log.
pub fn loggable(input: &str) -> String {
    let mut out: String = input
        .chars()
        .take(64)
        .flat_map(char::escape_debug)
        .collect();
    if input.chars().nth(64).is_some() {
        out.push_str(&format!("… ({} bytes)", input.len()));
    }
    out
}

/// Adds the state and the session layer.
pub fn finish(routes: Router<AppState>, state: AppState, layer: SessionLayer) -> Router {
    routes.with_state(state).layer(layer)
}

/// The whole app.
pub fn router(state: AppState, layer: SessionLayer) -> Router {
    finish(routes(), state, layer)
}

/// Serves `app` until `shutdown` resolves, then lets requests in flight
/// finish for at most `drain`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> std::io::Result<()> {
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    });
    tokio::select! {
        r = server => r,
        () = async move {
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(drain).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(drain_secs = drain.as_secs(), "requests still running after the drain timeout; stopping");
            Ok(())
        }
    }
}

/// The example's HTTP errors. Session errors keep their own response (the
/// session layer logs their detail); the others carry nothing internal.
#[derive(Debug)]
pub enum AppError {
    /// 400 with a fixed message.
    BadRequest(&'static str),
    /// 401 after a failed login.
    InvalidCredentials,
    /// 404.
    NotFound,
    /// The session layer's errors.
    Session(SessionError),
    /// 500; the detail is logged here, once.
    Internal(String),
}

impl From<SessionError> for AppError {
    fn from(e: SessionError) -> Self {
        AppError::Session(e)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            AppError::Session(e) => return e.into_response(),
            AppError::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m),
            AppError::InvalidCredentials => (
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "unknown user name or wrong password",
            ),
            AppError::NotFound => (StatusCode::NOT_FOUND, "not_found", "no such value"),
            AppError::Internal(detail) => {
                tracing::error!(err = %detail, "request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        };
        (status, Json(json!({"error": code, "message": message}))).into_response()
    }
}

/// The session context of `/login` and `/me`: the user, the platform, the
/// CSRF token and the times. Never the cookie token.
fn context(session: &Session) -> Value {
    let f = session.fields();
    let field = |k: &str| f.get(k).cloned().unwrap_or(Value::Null);
    json!({
        "user_id": field("user_id"),
        "username": field("username"),
        "email": field("email"),
        "role": field("role"),
        "platform_connection_id": field("platform_connection_id"),
        "platform_name": field("platform_name"),
        "platform_type": field("platform_type"),
        "platform_instance_url": field("platform_instance_url"),
        "csrf_token": field("csrf_token"),
        "created_at": field("created_at"),
        "last_activity": field("last_activity"),
    })
}

fn authenticated(session: &Session) -> Result<(), AppError> {
    if session.is_authenticated() {
        Ok(())
    } else {
        Err(SessionError::Unauthenticated.into())
    }
}

/// Keys the data routes may use: short, plain, and none of the fields that
/// carry identity, platform, CSRF token or times.
fn data_key(key: &str) -> Result<&str, AppError> {
    const PROTECTED: [&str; 11] = [
        "user_id",
        "username",
        "email",
        "role",
        "platform_connection_id",
        "platform_name",
        "platform_type",
        "platform_instance_url",
        "csrf_token",
        "created_at",
        "last_activity",
    ];
    let plain = !key.is_empty()
        && key.len() <= 64
        && !key.starts_with('_')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if plain && !PROTECTED.contains(&key) {
        Ok(key)
    } else {
        Err(AppError::BadRequest(
            "keys are 1-64 of A-Z a-z 0-9 _ . -, not starting with _, and not a session field",
        ))
    }
}

async fn healthz(State(app): State<AppState>) -> Response {
    let health = app.store.health().await;
    if health.redis_reachable {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable"})),
        )
            .into_response()
    }
}

#[derive(Deserialize)]
struct LoginForm {
    username: String,
    password: String,
}

async fn login(
    State(app): State<AppState>,
    session: Session,
    body: Result<Json<LoginForm>, JsonRejection>,
) -> Result<Json<Value>, AppError> {
    let Ok(Json(form)) = body else {
        return Err(AppError::BadRequest(
            r#"expected a JSON body {"username": …, "password": …}"#,
        ));
    };
    let users = app.users.clone();
    let username = form.username.clone();
    let user = tokio::task::spawn_blocking(move || users.verify(&form.username, &form.password))
        .await
        .map_err(|e| AppError::Internal(format!("password check: {e}")))?;
    let Some(user) = user else {
        tracing::info!(username = %loggable(&username), "failed login");
        return Err(AppError::InvalidCredentials);
    };
    session
        .login(
            NewSession::for_user(user.id, user.name.clone())
                .with("email", user.email.clone())
                .with("role", user.role.clone()),
        )
        .await?;
    Ok(Json(context(&session)))
}

async fn logout(session: Session) -> Result<StatusCode, AppError> {
    session.logout().await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn logout_all(session: Session) -> Result<StatusCode, AppError> {
    authenticated(&session)?;
    session.logout_all().await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn me(session: Session) -> Result<Json<Value>, AppError> {
    authenticated(&session)?;
    Ok(Json(context(&session)))
}

async fn platform(
    session: Session,
    body: Result<Json<Platform>, JsonRejection>,
) -> Result<Json<Value>, AppError> {
    authenticated(&session)?;
    let Ok(Json(platform)) = body else {
        return Err(AppError::BadRequest(
            "expected platform_connection_id, platform_name, platform_type, platform_instance_url",
        ));
    };
    session.switch_platform(platform).await?;
    Ok(Json(context(&session)))
}

async fn put_data(
    session: Session,
    Path(key): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<StatusCode, AppError> {
    let key = data_key(&key)?;
    let Ok(Json(value)) = body else {
        return Err(AppError::BadRequest("expected a JSON body"));
    };
    session.insert_value(key, value)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_data(session: Session, Path(key): Path<String>) -> Result<Json<Value>, AppError> {
    let key = data_key(&key)?;
    session.get_value(key).map(Json).ok_or(AppError::NotFound)
}

#[derive(Deserialize, Default)]
struct IncrBody {
    #[serde(default)]
    by: Option<i64>,
}

#[derive(Deserialize, Default)]
struct IncrQuery {
    #[serde(default)]
    via: Option<String>,
}

/// Adds to a counter in the session, atomically: concurrent increments of
/// one session are never lost. `?via=modify` goes through the closure-based
/// `Session::modify` instead of `Session::increment`; both re-apply the
/// change on the current value after a conflict.
async fn incr(
    session: Session,
    Path(key): Path<String>,
    axum::extract::Query(query): axum::extract::Query<IncrQuery>,
    body: Option<Json<IncrBody>>,
) -> Result<Json<Value>, AppError> {
    authenticated(&session)?;
    let key = data_key(&key)?;
    let by = body.and_then(|Json(b)| b.by).unwrap_or(1);
    let value = match query.via.as_deref() {
        None | Some("increment") => session.increment(key, by).await?,
        Some("modify") => session
            .modify(key, |v| {
                let now = v.and_then(Value::as_i64).unwrap_or(0);
                Some(Value::from(now.saturating_add(by)))
            })
            .await?
            .and_then(|v| v.as_i64())
            .unwrap_or_default(),
        Some(_) => return Err(AppError::BadRequest("via is increment or modify")),
    };
    Ok(Json(Value::from(value)))
}
