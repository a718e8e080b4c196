//! The clients: HTTP with the session cookie handled by hand, so that the
//! history records exactly which token each request carried; the recorder;
//! and the actors that run a client's planned steps (regular clients, the
//! clients sharing the counter session, the operator with the CLI).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::checker::says_session_unknown;
use crate::history::{Action, CookieChange, Op, Reply};
use crate::schedule::{COUNTER_USER, ClientPlan, Planned, STORM, Step, USERS};
use crate::system::System;

/// How long a client waits for an answer.
const HTTP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the operator waits for the CLI.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// The history as it is written, shared by every actor and the faults.
#[derive(Debug)]
pub struct Recorder {
    pub origin: Instant,
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    pub fn new(origin: Instant) -> Self {
        Recorder {
            origin,
            ops: Mutex::new(Vec::new()),
        }
    }

    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Appends an operation that completed now.
    pub fn record(
        &self,
        actor: &str,
        action: Action,
        session: Option<&str>,
        invoke: Duration,
        reply: Reply,
        final_read: bool,
    ) -> Op {
        let complete = self.now();
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let op = Op {
            id: ops.len(),
            actor: actor.to_owned(),
            action,
            session: session.map(str::to_owned),
            invoke,
            complete,
            reply,
            final_read,
        };
        ops.push(op.clone());
        op
    }

    pub fn take(&self) -> Vec<Op> {
        std::mem::take(&mut *self.ops.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A session as a client holds it.
#[derive(Debug, Clone)]
pub struct Sess {
    /// The cookie token (never recorded).
    pub token: String,
    /// `hex(sha256(token))`.
    pub sid: String,
    pub csrf: String,
}

pub fn session_id(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// An HTTP client without a cookie jar, pooling or proxies: every request
/// opens its own connection, so a refused connection means the request was
/// never sent.
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
}

/// A reply, and the new token a `Set-Cookie` carried.
pub struct Answer {
    pub reply: Reply,
    pub token: Option<String>,
}

impl Http {
    pub fn new() -> Self {
        Http {
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(HTTP_TIMEOUT)
                .connect_timeout(Duration::from_secs(2))
                .pool_max_idle_per_host(0)
                .build()
                .expect("http client"),
        }
    }

    pub async fn send(
        &self,
        base: &str,
        method: Method,
        path: &str,
        sess: Option<&Sess>,
        body: Option<&Value>,
    ) -> Answer {
        let unsafe_method = method != Method::GET;
        let mut req = self.client.request(method, format!("{base}{path}"));
        if let Some(s) = sess {
            req = req.header("cookie", format!("session={}", s.token));
            if unsafe_method {
                req = req.header("x-csrf-token", &s.csrf);
            }
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                return Answer {
                    reply: Reply::NotSent(brief(&e)),
                    token: None,
                };
            }
            Err(e) => {
                return Answer {
                    reply: Reply::Lost(brief(&e)),
                    token: None,
                };
            }
        };
        let status = res.status().as_u16();
        let (cookie, token) = cookie_change(&res, sess.map(|s| s.sid.as_str()));
        let body = match res.bytes().await {
            Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
            Err(e) => {
                return Answer {
                    reply: Reply::Lost(brief(&e)),
                    token: None,
                };
            }
        };
        Answer {
            reply: Reply::Http {
                status,
                cookie,
                body,
            },
            token,
        }
    }
}

/// A short description of a transport error.
fn brief(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() {
        "body"
    } else {
        "transport"
    };
    let mut root: &dyn std::error::Error = e;
    while let Some(s) = root.source() {
        root = s;
    }
    format!("{kind}: {root}")
}

/// What the response's `Set-Cookie` did to the `session` cookie, and the new
/// token if it set one.
fn cookie_change(res: &reqwest::Response, sent: Option<&str>) -> (CookieChange, Option<String>) {
    for v in res.headers().get_all(reqwest::header::SET_COOKIE) {
        let Ok(line) = v.to_str() else { continue };
        let mut parts = line.split(';').map(str::trim);
        let Some((name, value)) = parts.next().and_then(|p| p.split_once('=')) else {
            continue;
        };
        if name != "session" {
            continue;
        }
        let removal = value.is_empty()
            || parts.any(|a| {
                a.eq_ignore_ascii_case("max-age=0")
                    || a.to_ascii_lowercase()
                        .starts_with("expires=thu, 01 jan 1970")
            });
        if removal {
            return (CookieChange::Cleared, None);
        }
        let sid = session_id(value);
        return if Some(sid.as_str()) == sent {
            (CookieChange::Same, None)
        } else {
            (CookieChange::New(sid), Some(value.to_owned()))
        };
    }
    (CookieChange::Absent, None)
}

/// What every actor shares.
pub struct Ctx {
    pub sys: Arc<System>,
    pub rec: Arc<Recorder>,
    pub seed: u64,
    /// Each regular client's current session, and the counter session's
    /// (last), for the operator's destroys.
    pub current: Mutex<Vec<Option<String>>>,
    pub counter: tokio::sync::Mutex<CounterState>,
    /// How many faults are in place (or just settled): clients hurry.
    pub storm: Arc<tokio::sync::watch::Sender<usize>>,
}

/// The session the counter clients share.
#[derive(Debug, Default)]
pub struct CounterState {
    pub sess: Option<Sess>,
    pub generation: u32,
    pub key: String,
    /// Every counter session used, with its key: read at the end.
    pub all: Vec<(Sess, String)>,
}

impl Ctx {
    fn set_current(&self, slot: usize, sid: Option<&str>) {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cur.get_mut(slot) {
            *c = sid.map(str::to_owned);
        }
    }

    fn current(&self, slot: usize) -> Option<String> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(slot)
            .cloned()
            .flatten()
    }

    /// Sends one request and records it.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        http: &Http,
        actor: &str,
        app: usize,
        action: Action,
        method: Method,
        path: &str,
        sess: Option<&Sess>,
        body: Option<&Value>,
        final_read: bool,
    ) -> (Op, Option<String>) {
        let invoke = self.rec.now();
        let answer = match self.sys.app_url(app) {
            Some(base) => http.send(&base, method, path, sess, body).await,
            None => Answer {
                reply: Reply::NotSent("no app server running".to_owned()),
                token: None,
            },
        };
        let op = self.rec.record(
            actor,
            action,
            sess.map(|s| s.sid.as_str()),
            invoke,
            answer.reply,
            final_read,
        );
        (op, answer.token)
    }

