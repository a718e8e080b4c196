//! End-to-end tests of the example app server: its router served on a free
//! port over the real Redis, driven by reqwest with a cookie jar. Each test
//! states what it proves in its first comment.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::http::HeaderName;
use axum::routing::post;
use redis::AsyncCommands as _;
use reqwest::StatusCode;
use reqwest::header::{COOKIE, SET_COOKIE};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use vedfolnir_sessions::config::RedisTarget;
use vedfolnir_sessions::web::{Fingerprint, Session};
use vedfolnir_sessions::{SessionId, SessionStore, Status, Token};
use vedfolnir_tests::TestContext;

// ---------------------------------------------------------------------------
// Harness

fn users() -> Arc<app_server::Users> {
    static USERS: OnceLock<Arc<app_server::Users>> = OnceLock::new();
    USERS
        .get_or_init(|| {
            // Real argon2id, with light parameters so the suite stays fast.
            let params = argon2::Params::new(1024, 1, 1, None).expect("argon2 params");
            Arc::new(
                app_server::Users::from_spec(app_server::DEFAULT_USERS, params).expect("users"),
            )
        })
        .clone()
}

/// Everything this test binary logs (our crates, TRACE), to check that no
/// cookie token is ever logged.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn logs() -> &'static Capture {
    static LOGS: OnceLock<Capture> = OnceLock::new();
    LOGS.get_or_init(|| {
        let capture = Capture::default();
        let writer = capture.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "vedfolnir_sessions=trace,app_server=trace,web_e2e=trace",
            ))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        capture
    })
}

struct App {
    ctx: TestContext,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl App {
    async fn start() -> Self {
        Self::serve(TestContext::new().await, None, app_server::routes(), None).await
    }

    async fn serve(
        ctx: TestContext,
        fingerprint: Option<Fingerprint>,
        routes: Router<app_server::AppState>,
        store: Option<SessionStore>,
    ) -> Self {
        logs();
        let store = store.unwrap_or_else(|| ctx.store.clone());
        let state = app_server::AppState {
            users: users(),
            store: store.clone(),
        };
        let router =
            app_server::finish(routes, state, app_server::session_layer(store, fingerprint));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let _ = app_server::serve(
                listener,
                router,
                std::future::pending(),
                Duration::from_secs(1),
            )
            .await;
        });
        App { ctx, addr, server }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A browser-like client with its own cookie jar.
    fn jar() -> reqwest::Client {
        reqwest::Client::builder()
            .cookie_store(true)
            .build()
            .expect("client")
    }

    /// A client without a jar: cookies only where a test sets them.
    fn bare() -> reqwest::Client {
        reqwest::Client::new()
    }

    async fn login(&self, client: &reqwest::Client, user: &str, password: &str) -> Login {
        let res = client
            .post(self.url("/login"))
            .json(&json!({"username": user, "password": password}))
            .send()
            .await
            .expect("POST /login");
        assert_eq!(res.status(), StatusCode::OK, "login as {user}");
        let cookie = session_cookie(&res, "session").expect("login sets the cookie");
        let body: Value = res.json().await.expect("login body");
        Login {
            token: cookie.value().to_owned(),
            csrf: body["csrf_token"].as_str().expect("csrf_token").to_owned(),
            body,
        }
    }

    async fn me(&self, client: &reqwest::Client) -> (StatusCode, Value) {
        let res = client.get(self.url("/me")).send().await.expect("GET /me");
        let status = res.status();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// `/me` with exactly this cookie header value.
    async fn me_with_cookie(&self, cookie: &[u8]) -> StatusCode {
        Self::bare()
            .get(self.url("/me"))
            .header(
                COOKIE,
                reqwest::header::HeaderValue::from_bytes(cookie).expect("header bytes"),
            )
            .send()
            .await
            .expect("GET /me")
            .status()
    }

    async fn put(
        &self,
        client: &reqwest::Client,
        key: &str,
        value: Value,
        csrf: Option<&str>,
    ) -> reqwest::Response {
        let mut req = client
            .put(self.url(&format!("/session/data/{key}")))
            .json(&value);
        if let Some(t) = csrf {
            req = req.header("x-csrf-token", t);
        }
        req.send().await.expect("PUT /session/data")
    }

    async fn post(&self, client: &reqwest::Client, path: &str, csrf: Option<&str>) -> StatusCode {
        let mut req = client.post(self.url(path));
        if let Some(t) = csrf {
            req = req.header("x-csrf-token", t);
        }
        req.send().await.expect("POST").status()
    }

    /// Event types and payloads of one session, in order.
    async fn events(&self, id: &SessionId) -> Vec<(String, Value)> {
        self.ctx
            .events_of(id)
            .await
            .into_iter()
            .map(|e| (e["type"].clone(), payload(&e)))
            .collect()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.server.abort();
    }
}

struct Login {
    token: String,
    csrf: String,
    body: Value,
}

impl Login {
    fn id(&self) -> SessionId {
        sid(&self.token)
    }
}

fn sid(token: &str) -> SessionId {
    Token::parse(token).expect("a token").session_id()
}

fn payload(e: &HashMap<String, String>) -> Value {
    serde_json::from_str(&e["payload"]).expect("payload json")
}

fn set_cookie_lines(res: &reqwest::Response) -> Vec<String> {
    res.headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect()
}

fn session_cookie(res: &reqwest::Response, name: &str) -> Option<cookie::Cookie<'static>> {
    set_cookie_lines(res)
        .into_iter()
        .filter_map(|l| cookie::Cookie::parse(l).ok())
        .find(|c| c.name() == name)
}

async fn error_code(res: reqwest::Response) -> String {
    let v: Value = res.json().await.expect("json error body");
    v["error"].as_str().unwrap_or_default().to_owned()
}

// ---------------------------------------------------------------------------
// Login, rotation, cookie

