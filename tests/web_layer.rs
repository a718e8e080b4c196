//! The session layer with routers of its own, against the real Redis: what
//! the layer writes (and does not), rotation from an anonymous session,
//! error responses, size limits, CSRF options and the sliding cookie.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderName, StatusCode};
use axum::routing::{get, post};
use common::TestContext;
use serde_json::{Value, json};
use vedfolnir_sessions::web::{CsrfPolicy, Session, SessionError, SessionLayer};
use vedfolnir_sessions::{NewSession, SessionId, Status, Token};

struct Served {
    ctx: TestContext,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Served {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

async fn serve(ctx: TestContext, app: Router) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Served { ctx, addr, server }
}

fn routes() -> Router {
    Router::new()
        .route(
            "/visit",
            get(|s: Session| async move {
                let n = s.get::<u64>("visits")?.unwrap_or(0) + 1;
                s.insert("visits", n)?;
                Ok::<_, SessionError>(n.to_string())
            }),
        )
        .route(
            "/peek",
            get(|s: Session| async move { axum::Json(Value::Object(s.fields())) }),
        )
        .route(
            "/seed",
            get(|s: Session| async move {
                s.insert("a", 0)?;
                s.insert("b", 0)?;
                Ok::<_, SessionError>(())
            }),
        )
        .route(
            "/change",
            get(|s: Session| async move {
                s.insert("a", 1)?;
                s.insert("same", "x")?;
                let old: Option<u64> = s.remove("b")?;
                Ok::<_, SessionError>(format!("{old:?}"))
            }),
        )
        .route(
            "/typed",
            get(|s: Session| async move {
                s.insert("name", "not a number")?;
                let n: Option<u64> = s.get("name")?;
                Ok::<_, SessionError>(format!("{n:?}"))
            }),
        )
        .route(
            "/reserved",
            get(|s: Session| async move {
                s.insert("csrf_token", "mine")?;
                Ok::<_, SessionError>(())
            }),
        )
        .route(
            "/fail",
            get(|s: Session| async move {
                s.insert("half", "done").expect("insert");
                StatusCode::INTERNAL_SERVER_ERROR
            }),
        )
        .route(
            "/big",
            get(|s: Session| async move {
                s.insert("blob", "x".repeat(2000))?;
                Ok::<_, SessionError>(())
            }),
        )
        .route(
            "/login/{uid}",
            post(|s: Session, Path(uid): Path<i64>| async move {
                s.login(NewSession::for_user(uid, format!("user{uid}")).with("role", "user"))
                    .await?;
                Ok::<_, SessionError>(axum::Json(json!({"csrf": s.csrf_token()})))
            }),
        )
        .route(
            "/elevate",
            post(|s: Session| async move {
                s.insert("role", "admin")?;
                s.rotate().await?;
                Ok::<_, SessionError>(axum::Json(json!({"csrf": s.csrf_token()})))
            }),
        )
        .route(
            "/whoami",
            get(|s: Session| async move {
                let as_number = s.user_id_as::<i64>()?;
                Ok::<_, SessionError>(axum::Json(
                    json!({"user": s.user_id(), "as_number": as_number}),
                ))
            }),
        )
        .route("/hooks/{name}", post(|| async { "hook" }))
        .route("/other", post(|| async { "other" }))
}

async fn start(ctx: TestContext, csrf: CsrfPolicy) -> Served {
    let layer = SessionLayer::new(ctx.store.clone()).with_csrf(csrf);
    let app = routes().layer(layer);
    serve(ctx, app).await
}

async fn start_default() -> Served {
    start(
        TestContext::new().await,
        CsrfPolicy::default().exempt("/login/*"),
    )
    .await
}

fn jar() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .expect("client")
}

fn token_of(res: &reqwest::Response) -> Option<String> {
    res.headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| cookie::Cookie::parse(v.to_str().ok()?.to_owned()).ok())
        .find(|c| c.name() == "session")
        .map(|c| c.value().to_owned())
}