    /// After an answer that the session does not exist: `GET /me` once
    /// more (recorded like any read) to tell a session that is gone from one
    /// that was refused while it lives; true when it is still served.
    async fn still_served(
        &self,
        http: &Http,
        actor: &str,
        app: usize,
        sess: Option<&Sess>,
    ) -> bool {
        let Some(sess) = sess else {
            return false;
        };
        let (op, _) = self
            .call(
                http,
                actor,
                app + 1,
                Action::Me,
                Method::GET,
                "/me",
                Some(sess),
                None,
                false,
            )
            .await;
        op.reply.status() == Some(200)
    }

    /// `POST /login` as `USERS[user]`, carrying `carried`; the new session
    /// when it was acknowledged.
    async fn login(
        &self,
        http: &Http,
        actor: &str,
        app: usize,
        user: usize,
        carried: Option<&Sess>,
    ) -> Option<Sess> {
        let (name, password) = USERS[user];
        let body = json!({"username": name, "password": password});
        let user_id = user as i64 + 1;
        let (op, token) = self
            .call(
                http,
                actor,
                app,
                Action::Login { user_id },
                Method::POST,
                "/login",
                carried,
                Some(&body),
                false,
            )
            .await;
        let token = token?;
        let csrf = op.reply.body()?.get("csrf_token")?.as_str()?.to_owned();
        (op.reply.status() == Some(200)).then(|| Sess {
            sid: session_id(&token),
            token,
            csrf,
        })
    }
}

/// Pauses before a planned step: the planned pause, shortened to
/// [`STORM`] of it while a fault is in place (re-timed when that changes
/// mid-pause). False when the run stopped first.
async fn wait_for(ctx: &Ctx, p: &Planned, stop: &CancellationToken) -> bool {
    let start = Instant::now();
    let mut storm = ctx.storm.subscribe();
    loop {
        let factor = if *storm.borrow_and_update() > 0 {
            STORM
        } else {
            1.0
        };
        let due = start + p.pause.mul_f64(factor);
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep_until(due) => return !stop.is_cancelled(),
            changed = storm.changed() => {
                if changed.is_err() {
                    tokio::time::sleep_until(due).await;
                    return !stop.is_cancelled();
                }
            }
        }
    }
}