#[tokio::test]
async fn login_rotates_the_id_and_the_old_cookie_is_dead() {
    // Proves: login rotates the session id (fixation defence), the cookie
    // changes, the old id is tombstoned and no longer authenticates, the
    // rotation is one `destroyed{rotated}` plus one `created{rotated_from}`,
    // the CSRF token is renewed, and another user's login carries nothing of
    // the previous user's session over.
    let app = App::start().await;
    let client = App::jar();
    let first = app.login(&client, "admin", "admin123").await;
    assert_eq!(first.token.len(), 43);
    assert_eq!(first.body["username"], "admin");
    assert_eq!(first.body["role"], "admin");
    assert_eq!(first.body["user_id"], 1);
    assert!(
        !first.body.to_string().contains(&first.token),
        "the body never carries the token"
    );
    let res = app
        .put(&client, "cart", json!(["book"]), Some(&first.csrf))
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);

    let second = app.login(&client, "admin", "admin123").await;
    assert_ne!(second.token, first.token, "login must issue a new cookie");
    assert_ne!(second.csrf, first.csrf, "login must issue a new CSRF token");
    assert_eq!(app.me(&client).await.0, StatusCode::OK);
    assert_eq!(
        app.me_with_cookie(format!("session={}", first.token).as_bytes())
            .await,
        StatusCode::UNAUTHORIZED,
        "the old cookie must be dead"
    );
    assert_eq!(
        app.me_with_cookie(format!("session={}", second.token).as_bytes())
            .await,
        StatusCode::OK
    );
    let key_exists: bool = app
        .ctx
        .conn()
        .exists(app.ctx.session_key(&first.id()))
        .await
        .expect("exists");
    assert!(!key_exists);
    assert_eq!(
        app.ctx.store.tombstone(&first.id()).await.expect("ledger"),
        Some(Status::Destroyed)
    );
    let old = app.events(&first.id()).await;
    assert_eq!(old.last().map(|e| e.0.as_str()), Some("destroyed"));
    assert_eq!(
        old.last().map(|e| e.1["reason"].clone()),
        Some(json!("rotated"))
    );
    let new = app.events(&second.id()).await;
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(new[0].0, "created");
    assert_eq!(new[0].1["rotated_from"], json!(first.id().as_str()));
    assert_eq!(
        new[0].1["fields"]["cart"],
        json!(["book"]),
        "same user keeps data"
    );
    assert_eq!(
        app.ctx
            .store
            .get(&second.id())
            .await
            .expect("get")
            .and_then(|s| s.get("cart").cloned()),
        Some(json!(["book"]))
    );

    let third = app.login(&client, "user", "user123").await;
    assert_ne!(third.token, second.token);
    let (status, me) = app.me(&client).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["username"], "user");
    assert_eq!(me["role"], "user");
    let data = client
        .get(app.url("/session/data/cart"))
        .send()
        .await
        .expect("GET");
    assert_eq!(
        data.status(),
        StatusCode::NOT_FOUND,
        "another user's login must not inherit the session's data"
    );
    assert_eq!(
        app.me_with_cookie(format!("session={}", second.token).as_bytes())
            .await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn wrong_passwords_and_bad_bodies_are_refused() {
    // Proves: authentication happens before any session is made: bad
    // credentials are a 401, a malformed body a 400, and neither stores
    // anything or sets a cookie.
    let app = App::start().await;
    let client = App::jar();
    for body in [
        json!({"username": "admin", "password": "wrong"}),
        json!({"username": "nobody", "password": "admin123"}),
    ] {
        let res = client
            .post(app.url("/login"))
            .json(&body)
            .send()
            .await
            .expect("POST");
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert!(set_cookie_lines(&res).is_empty());
        assert_eq!(error_code(res).await, "invalid_credentials");
    }
    let res = client
        .post(app.url("/login"))
        .body("not json")
        .send()
        .await
        .expect("POST");
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert!(app.ctx.keys().await.is_empty());
}

#[tokio::test]
async fn set_cookie_attributes_are_exactly_as_configured() {
    // Proves: the cookie carries the bare token as its value with Path=/ and
    // the configured HttpOnly, Secure, SameSite and Max-Age; Secure is on by
    // default; another configuration is followed attribute by attribute; the
    // logout cookie removes it.
    let app = App::start().await;
    let client = App::jar();
    let res = client
        .post(app.url("/login"))
        .json(&json!({"username": "admin", "password": "admin123"}))
        .send()
        .await
        .expect("login");
    let lines = set_cookie_lines(&res);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let token = session_cookie(&res, "session").expect("cookie");
    assert_eq!(
        lines[0],
        format!(
            "session={}; HttpOnly; SameSite=Lax; Secure; Path=/; Max-Age=7200",
            token.value()
        )
    );
    let c = cookie::Cookie::parse(lines[0].clone()).expect("parse");
    assert_eq!(c.secure(), Some(true), "Secure is on by default");
    assert_eq!(c.http_only(), Some(true));
    assert_eq!(c.same_site(), Some(cookie::SameSite::Lax));
    assert_eq!(c.path(), Some("/"));
    assert_eq!(c.domain(), None);
    assert_eq!(c.max_age(), Some(cookie::time::Duration::seconds(7200)));
    // The value is the token and nothing else: its hash is the live session.
    let live: bool = app
        .ctx
        .conn()
        .exists(app.ctx.session_key(&sid(c.value())))
        .await
        .expect("exists");
    assert!(live);
    let csrf = res.json::<Value>().await.expect("json")["csrf_token"]
        .as_str()
        .expect("csrf")
        .to_owned();
    let res = client
        .post(app.url("/logout"))
        .header("x-csrf-token", csrf)
        .send()
        .await
        .expect("logout");
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let gone = set_cookie_lines(&res);
    assert_eq!(gone.len(), 1);
    assert!(
        gone[0]
            .starts_with("session=; HttpOnly; SameSite=Lax; Secure; Path=/; Max-Age=0; Expires="),
        "{}",
        gone[0]
    );

    let custom = TestContext::with(|mut c| {
        c.cookie.name = "vsid".to_owned();
        c.cookie.http_only = false;
        c.cookie.secure = false;
        c.cookie.same_site = vedfolnir_sessions::config::SameSite::Strict;
        c.cookie.max_age = Duration::from_secs(60);
        c
    })
    .await;
    let app = App::serve(custom, None, app_server::routes(), None).await;
    let res = App::jar()
        .post(app.url("/login"))
        .json(&json!({"username": "user", "password": "user123"}))
        .send()
        .await
        .expect("login");
    let lines = set_cookie_lines(&res);
    let c = session_cookie(&res, "vsid").expect("vsid cookie");
    assert_eq!(
        lines,
        vec![format!(
            "vsid={}; SameSite=Strict; Path=/; Max-Age=60",
            c.value()
        )]
    );
}

// ---------------------------------------------------------------------------
// CSRF

#[tokio::test]
async fn csrf_is_enforced_on_unsafe_routes() {
    // Proves: every unsafe route but /login needs the session's own CSRF
    // token; a missing, wrong, truncated or other session's token is a 403
    // before the handler runs and writes nothing; safe methods need none.
    let app = App::start().await;
    let client = App::jar();
    let me = app.login(&client, "admin", "admin123").await;
    let other = app.login(&App::jar(), "user", "user123").await;
    let before = app.events(&me.id()).await.len();
    for bad in [
        None,
        Some("wrong"),
        Some(&other.csrf[..]),
        Some(&me.csrf[..42]),
    ] {
        let res = app.put(&client, "k", json!(1), bad).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{bad:?}");
        assert_eq!(error_code(res).await, "csrf");
        assert_eq!(
            app.post(&client, "/logout", bad).await,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            app.post(&client, "/logout-all", bad).await,
            StatusCode::FORBIDDEN
        );
        let res = client
            .post(app.url("/platform"))
            .json(&json!({"platform_connection_id": 1, "platform_name": "x",
                          "platform_type": "mastodon", "platform_instance_url": "https://x"}));
        let res = match bad {
            Some(t) => res.header("x-csrf-token", t),
            None => res,
        }
        .send()
        .await
        .expect("POST /platform");
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
    }
    assert_eq!(
        app.events(&me.id()).await.len(),
        before,
        "refused requests wrote nothing"
    );
    assert_eq!(app.me(&client).await.0, StatusCode::OK, "still logged in");
    let res = app.put(&client, "k", json!(1), Some(&me.csrf)).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let v: Value = client
        .get(app.url("/session/data/k"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(v, json!(1));
}

// ---------------------------------------------------------------------------
// Concurrency

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_puts_of_different_keys_all_survive() {
    // Proves: no lost updates through HTTP. A barrier inside the session
    // layer holds every PUT after its session was loaded until all 50 have
    // loaded the same version, so all 50 writes really contend. Each request
    // writes one `updated` event with only its own key; the store serializes
    // them by version, so all 50 keys are in the session afterwards.
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let b = barrier.clone();
    let routes = app_server::routes().layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let b = b.clone();
            async move {
                if req.method() == axum::http::Method::PUT {
                    let _ = tokio::time::timeout(Duration::from_secs(10), b.wait()).await;
                }
                next.run(req).await
            }
        },
    ));
    let app = App::serve(TestContext::new().await, None, routes, None).await;
    let client = App::jar();
    let login = app.login(&client, "admin", "admin123").await;
    let puts = (0..50).map(|i| {
        let (client, app, csrf) = (&client, &app, &login.csrf);
        async move {
            app.put(client, &format!("key{i}"), json!(i), Some(csrf))
                .await
                .status()
        }
    });
    let statuses = futures::future::join_all(puts).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::NO_CONTENT),
        "{statuses:?}"
    );
    let stored = app
        .ctx
        .store
        .get(&login.id())
        .await
        .expect("get")
        .expect("live");
    for i in 0..50 {
        assert_eq!(
            stored.get(&format!("key{i}")),
            Some(&json!(i)),
            "key{i} lost"
        );
        let v: Value = client
            .get(app.url(&format!("/session/data/key{i}")))
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("json");
        assert_eq!(v, json!(i));
    }
    let events = app.ctx.events_of(&login.id()).await;
    let updates: Vec<Value> = events
        .iter()
        .filter(|e| e["type"] == "updated")
        .map(payload)
        .collect();
    assert_eq!(updates.len(), 50);
    for u in &updates {
        assert_eq!(u["set"].as_object().map(|m| m.len()), Some(1), "{u}");
        assert_eq!(u["unset"], json!([]));
    }
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].parse().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn logout_during_an_in_flight_request_stays_a_logout() {
    // Proves: no resurrection through HTTP. A request of the session is
    // inside its handler (session loaded, a key set) when the same cookie
    // logs out; when it finishes, its write is refused (409) instead of
    // bringing the session back or starting a new one, and the cookie stays
    // dead.
    let gate = Arc::new((tokio::sync::Notify::new(), tokio::sync::Notify::new()));
    let g = gate.clone();
    let routes = app_server::routes().route(
        "/slow",
        post(move |session: Session| {
            let g = g.clone();
            async move {
                session.insert("late", true).expect("insert");
                g.0.notify_one();
                g.1.notified().await;
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let app = App::serve(TestContext::new().await, None, routes, None).await;
    let client = App::jar();
    let login = app.login(&client, "admin", "admin123").await;
    let slow = {
        let req = client
            .post(app.url("/slow"))
            .header("x-csrf-token", &login.csrf)
            .send();
        tokio::spawn(req)
    };
    gate.0.notified().await;
    assert_eq!(
        app.post(&client, "/logout", Some(&login.csrf)).await,
        StatusCode::NO_CONTENT
    );
    gate.1.notify_one();
    let res = slow.await.expect("join").expect("slow response");
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert!(
        set_cookie_lines(&res).is_empty(),
        "no new session, no cookie change"
    );
    assert_eq!(error_code(res).await, "session_ended");
    assert_eq!(app.me(&client).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        app.me_with_cookie(format!("session={}", login.token).as_bytes())
            .await,
        StatusCode::UNAUTHORIZED
    );
    let events = app.events(&login.id()).await;
    let types: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(types, ["created", "destroyed"]);
    assert_eq!(events[1].1["reason"], "logout");
    let stream = app.ctx.stream().await;
    assert_eq!(stream.len(), 2, "no other session was created: {stream:?}");
    assert!(!stream.iter().any(|e| e["payload"].contains("late")));
}

#[tokio::test]
async fn logout_all_ends_the_users_sessions_in_every_jar() {
    // Proves: logout everywhere ends every session of the user (reason
    // `logout_all`), whichever jar holds it, and no other user's.
    let app = App::start().await;
    let jars: Vec<reqwest::Client> = (0..3).map(|_| App::jar()).collect();
    let mut logins = Vec::new();
    for jar in &jars {
        logins.push(app.login(jar, "admin", "admin123").await);
    }
    let other = App::jar();
    app.login(&other, "user", "user123").await;
    assert_eq!(
        app.post(&jars[1], "/logout-all", Some(&logins[1].csrf))
            .await,
        StatusCode::NO_CONTENT
    );
    for jar in &jars {
        assert_eq!(app.me(jar).await.0, StatusCode::UNAUTHORIZED);
    }
    for l in &logins {
        let events = app.events(&l.id()).await;
        assert_eq!(
            events.last().map(|e| (e.0.as_str(), e.1["reason"].clone())),
            Some(("destroyed", json!("logout_all")))
        );
    }
    assert_eq!(app.me(&other).await.0, StatusCode::OK);
    assert!(
        app.ctx
            .store
            .user_sessions("1")
            .await
            .expect("index")
            .is_empty()
    );
    assert_eq!(
        app.ctx.store.user_sessions("2").await.expect("index").len(),
        1
    );
}

// ---------------------------------------------------------------------------
// Logout, platform

#[tokio::test]
async fn logout_destroys_and_platform_switch_is_an_event() {
    // Proves: /platform appends one `platform_switched` event and /me shows
    // the platform; /logout records `destroyed{logout}`, clears the cookie,
    // and the session is gone.
    let app = App::start().await;
    let client = App::jar();
    let login = app.login(&client, "admin", "admin123").await;
    let platform = json!({
        "platform_connection_id": 123, "platform_name": "My Platform",
        "platform_type": "mastodon", "platform_instance_url": "https://mastodon.example.com"
    });
    let res = client
        .post(app.url("/platform"))
        .header("x-csrf-token", &login.csrf)
        .json(&platform)
        .send()
        .await
        .expect("POST /platform");
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["platform_name"], "My Platform");
    let (_, me) = app.me(&client).await;
    assert_eq!(me["platform_connection_id"], 123);
    assert_eq!(me["platform_instance_url"], "https://mastodon.example.com");
    assert_eq!(me["csrf_token"], json!(login.csrf));
    for k in ["created_at", "last_activity", "email"] {
        assert!(me[k].is_string(), "{k}: {me}");
    }
    let events = app.events(&login.id()).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1].0, "platform_switched");
    assert_eq!(events[1].1, platform);

    assert_eq!(
        app.post(&client, "/logout", Some(&login.csrf)).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.me(&client).await.0, StatusCode::UNAUTHORIZED);
    let events = app.events(&login.id()).await;
    assert_eq!(events.last().map(|e| e.0.as_str()), Some("destroyed"));
    assert_eq!(
        events.last().map(|e| e.1["reason"].clone()),
        Some(json!("logout"))
    );
}

// ---------------------------------------------------------------------------
// Bad cookies, bad input

#[tokio::test]
async fn forged_truncated_and_binary_cookies_never_get_a_500() {
    // Proves: an unknown, forged, truncated, padded, oversized, non-UTF-8 or
    // ended cookie is treated as no session: 401 on /me, 403 on unsafe routes,
    // a fresh session (new cookie) on login, never a 500, and nothing stored.
    let app = App::start().await;
    let client = App::jar();
    let real = app.login(&client, "admin", "admin123").await;
    let ended = app.login(&App::jar(), "user", "user123").await;
    app.ctx
        .store
        .destroy(&ended.id(), vedfolnir_sessions::DestroyReason::Admin)
        .await
        .expect("destroy");
    let stream_before = app.ctx.stream_len().await;
    let mut flipped = real.token.clone().into_bytes();
    flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
    let cookies: Vec<Vec<u8>> = vec![
        format!("session={}", Token::generate().expose()).into_bytes(),
        format!("session={}", &real.token[..42]).into_bytes(),
        format!("session={}A", real.token).into_bytes(),
        [b"session=".as_slice(), &flipped].concat(),
        format!("session={}", ended.token).into_bytes(),
        b"session=".to_vec(),
        b"session=%%%;;;==".to_vec(),
        b"session=\xff\xfe\x80binary".to_vec(),
        b"\xc3\x28session=\xff".to_vec(),
        format!("session={}", "A".repeat(8000)).into_bytes(),
        format!("session=\"{}\"", Token::generate().expose()).into_bytes(),
    ];
    for c in &cookies {
        let shown = String::from_utf8_lossy(c);
        let header = reqwest::header::HeaderValue::from_bytes(c).expect("header bytes");
        let bare = App::bare();
        let me = bare
            .get(app.url("/me"))
            .header(COOKIE, header.clone())
            .send()
            .await
            .expect("GET /me");
        assert_eq!(me.status(), StatusCode::UNAUTHORIZED, "{shown}");
        assert!(set_cookie_lines(&me).is_empty(), "{shown}");
        let put = bare
            .put(app.url("/session/data/x"))
            .header(COOKIE, header.clone())
            .header("x-csrf-token", &real.csrf)
            .json(&json!(1))
            .send()
            .await
            .expect("PUT");
        assert_eq!(put.status(), StatusCode::FORBIDDEN, "{shown}");
        let health = bare
            .get(app.url("/healthz"))
            .header(COOKIE, header.clone())
            .send()
            .await
            .expect("GET /healthz");
        assert_eq!(health.status(), StatusCode::OK, "{shown}");
    }
    assert_eq!(
        app.ctx.stream_len().await,
        stream_before,
        "bad cookies stored nothing"
    );
    for c in &cookies {
        let res = App::bare()
            .post(app.url("/login"))
            .header(
                COOKIE,
                reqwest::header::HeaderValue::from_bytes(c).expect("header bytes"),
            )
            .json(&json!({"username": "admin", "password": "admin123"}))
            .send()
            .await
            .expect("login");
        assert_eq!(res.status(), StatusCode::OK);
        let fresh = session_cookie(&res, "session").expect("a fresh cookie");
        assert!(Token::parse(fresh.value()).is_ok());
        assert_ne!(fresh.value().as_bytes(), &c[8.min(c.len())..]);
        let events = app.events(&sid(fresh.value())).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].0, "created");
        assert!(
            events[0].1.get("rotated_from").is_none(),
            "a fresh session, not a rotation of a forged one"
        );
    }
    assert_eq!(
        app.me(&client).await.0,
        StatusCode::OK,
        "the real one lives on"
    );
}