fn sid(token: &str) -> SessionId {
    Token::parse(token).expect("token").session_id()
}

async fn payloads(ctx: &TestContext, id: &SessionId) -> Vec<(String, Value)> {
    ctx.events_of(id)
        .await
        .into_iter()
        .map(|e| {
            (
                e["type"].clone(),
                serde_json::from_str(&e["payload"]).expect("payload"),
            )
        })
        .collect()
}

#[tokio::test]
async fn an_anonymous_write_creates_one_session_then_writes_diffs() {
    // Proves: the first write of an anonymous request creates the session
    // (one `created` event with the written keys and a CSRF token) and sets
    // the cookie; the next request appends one `updated` event carrying only
    // the changed key.
    let s = start_default().await;
    let client = jar();
    let res = client.get(s.url("/visit")).send().await.expect("GET");
    assert_eq!(res.text().await.expect("body"), "1");
    let keys = s.ctx.keys().await;
    assert!(!keys.is_empty());
    let stream = s.ctx.stream().await;
    assert_eq!(stream.len(), 1);
    let id: SessionId = stream[0]["session_id"].parse().expect("id");
    let res = client.get(s.url("/visit")).send().await.expect("GET");
    assert_eq!(res.text().await.expect("body"), "2");
    let events = payloads(&s.ctx, &id).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].0, "created");
    assert_eq!(events[0].1["fields"]["visits"], 1);
    assert_eq!(
        events[0].1["fields"]["csrf_token"].as_str().map(str::len),
        Some(43)
    );
    assert_eq!(
        events[1],
        (
            "updated".to_owned(),
            json!({"set": {"visits": 2}, "unset": []})
        )
    );
}

#[tokio::test]
async fn one_updated_event_carries_sets_and_unsets() {
    // Proves: a request that sets some keys and removes another appends
    // exactly one `updated` event with exactly those keys.
    let s = start_default().await;
    let client = jar();
    client.get(s.url("/seed")).send().await.expect("seed");
    let res = client.get(s.url("/change")).send().await.expect("change");
    assert_eq!(res.text().await.expect("body"), "Some(0)");
    let id: SessionId = s.ctx.stream().await[0]["session_id"].parse().expect("id");
    let events = payloads(&s.ctx, &id).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        events[1].1,
        json!({"set": {"a": 1, "same": "x"}, "unset": ["b"]})
    );
    let peek: Value = client
        .get(s.url("/peek"))
        .send()
        .await
        .expect("peek")
        .json()
        .await
        .expect("json");
    assert_eq!(peek["a"], 1);
    assert!(peek.get("b").is_none());
    assert_eq!(s.ctx.stream_len().await, 2, "peeking wrote nothing");
}

#[tokio::test]
async fn login_from_an_anonymous_session_rotates_it() {
    // Proves: the fixation defence also covers an anonymous session that
    // already has a cookie (one an attacker could have planted): login moves
    // to a new id, tombstones the old one (`rotated`), carries the anonymous
    // data over for the same person, and a later login as another user
    // carries nothing over.
    let s = start_default().await;
    let client = jar();
    let res = client.get(s.url("/visit")).send().await.expect("visit");
    let planted = token_of(&res).expect("anonymous cookie");
    let res = client.post(s.url("/login/7")).send().await.expect("login");
    assert_eq!(res.status(), StatusCode::OK);
    let fresh = token_of(&res).expect("new cookie");
    assert_ne!(fresh, planted);
    assert_eq!(
        s.ctx.store.tombstone(&sid(&planted)).await.expect("ledger"),
        Some(Status::Destroyed)
    );
    let old = payloads(&s.ctx, &sid(&planted)).await;
    assert_eq!(
        old.last().map(|e| e.1.clone()),
        Some(json!({"reason": "rotated"}))
    );
    let session = s
        .ctx
        .store
        .get(&sid(&fresh))
        .await
        .expect("get")
        .expect("live");
    assert_eq!(session.get("visits"), Some(&json!(1)));
    // The stored user id keeps its JSON type: 7 stays a number.
    assert_eq!(session.user_id(), Some(json!(7)));
    let who: Value = client
        .get(s.url("/whoami"))
        .send()
        .await
        .expect("whoami")
        .json()
        .await
        .expect("json");
    assert_eq!(who, json!({"user": 7, "as_number": 7}));
    // The planted cookie no longer reaches anything.
    let res = reqwest::Client::new()
        .get(s.url("/peek"))
        .header("cookie", format!("session={planted}"))
        .send()
        .await
        .expect("peek");
    assert_eq!(res.json::<Value>().await.expect("json"), json!({}));

    let res = client.post(s.url("/login/8")).send().await.expect("login");
    let third = token_of(&res).expect("cookie");
    let session = s
        .ctx
        .store
        .get(&sid(&third))
        .await
        .expect("get")
        .expect("live");
    assert_eq!(session.user_id(), Some(json!(8)));
    assert_eq!(
        session.get("visits"),
        None,
        "another user's data is dropped"
    );
}