/// What a regular client holds when the run stops.
#[derive(Debug, Clone)]
pub struct ClientEnd {
    pub name: String,
    pub sess: Option<Sess>,
    /// Data keys it wrote in that session.
    pub keys: BTreeSet<String>,
}

/// A regular client: logs in as its user (sometimes another), reads and
/// writes its session, switches platform, logs out, logs out everywhere.
/// Without a session, any step is a login.
pub async fn regular(
    ctx: Arc<Ctx>,
    slot: usize,
    plan: ClientPlan,
    stop: CancellationToken,
) -> ClientEnd {
    let http = Http::new();
    let name = plan.name.clone();
    let mut sess: Option<Sess> = None;
    let mut logins = 0u32;
    let mut keys = BTreeSet::new();
    for p in &plan.ops {
        if !wait_for(&ctx, p, &stop).await {
            break;
        }
        let step = match (&sess, p.step) {
            (None, Step::Login { user }) => Step::Login { user },
            (None, _) => Step::Login { user: plan.home },
            (Some(_), s) => s,
        };
        let key = |slot: u8| format!("c{}n{logins}k{slot}", &name[1..]);
        let unique = format!("{}:{name}:{}:", ctx.seed, p.index);
        let (op, _) = match step {
            Step::Login { user } => {
                if let Some(s) = ctx.login(&http, &name, p.app, user, sess.as_ref()).await {
                    sess = Some(s);
                    logins += 1;
                    keys.clear();
                }
                ctx.set_current(slot, sess.as_ref().map(|s| s.sid.as_str()));
                continue;
            }
            Step::Logout => {
                ctx.call(
                    &http,
                    &name,
                    p.app,
                    Action::Logout,
                    Method::POST,
                    "/logout",
                    sess.as_ref(),
                    None,
                    false,
                )
                .await
            }
            Step::LogoutAll => {
                ctx.call(
                    &http,
                    &name,
                    p.app,
                    Action::LogoutAll,
                    Method::POST,
                    "/logout-all",
                    sess.as_ref(),
                    None,
                    false,
                )
                .await
            }
            Step::Me => {
                ctx.call(
                    &http,
                    &name,
                    p.app,
                    Action::Me,
                    Method::GET,
                    "/me",
                    sess.as_ref(),
                    None,
                    false,
                )
                .await
            }
            Step::Platform => {
                let pname = format!("p:{unique}");
                let body = json!({
                    "platform_connection_id": (slot as i64) * 1_000_000 + p.index as i64,
                    "platform_name": pname,
                    "platform_type": "mastodon",
                    "platform_instance_url": format!("https://m{slot}.example.com"),
                });
                ctx.call(
                    &http,
                    &name,
                    p.app,
                    Action::Platform { name: pname },
                    Method::POST,
                    "/platform",
                    sess.as_ref(),
                    Some(&body),
                    false,
                )
                .await
            }
            Step::Put { slot: k } => {
                let key = key(k);
                let value = format!("v:{unique}");
                let body = Value::String(value.clone());
                let r = ctx
                    .call(
                        &http,
                        &name,
                        p.app,
                        Action::Put {
                            key: key.clone(),
                            value,
                        },
                        Method::PUT,
                        &format!("/session/data/{key}"),
                        sess.as_ref(),
                        Some(&body),
                        false,
                    )
                    .await;
                if r.0.reply.status() == Some(204) {
                    keys.insert(key);
                }
                r
            }
            Step::Get { slot: k } => {
                let key = key(k);
                ctx.call(
                    &http,
                    &name,
                    p.app,
                    Action::Get { key: key.clone() },
                    Method::GET,
                    &format!("/session/data/{key}"),
                    sess.as_ref(),
                    None,
                    false,
                )
                .await
            }
            Step::Incr { .. } | Step::CounterRead | Step::Destroy { .. } => continue,
        };
        let cleared = matches!(
            &op.reply,
            Reply::Http {
                cookie: CookieChange::Cleared,
                ..
            }
        );
        if cleared
            || (says_session_unknown(&op)
                && !ctx.still_served(&http, &name, p.app, sess.as_ref()).await)
        {
            sess = None;
        }
        ctx.set_current(slot, sess.as_ref().map(|s| s.sid.as_str()));
    }
    ClientEnd { name, sess, keys }
}