#[tokio::test]
async fn requests_that_write_nothing_store_nothing() {
    // Proves: no session bloat. Anonymous reads, health checks and refused
    // requests create no session and set no cookie; reads of a live session
    // (inside the touch interval) and writes of an unchanged value append no
    // event; a real change appends exactly one.
    let app = App::start().await;
    let client = App::jar();
    for path in ["/", "/healthz", "/me", "/session/data/theme", "/nowhere"] {
        let res = client.get(app.url(path)).send().await.expect("GET");
        assert!(res.status().as_u16() < 500, "{path}");
        assert!(set_cookie_lines(&res).is_empty(), "{path} set a cookie");
    }
    let res = app.put(&client, "theme", json!("dark"), None).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert!(set_cookie_lines(&res).is_empty());
    assert!(
        app.ctx.keys().await.is_empty(),
        "{:?}",
        app.ctx.keys().await
    );
    assert_eq!(app.ctx.stream_len().await, 0);

    let login = app.login(&client, "admin", "admin123").await;
    let after_login = app.ctx.stream_len().await;
    for _ in 0..3 {
        let res = client.get(app.url("/me")).send().await.expect("GET /me");
        assert_eq!(res.status(), StatusCode::OK);
        assert!(set_cookie_lines(&res).is_empty());
    }
    assert_eq!(app.ctx.stream_len().await, after_login);
    let res = app
        .put(&client, "theme", json!("dark"), Some(&login.csrf))
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.ctx.stream_len().await, after_login + 1);
    let res = app
        .put(&client, "theme", json!("dark"), Some(&login.csrf))
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        app.ctx.stream_len().await,
        after_login + 1,
        "an unchanged value is not written again"
    );
    let events = app.events(&login.id()).await;
    assert_eq!(
        events.last().map(|e| e.1.clone()),
        Some(json!({"set": {"theme": "dark"}, "unset": []}))
    );
}