#[tokio::test]
async fn rotate_gives_a_new_id_and_csrf_token() {
    // Proves: `Session::rotate` (privilege change) swaps id and CSRF token,
    // keeps the fields including the request's own pending change, and
    // kills the old id.
    let s = start_default().await;
    let client = jar();
    let res = client.post(s.url("/login/3")).send().await.expect("login");
    let before = token_of(&res).expect("cookie");
    let csrf: Value = res.json().await.expect("json");
    let res = client
        .post(s.url("/elevate"))
        .header("x-csrf-token", csrf["csrf"].as_str().expect("csrf"))
        .send()
        .await
        .expect("elevate");
    assert_eq!(res.status(), StatusCode::OK);
    let after = token_of(&res).expect("new cookie");
    let new_csrf: Value = res.json().await.expect("json");
    assert_ne!(after, before);
    assert_ne!(new_csrf["csrf"], csrf["csrf"]);
    let session = s
        .ctx
        .store
        .get(&sid(&after))
        .await
        .expect("get")
        .expect("live");
    assert_eq!(session.get("role"), Some(&json!("admin")));
    assert_eq!(session.get("csrf_token"), Some(&new_csrf["csrf"]));
    assert!(s.ctx.store.get(&sid(&before)).await.expect("get").is_none());
}

#[tokio::test]
async fn a_failed_handler_writes_nothing() {
    // Proves: changes of a request whose handler answered 5xx are dropped:
    // no session, no event, no cookie.
    let s = start_default().await;
    let res = jar().get(s.url("/fail")).send().await.expect("GET");
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(token_of(&res).is_none());
    assert_eq!(s.ctx.stream_len().await, 0);
}

#[tokio::test]
async fn error_responses_say_nothing_internal() {
    // Proves: application bugs (a value of the wrong type, a reserved key)
    // and a missing layer are 500s with a fixed body, and store nothing.
    let s = start_default().await;
    for path in ["/typed", "/reserved"] {
        let res = jar().get(s.url(path)).send().await.expect("GET");
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR, "{path}");
        let body: Value = res.json().await.expect("json");
        assert_eq!(
            body,
            json!({"error": "internal", "message": "internal error"}),
            "{path}"
        );
    }
    assert_eq!(s.ctx.stream_len().await, 0);
    let bare = serve(TestContext::new().await, routes()).await;
    let res = jar().get(bare.url("/visit")).send().await.expect("GET");
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        res.json::<Value>().await.expect("json")["error"],
        "internal"
    );
}

#[tokio::test]
async fn an_oversized_session_is_a_413_and_stores_nothing() {
    // Proves: a write that would exceed SESSION_MAX_BYTES is refused with
    // 413 and leaves the session as it was.
    let ctx = TestContext::with(|c| c.with_max_bytes(1024)).await;
    let s = start(ctx, CsrfPolicy::default()).await;
    let client = jar();
    client.get(s.url("/visit")).send().await.expect("visit");
    let res = client.get(s.url("/big")).send().await.expect("big");
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        res.json::<Value>().await.expect("json")["error"],
        "session_too_large"
    );
    assert_eq!(s.ctx.stream_len().await, 1, "only the first visit");
    let res = client.get(s.url("/visit")).send().await.expect("visit");
    assert_eq!(res.text().await.expect("body"), "2");
}