/// A client sharing the counter session: increments (through `increment`
/// or `?via=modify`) and reads. When the session is gone, the first to
/// notice logs in again, and the group moves on to a new counter.
pub async fn counter(ctx: Arc<Ctx>, slot: usize, plan: ClientPlan, stop: CancellationToken) {
    let http = Http::new();
    let name = plan.name.clone();
    for p in &plan.ops {
        if !wait_for(&ctx, p, &stop).await {
            break;
        }
        let (sess, key, generation) = {
            let mut g = ctx.counter.lock().await;
            if g.sess.is_none() {
                let Some(s) = ctx.login(&http, &name, p.app, COUNTER_USER, None).await else {
                    continue;
                };
                g.generation += 1;
                g.key = format!("ctr{}", g.generation);
                let key = g.key.clone();
                g.all.push((s.clone(), key));
                ctx.set_current(slot, Some(&s.sid));
                g.sess = Some(s);
            }
            match &g.sess {
                Some(s) => (s.clone(), g.key.clone(), g.generation),
                None => continue,
            }
        };
        let (op, _) = match p.step {
            Step::Incr { by, via_modify } => {
                let path = if via_modify {
                    format!("/session/incr/{key}?via=modify")
                } else {
                    format!("/session/incr/{key}")
                };
                ctx.call(
                    &http,
                    &name,
                    p.app,
                    Action::Incr {
                        key: key.clone(),
                        by,
                        via_modify,
                    },
                    Method::POST,
                    &path,
                    Some(&sess),
                    Some(&json!({ "by": by })),
                    false,
                )
                .await
            }
            _ => {
                ctx.call(
                    &http,
                    &name,
                    p.app,
                    Action::Get { key: key.clone() },
                    Method::GET,
                    &format!("/session/data/{key}"),
                    Some(&sess),
                    None,
                    false,
                )
                .await
            }
        };
        if says_session_unknown(&op) && !ctx.still_served(&http, &name, p.app, Some(&sess)).await {
            let mut g = ctx.counter.lock().await;
            if g.generation == generation {
                g.sess = None;
                ctx.set_current(slot, None);
            }
        }
    }
}

/// The operator: `vedfolnir-sessions session destroy <id> --reason admin`
/// on the current session of the planned client.
pub async fn operator(ctx: Arc<Ctx>, plan: Vec<Planned>, stop: CancellationToken) {
    for p in &plan {
        if !wait_for(&ctx, p, &stop).await {
            break;
        }
        let Step::Destroy { target } = p.step else {
            continue;
        };
        let Some(sid) = ctx.current(target) else {
            continue;
        };
        let invoke = ctx.rec.now();
        let (code, _, stderr) = ctx
            .sys
            .cli(
                &["session", "destroy", &sid, "--reason", "admin"],
                CLI_TIMEOUT,
            )
            .await;
        let reply = match code {
            Some(code) => Reply::Exit { code },
            None => Reply::Lost(stderr),
        };
        ctx.rec
            .record("admin", Action::Destroy, Some(&sid), invoke, reply, false);
    }
}

/// The reads at quiescence: each regular client's `/me` and every key it
/// wrote in its current session; every counter.
pub async fn final_reads(ctx: &Ctx, ends: &[ClientEnd]) {
    let http = Http::new();
    let apps = ctx.sys.app_servers();
    let mut n = 0usize;
    for end in ends {
        let Some(sess) = &end.sess else { continue };
        ctx.call(
            &http,
            &end.name,
            n % apps,
            Action::Me,
            Method::GET,
            "/me",
            Some(sess),
            None,
            true,
        )
        .await;
        n += 1;
        for key in &end.keys {
            ctx.call(
                &http,
                &end.name,
                n % apps,
                Action::Get { key: key.clone() },
                Method::GET,
                &format!("/session/data/{key}"),
                Some(sess),
                None,
                true,
            )
            .await;
            n += 1;
        }
    }
    let counters: Vec<(Sess, String)> = ctx.counter.lock().await.all.clone();
    for (sess, key) in counters {
        ctx.call(
            &http,
            "ctr",
            n % apps,
            Action::Get { key: key.clone() },
            Method::GET,
            &format!("/session/data/{key}"),
            Some(&sess),
            None,
            true,
        )
        .await;
        n += 1;
    }
}