#[tokio::test]
async fn data_routes_refuse_session_fields() {
    // Proves: the data routes cannot be used to change identity or
    // privileges (user_id, role, csrf_token, …): 400, nothing written.
    let app = App::start().await;
    let client = App::jar();
    let login = app.login(&client, "user", "user123").await;
    let before = app.ctx.stream_len().await;
    for key in [
        "role",
        "user_id",
        "csrf_token",
        "_fingerprint",
        "_version",
        "a%20b",
    ] {
        let res = app
            .put(&client, key, json!("admin"), Some(&login.csrf))
            .await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{key}");
    }
    assert_eq!(app.ctx.stream_len().await, before);
    assert_eq!(app.me(&client).await.1["role"], "user");
}

// ---------------------------------------------------------------------------
// Secrets

/// Every key of the namespace with everything it holds, as text.
async fn dump(ctx: &TestContext) -> String {
    let mut conn = ctx.conn();
    let mut out = String::new();
    for key in ctx.keys().await {
        out.push_str(&key);
        out.push('\n');
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("TYPE");
        let values: Vec<String> = match kind.as_str() {
            "string" => vec![conn.get(&key).await.expect("GET")],
            "zset" => conn.zrange_withscores(&key, 0, -1).await.expect("ZRANGE"),
            "hash" => conn.hgetall(&key).await.expect("HGETALL"),
            "set" => conn.smembers(&key).await.expect("SMEMBERS"),
            "list" => conn.lrange(&key, 0, -1).await.expect("LRANGE"),
            "stream" => ctx
                .stream()
                .await
                .into_iter()
                .flat_map(|e| e.into_iter().flat_map(|(k, v)| [k, v]))
                .collect(),
            other => panic!("unexpected key type {other} for {key}"),
        };
        for v in values {
            out.push_str(&v);
            out.push('\n');
        }
    }
    out
}