#[tokio::test]
async fn csrf_exemptions_header_name_and_opt_out() {
    // Proves: prefix exemptions match only below the prefix, the header name
    // is configurable, and `CsrfPolicy::disabled` turns the check off.
    let policy = CsrfPolicy::default()
        .exempt("/login/*")
        .exempt("/hooks/*")
        .with_header(HeaderName::from_static("x-xsrf"));
    let s = start(TestContext::new().await, policy).await;
    let client = jar();
    assert_eq!(
        client
            .post(s.url("/hooks/github"))
            .send()
            .await
            .expect("hook")
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        client
            .post(s.url("/other"))
            .send()
            .await
            .expect("other")
            .status(),
        StatusCode::FORBIDDEN
    );
    let res = client.post(s.url("/login/1")).send().await.expect("login");
    let csrf: Value = res.json().await.expect("json");
    let csrf = csrf["csrf"].as_str().expect("csrf");
    let status = |h: &'static str| {
        let req = client.post(s.url("/other")).header(h, csrf).send();
        async move { req.await.expect("other").status() }
    };
    assert_eq!(status("x-csrf-token").await, StatusCode::FORBIDDEN);
    assert_eq!(status("x-xsrf").await, StatusCode::OK);

    let open = start(TestContext::new().await, CsrfPolicy::disabled()).await;
    assert_eq!(
        jar()
            .post(open.url("/other"))
            .send()
            .await
            .expect("other")
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_cookie_slides_with_the_session() {
    // Proves: a read that makes the store record activity (one `touched`
    // event, at most once per touch interval) re-sends the cookie so its
    // Max-Age slides with the session's TTL; a read inside the interval
    // writes nothing and sends no cookie.
    let ctx = TestContext::with(|c| c.with_touch_interval(Duration::from_secs(1))).await;
    let s = start(ctx, CsrfPolicy::default().exempt("/login/*")).await;
    let client = jar();
    let res = client.post(s.url("/login/1")).send().await.expect("login");
    let token = token_of(&res).expect("cookie");
    let res = client.get(s.url("/peek")).send().await.expect("peek");
    assert!(token_of(&res).is_none(), "inside the interval: no cookie");
    // A real wait: the touch interval is measured on the store's clock.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let res = client.get(s.url("/peek")).send().await.expect("peek");
    assert_eq!(token_of(&res).as_deref(), Some(token.as_str()));
    let res = client.get(s.url("/peek")).send().await.expect("peek");
    assert!(token_of(&res).is_none());
    let types: Vec<String> = payloads(&s.ctx, &sid(&token))
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(types, ["created", "touched"]);
}

#[tokio::test]
async fn a_request_traceparent_reaches_the_event_without_any_exporter() {
    // Proves: with no tracing subscriber and no OpenTelemetry provider at
    // all, the W3C `traceparent` a request came with is written into the
    // events it causes (so the audit row links to the caller's trace); a
    // header that is not a valid traceparent writes none.
    let s = start_default().await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let tp = format!("00-{trace}-b7ad6b7169203331-01");
    let res = reqwest::Client::new()
        .get(s.url("/visit"))
        .header("traceparent", &tp)
        .send()
        .await
        .expect("GET");
    assert_eq!(res.status(), StatusCode::OK);
    let res = reqwest::Client::new()
        .get(s.url("/visit"))
        .header("traceparent", "00-not-a-trace-01")
        .send()
        .await
        .expect("GET");
    assert_eq!(res.status(), StatusCode::OK);
    let stream = s.ctx.stream().await;
    assert_eq!(stream.len(), 2, "{stream:?}");
    assert_eq!(stream[0].get("traceparent"), Some(&tp));
    assert_eq!(stream[1].get("traceparent"), None);
}
