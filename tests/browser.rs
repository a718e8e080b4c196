//! A real browser against the example app: headless Chromium (Debian's
//! `chromium`) opens the app's login page, which logs in with `fetch`, stores
//! a value with the CSRF token, and prints `/me` into the page; the test reads
//! the page back with `--dump-dom`.
//!
//! This shows the cookie attributes work in a browser, not only in a client
//! library: the `Secure`, `HttpOnly`, `SameSite=Lax`, `Path=/` cookie is
//! stored and sent back on `http://127.0.0.1` (a secure context), and page
//! scripts cannot read it. Skipped, with a notice, only when no chromium is
//! installed (`scripts/test.sh` installs it).

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use vedfolnir_tests::TestContext;

fn chromium() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// The text content of the element with this id in a dumped DOM (the page
/// writes JSON there with `textContent`, so only `&<>"` come back escaped).
fn element_text(dom: &str, id: &str) -> Option<String> {
    let open = format!("id=\"{id}\">");
    let start = dom.find(&open)? + open.len();
    let end = start + dom[start..].find("</")?;
    Some(
        dom[start..end]
            .replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

#[tokio::test]
async fn chromium_logs_in_and_reads_me() {
    let Some(browser) = chromium() else {
        eprintln!("NOTICE: chromium is not installed; skipping the browser test");
        return;
    };
    let ctx = TestContext::new().await;
    let params = argon2::Params::new(1024, 1, 1, None).expect("argon2 params");
    let users = app_server::Users::from_spec(app_server::DEFAULT_USERS, params).expect("users");
    let state = app_server::AppState {
        users: Arc::new(users),
        store: ctx.store.clone(),
    };
    let router = app_server::router(state, app_server::session_layer(ctx.store.clone(), None));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
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

    let profile = std::env::temp_dir().join(format!("vedfolnir-chromium-{}", uuid::Uuid::new_v4()));
    let mut cmd = tokio::process::Command::new(&browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    // Virtual time waits for the page's fetches before the DOM is dumped.
    .arg("--virtual-time-budget=20000")
    .arg("--dump-dom")
    .arg(format!("http://{addr}/#username=admin&password=admin123"))
    .kill_on_drop(true)
    .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium finished within 90 s")
        .expect("run chromium");
    let _ = std::fs::remove_dir_all(&profile);
    server.abort();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(
        element_text(&dom, "status").as_deref(),
        Some("signed in"),
        "{dom}"
    );
    let result: Value =
        serde_json::from_str(&element_text(&dom, "me").expect("#me")).expect("JSON in #me");
    assert_eq!(result["me_status"], 200, "the browser sent the cookie back");
    assert_eq!(result["me"]["username"], "admin");
    assert_eq!(result["me"]["role"], "admin");
    assert_eq!(result["put_status"], 204, "CSRF token accepted");
    assert_eq!(result["greeting"], "hello from the browser");
    assert_eq!(
        element_text(&dom, "script-cookie").as_deref(),
        Some("\"\""),
        "HttpOnly: page scripts cannot read the session cookie"
    );
    let sessions = ctx.store.user_sessions("1").await.expect("user index");
    assert_eq!(
        sessions.len(),
        1,
        "one session, made by the browser's login"
    );
    assert_eq!(
        sessions[0].1.get("greeting"),
        Some(&Value::from("hello from the browser"))
    );
}