#[tokio::test]
async fn the_cookie_token_is_stored_and_logged_nowhere() {
    // Proves invariant 5 (docs/design.md) through the web layer: after logins, rotations,
    // writes, a platform switch, logout-all and a fingerprint-free logout,
    // no Redis key, value, index or stream entry, and no log line, contains a
    // cookie token (as text or as hex of its bytes); the session ids (the
    // hashes) are there, so the scan did look at the data.
    let app = App::start().await;
    let a = App::jar();
    let b = App::jar();
    let mut tokens = Vec::new();
    let l1 = app.login(&a, "admin", "admin123").await;
    tokens.push(l1.token.clone());
    assert_eq!(
        app.put(&a, "theme", json!("dark"), Some(&l1.csrf))
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    let l2 = app.login(&a, "admin", "admin123").await;
    tokens.push(l2.token.clone());
    let res = a
        .post(app.url("/platform"))
        .header("x-csrf-token", &l2.csrf)
        .json(&json!({"platform_connection_id": 7, "platform_name": "P",
                      "platform_type": "pixelfed", "platform_instance_url": "https://p"}))
        .send()
        .await
        .expect("platform");
    assert_eq!(res.status(), StatusCode::OK);
    let l3 = app.login(&b, "user", "user123").await;
    tokens.push(l3.token.clone());
    let l4 = app.login(&App::jar(), "admin", "admin123").await;
    tokens.push(l4.token.clone());
    assert_eq!(
        app.post(&b, "/logout", Some(&l3.csrf)).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.post(&a, "/logout-all", Some(&l2.csrf)).await,
        StatusCode::NO_CONTENT
    );

    let stored = dump(&app.ctx).await;
    let logged = logs().text();
    for l in [&l1, &l2, &l3, &l4] {
        assert!(
            stored.contains(l.id().as_str()),
            "the scan must see the session ids"
        );
    }
    assert!(
        logged.contains(l2.id().as_str()),
        "the logs must have been captured"
    );
    for t in &tokens {
        let raw = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, t)
            .expect("base64url");
        for needle in [t.clone(), hex::encode(&raw)] {
            assert!(!stored.contains(&needle), "a token is stored in Redis");
            assert!(!logged.contains(&needle), "a token was logged");
        }
    }
}

// ---------------------------------------------------------------------------
// Fingerprint

#[tokio::test]
async fn fingerprint_mismatch_ends_the_session() {
    // Proves: with fingerprinting on, the same browser moving within its /24
    // keeps its session; another User-Agent or network with the same cookie
    // ends it (`destroyed{fingerprint}`), gets an anonymous answer and a
    // removal cookie, and the session stays ended for the original client.
    let fingerprint = Fingerprint::user_agent()
        .with_ip_prefix(24, 64)
        .with_client_ip_header(HeaderName::from_static("x-forwarded-for"));
    let app = App::serve(
        TestContext::new().await,
        Some(fingerprint),
        app_server::routes(),
        None,
    )
    .await;
    let client = App::bare();
    let send = |token: String, ua: &'static str, ip: &'static str| {
        let req = client
            .get(app.url("/me"))
            .header(COOKIE, format!("session={token}"))
            .header("user-agent", ua)
            .header("x-forwarded-for", ip);
        async move { req.send().await.expect("GET /me") }
    };
    let login = |ua: &'static str, ip: &'static str| {
        let req = client
            .post(app.url("/login"))
            .header("user-agent", ua)
            .header("x-forwarded-for", ip)
            .json(&json!({"username": "admin", "password": "admin123"}));
        async move {
            let res = req.send().await.expect("login");
            assert_eq!(res.status(), StatusCode::OK);
            session_cookie(&res, "session")
                .expect("cookie")
                .value()
                .to_owned()
        }
    };
    let token = login("Firefox/140", "198.51.100.7").await;
    let stored = app
        .ctx
        .store
        .get(&sid(&token))
        .await
        .expect("get")
        .expect("live");
    let bound = stored
        .get("_fingerprint")
        .and_then(Value::as_str)
        .expect("bound at login")
        .to_owned();
    assert_eq!(bound.len(), 64);
    assert!(!bound.contains("198.51") && !bound.contains("Firefox"));
    assert_eq!(
        send(token.clone(), "Firefox/140", "198.51.100.7")
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        send(token.clone(), "Firefox/140", "10.1.1.1, 198.51.100.200")
            .await
            .status(),
        StatusCode::OK,
        "same /24 behind the trusted proxy"
    );
    let stolen = send(token.clone(), "curl/8", "198.51.100.7").await;
    assert_eq!(stolen.status(), StatusCode::UNAUTHORIZED);
    let removal = set_cookie_lines(&stolen);
    assert!(
        removal.len() == 1 && removal[0].contains("Max-Age=0"),
        "{removal:?}"
    );
    assert_eq!(
        send(token.clone(), "Firefox/140", "198.51.100.7")
            .await
            .status(),
        StatusCode::UNAUTHORIZED,
        "the session stays ended"
    );
    let events = app.events(&sid(&token)).await;
    assert_eq!(
        events.last().map(|e| (e.0.as_str(), e.1["reason"].clone())),
        Some(("destroyed", json!("fingerprint")))
    );

    let token = login("Firefox/140", "198.51.100.7").await;
    assert_eq!(
        send(token.clone(), "Firefox/140", "203.0.113.7")
            .await
            .status(),
        StatusCode::UNAUTHORIZED,
        "another network"
    );
    let events = app.events(&sid(&token)).await;
    assert_eq!(
        events.last().map(|e| e.1["reason"].clone()),
        Some(json!("fingerprint"))
    );
}

// ---------------------------------------------------------------------------
// Redis unreachable

/// A TCP proxy in front of Redis that the test can cut.
struct Proxy {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(listen: SocketAddr, upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(listen).await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    () = s.cancelled() => break,
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { continue };
                        conns.spawn(async move {
                            if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            }
                        });
                    }
                }
            }
            drop(listener);
            conns.shutdown().await;
        });
        Proxy { addr, stop, task }
    }

    /// Closes the listener and every proxied connection.
    async fn cut(self) -> SocketAddr {
        self.stop.cancel();
        self.task.await.expect("proxy task");
        self.addr
    }
}

/// A proxy in front of the test Redis, and a context whose store goes
/// through it (with a short command timeout).
async fn behind_proxy(
    tweak: impl FnOnce(vedfolnir_sessions::Config) -> vedfolnir_sessions::Config,
) -> (Proxy, SocketAddr, TestContext) {
    let url = url::Url::parse(&vedfolnir_tests::redis_url()).expect("redis url");
    let upstream =
        tokio::net::lookup_host((url.host_str().expect("host"), url.port().unwrap_or(6379)))
            .await
            .expect("resolve redis")
            .next()
            .expect("an address");
    let proxy = Proxy::start("127.0.0.1:0".parse().expect("addr"), upstream).await;
    let mut proxied = url.clone();
    proxied.set_ip_host(proxy.addr.ip()).expect("host");
    proxied.set_port(Some(proxy.addr.port())).expect("port");
    let ctx = TestContext::with(|c| {
        let mut c = c.with_redis(RedisTarget::parse("REDIS_URL", proxied.as_str()).expect("url"));
        c.redis_timeout = Duration::from_millis(500);
        tweak(c)
    })
    .await;
    (proxy, upstream, ctx)
}

#[tokio::test]
async fn redis_unreachable_is_a_503_never_an_empty_session() {
    // Proves: while Redis cannot be reached and the store has no audit
    // fallback, a request with a session cookie gets a 503 with a clear JSON
    // body (not an anonymous 401, not a new session, no cookie change);
    // requests without a cookie that write nothing still work; once Redis is
    // back the same cookie is the same session.
    let (proxy, upstream, ctx) = behind_proxy(|c| c).await;
    let app = App::serve(ctx, None, app_server::routes(), None).await;
    let client = App::jar();
    let login = app.login(&client, "admin", "admin123").await;
    assert_eq!(app.me(&client).await.0, StatusCode::OK);

    let addr = proxy.cut().await;
    let res = client.get(app.url("/me")).send().await.expect("GET /me");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(set_cookie_lines(&res).is_empty());
    assert_eq!(
        res.headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap_or_default()),
        Some("1")
    );
    let body: Value = res.json().await.expect("json body");
    assert_eq!(body["error"], "session_store_unavailable");
    assert!(
        !body.to_string().to_lowercase().contains("redis"),
        "nothing internal: {body}"
    );
    let res = app.put(&client, "k", json!(1), Some(&login.csrf)).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let res = App::bare()
        .get(app.url("/me"))
        .send()
        .await
        .expect("GET /me");
    assert_eq!(
        res.status(),
        StatusCode::UNAUTHORIZED,
        "no cookie, no store call"
    );

    let _proxy = Proxy::start(addr, upstream).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, me) = app.me(&client).await;
        if status == StatusCode::OK {
            assert_eq!(me["username"], "admin");
            assert_eq!(me["csrf_token"], json!(login.csrf), "the same session");
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            tokio::time::Instant::now() < deadline,
            "redis did not come back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The store of `ctx` with a fresh, migrated SQLite audit database attached
/// (`DB_SESSION_SYNC` and `DB_SESSION_FALLBACK` are on by default).
async fn with_audit(ctx: &TestContext) -> (SessionStore, vedfolnir_tests::db::TestDb) {
    let db = vedfolnir_tests::db::TestDb::new(vedfolnir_tests::db::Backend::Sqlite).await;
    let sink = vedfolnir_sessions::audit::AuditSink::new(
        db.db.clone(),
        ctx.config.session_timeout,
        ctx.config.event_stream.clone(),
    );
    (ctx.store.clone().with_audit(sink), db)
}

#[tokio::test]
async fn redis_unreachable_with_the_fallback_serves_from_the_audit_database() {
    // Proves: with the audit database attached and DB_SESSION_FALLBACK on,
    // a session cookie keeps working while Redis is unreachable (the store
    // answers from the audit snapshot): same user, same CSRF token, no new
    // cookie; and with DB_SESSION_FALLBACK off the same outage is a 503.
    let (proxy, _upstream, ctx) = behind_proxy(|c| c).await;
    let (store, _db) = with_audit(&ctx).await;
    let app = App::serve(ctx, None, app_server::routes(), Some(store)).await;
    let client = App::jar();
    let login = app.login(&client, "admin", "admin123").await;
    proxy.cut().await;
    let res = client.get(app.url("/me")).send().await.expect("GET /me");
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "served from the audit database"
    );
    assert!(set_cookie_lines(&res).is_empty());
    let me: Value = res.json().await.expect("json");
    assert_eq!(me["username"], "admin");
    assert_eq!(me["csrf_token"], json!(login.csrf));

    let (proxy, _upstream, ctx) = behind_proxy(|mut c| {
        c.db_fallback = false;
        c
    })
    .await;
    let (store, _db) = with_audit(&ctx).await;
    let app = App::serve(ctx, None, app_server::routes(), Some(store)).await;
    let client = App::jar();
    app.login(&client, "admin", "admin123").await;
    proxy.cut().await;
    assert_eq!(app.me(&client).await.0, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn the_cookie_token_is_in_no_audit_database_row() {
    // Proves invariant 5 (docs/design.md) for the audit database: with every mutation
    // committed to it (DB_SESSION_SYNC) and the stream drained into it by
    // the audit consumer, no row of session_events, session_snapshots or
    // dead_letters contains a cookie token, while the session ids are there.
    use sea_orm::EntityTrait as _;
    use vedfolnir_sessions::audit::entity::{dead_letters, session_events, session_snapshots};

    let ctx = TestContext::new().await;
    let (store, db) = with_audit(&ctx).await;
    let config = ctx.config.clone();
    let app = App::serve(ctx, None, app_server::routes(), Some(store)).await;
    let a = App::jar();
    let l1 = app.login(&a, "admin", "admin123").await;
    assert_eq!(
        app.put(&a, "theme", json!("dark"), Some(&l1.csrf))
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    let l2 = app.login(&a, "admin", "admin123").await;
    let b = App::jar();
    let l3 = app.login(&b, "user", "user123").await;
    assert_eq!(
        app.post(&b, "/logout", Some(&l3.csrf)).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.post(&a, "/logout-all", Some(&l2.csrf)).await,
        StatusCode::NO_CONTENT
    );

    // The worker's path too: drain the stream into the same database.
    let sink = vedfolnir_sessions::audit::AuditSink::new(
        db.db.clone(),
        config.session_timeout,
        config.event_stream.clone(),
    );
    let consumer_config = vedfolnir_sessions::audit::ConsumerConfig {
        block: Duration::from_millis(20),
        ..vedfolnir_sessions::audit::ConsumerConfig::default()
    };
    let mut consumer =
        vedfolnir_sessions::audit::AuditConsumer::new(&config, sink, consumer_config)
            .await
            .expect("consumer");
    consumer.ensure_group().await.expect("group");
    let stop = CancellationToken::new();
    while consumer.step(&stop).await.expect("step") > 0 {}

    let events = session_events::Entity::find()
        .all(&db.db)
        .await
        .expect("events");
    let snapshots = session_snapshots::Entity::find()
        .all(&db.db)
        .await
        .expect("snapshots");
    let dead = dead_letters::Entity::find()
        .all(&db.db)
        .await
        .expect("dead");
    assert!(dead.is_empty(), "{dead:?}");
    assert_eq!(
        events.len() as u64,
        app.ctx.stream_len().await,
        "every event reached the audit database"
    );
    let rows = format!("{events:?}\n{snapshots:?}\n{dead:?}");
    for l in [&l1, &l2, &l3] {
        assert!(rows.contains(l.id().as_str()), "the session ids are there");
        let raw =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &l.token)
                .expect("base64url");
        for needle in [l.token.clone(), hex::encode(&raw)] {
            assert!(!rows.contains(&needle), "a token is in the audit database");
        }
    }
}

// ---------------------------------------------------------------------------
// Degraded modes and concurrent writers, through the example app

#[tokio::test]
async fn with_the_audit_database_and_no_worker_a_logout_is_final() {
    // Proves: the example app's default set-up (the audit database attached,
    // no worker running) keeps a logout a logout: the old cookie answers 401
    // on /me, and with its old CSRF token it cannot log the user out
    // everywhere (403). Before, the store took every miss for a recovery
    // and served the logged-out session from its snapshot.
    let ctx = TestContext::new().await;
    let (store, _db) = with_audit(&ctx).await;
    let app = App::serve(ctx, None, app_server::routes(), Some(store)).await;
    let client = App::jar();
    let other = App::jar();
    let elsewhere = app.login(&other, "admin", "admin123").await;
    let login = app.login(&client, "admin", "admin123").await;
    assert_eq!(
        app.post(&client, "/logout", Some(&login.csrf)).await,
        StatusCode::NO_CONTENT
    );
    let cookie = format!("session={}", login.token);
    assert_eq!(
        app.me_with_cookie(cookie.as_bytes()).await,
        StatusCode::UNAUTHORIZED
    );
    let res = App::bare()
        .post(app.url("/logout-all"))
        .header(COOKIE, &cookie)
        .header("x-csrf-token", &login.csrf)
        .send()
        .await
        .expect("POST /logout-all");
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        app.me(&other).await.0,
        StatusCode::OK,
        "{}",
        elsewhere.token.len()
    );
}

/// Sends `n` requests at once, each with `cookie` and `csrf`.
async fn at_once(
    n: usize,
    req: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    cookie: &str,
    csrf: &str,
) -> Vec<(StatusCode, Value)> {
    let client = App::bare();
    let sends = (0..n).map(|_| {
        req(&client)
            .header(COOKIE, cookie)
            .header("x-csrf-token", csrf)
            .send()
    });
    let mut out = Vec::new();
    for res in futures::future::join_all(sends).await {
        let res = res.expect("request");
        let status = res.status();
        out.push((status, res.json().await.unwrap_or(Value::Null)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_read_modify_writes_are_refused_never_lost() {
    // Proves: the docs' old `visits` pattern (read a counter, write it plus
    // one) hit by twenty concurrent requests of one session loses nothing
    // silently: every request that succeeded was told a distinct value, the
    // counter ends at the number of successes, and the others were refused
    // with 409 `session_conflict`. Before, 17 of 20 increments were lost
    // while their clients were told they had counted.
    let routes = app_server::routes().route(
        "/visit",
        post(|session: Session| async move {
            let n = session.get::<i64>("visits")?.unwrap_or(0) + 1;
            session.insert("visits", n)?;
            Ok::<_, vedfolnir_sessions::web::SessionError>(axum::Json(json!(n)))
        }),
    );
    let app = App::serve(TestContext::new().await, None, routes, None).await;
    let login = app.login(&App::jar(), "admin", "admin123").await;
    let cookie = format!("session={}", login.token);
    let results = at_once(20, |c| c.post(app.url("/visit")), &cookie, &login.csrf).await;
    let mut told: Vec<i64> = Vec::new();
    for (status, body) in &results {
        match *status {
            StatusCode::OK => told.push(body.as_i64().expect("a number")),
            StatusCode::CONFLICT => assert_eq!(body["error"], "session_conflict"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(!told.is_empty());
    let mut distinct = told.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        told.len(),
        "two requests were told {told:?}"
    );
    let s = app
        .ctx
        .store
        .get(&login.id())
        .await
        .expect("get")
        .expect("live");
    assert_eq!(s.get("visits"), Some(&json!(told.len())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_through_the_example_count_every_one() {
    // Proves: POST /session/incr/{key} (Session::increment) and its
    // ?via=modify form, twenty times at once on one session each, count
    // every request: the counters end at twenty, every response is a
    // distinct JSON number, and the route needs the CSRF token.
    let app = App::start().await;
    let login = app.login(&App::jar(), "admin", "admin123").await;
    let cookie = format!("session={}", login.token);
    for (key, path) in [
        ("hits", "/session/incr/hits"),
        ("views", "/session/incr/views?via=modify"),
    ] {
        let results = at_once(20, |c| c.post(app.url(path)), &cookie, &login.csrf).await;
        let mut told: Vec<i64> = results
            .iter()
            .map(|(status, body)| {
                assert_eq!(*status, StatusCode::OK, "{body}");
                body.as_i64().expect("a JSON number")
            })
            .collect();
        told.sort_unstable();
        assert_eq!(told, (1..=20).collect::<Vec<_>>(), "{key}");
        let s = app
            .ctx
            .store
            .get(&login.id())
            .await
            .expect("get")
            .expect("live");
        assert_eq!(s.get(key), Some(&json!(20)));
    }
    let res = App::bare()
        .post(app.url("/session/incr/hits"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("POST");
    assert_eq!(res.status(), StatusCode::FORBIDDEN, "CSRF like every write");
    let res = App::bare()
        .post(app.url("/session/incr/hits"))
        .header(COOKIE, &cookie)
        .header("x-csrf-token", &login.csrf)
        .json(&json!({"by": 5}))
        .send()
        .await
        .expect("POST");
    assert_eq!(res.json::<Value>().await.expect("json"), json!(25));
}

#[tokio::test]
async fn user_input_is_logged_escaped_and_session_data_is_never_cached() {
    // Proves: a failed login's user name reaches the log escaped (a newline
    // cannot forge a line) and bounded (a 2 MB name is not logged whole);
    // every response carrying session data says Cache-Control: no-store.
    let app = App::start().await;
    let client = App::jar();
    let forged = "mallory\nINFO forged: admin logged in";
    let res = client
        .post(app.url("/login"))
        .json(&json!({"username": forged, "password": "x"}))
        .send()
        .await
        .expect("POST /login");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let huge = "A".repeat(2 * 1024 * 1024 - 64);
    let res = client
        .post(app.url("/login"))
        .json(&json!({"username": huge, "password": "x"}))
        .send()
        .await
        .expect("POST /login");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let text = logs().text();
    assert!(
        text.contains(r"mallory\nINFO forged"),
        "the name is logged escaped"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("INFO forged")),
        "no forged line"
    );
    assert!(!text.contains(&"A".repeat(100)), "a huge name is cut");
    let login = app.login(&client, "admin", "admin123").await;
    let res = client.get(app.url("/me")).send().await.expect("GET /me");
    assert_eq!(
        res.headers().get("cache-control").map(|v| v.as_bytes()),
        Some(&b"no-store"[..])
    );
    let res = app.put(&client, "k", json!(1), Some(&login.csrf)).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let res = client
        .get(app.url("/session/data/k"))
        .send()
        .await
        .expect("GET");
    assert_eq!(
        res.headers().get("cache-control").map(|v| v.as_bytes()),
        Some(&b"no-store"[..])
    );
    assert!(
        app_server::loggable("a\u{1b}[31mb").contains(r"\u{1b}"),
        "escape codes are escaped"
    );
}
