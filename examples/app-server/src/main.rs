//! The example app server: an axum app that follows the Vedfolnir
//! application's session flows on top of the session layer.
//!
//! ```sh
//! cargo run -p vedfolnir-app-server     # the binary `app_server`, on APP_LISTEN (127.0.0.1:8080)
//! ```
//!
//! Routes, users and settings are described in the crate's library
//! (`examples/app-server/src/lib.rs`) and `docs/web.md`. The store reads the usual environment (`REDIS_URL`,
//! `SESSION_COOKIE_*`, …); the app adds `APP_LISTEN`, `APP_USERS`
//! (`name:password:role,…`) and `APP_FINGERPRINT` (`off`, `user-agent`, `ip`,
//! `both`). `METRICS_LISTEN` serves Prometheus metrics at `/metrics`;
//! `OTEL_EXPORTER_OTLP_ENDPOINT` exports traces.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use app_server as app;
use vedfolnir_exporters as export;
use vedfolnir_sessions::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs; OTLP traces when OTEL_EXPORTER_OTLP_ENDPOINT is set; metrics.
    let telemetry = export::install("vedfolnir-app").context("installing telemetry")?;
    let config = Config::from_env()?;
    let metrics_shutdown = tokio_util::sync::CancellationToken::new();
    if let Some(listen) = export::metrics_listen()? {
        let addr = telemetry
            .serve_metrics(listen, metrics_shutdown.clone())
            .await
            .with_context(|| format!("serving /metrics on METRICS_LISTEN={listen}"))?;
        println!("metrics at http://{addr}/metrics");
    }
    let app_config = app::AppConfig::from_env()?;
    let users = app::Users::from_spec(&app_config.users, argon2::Params::default())?;
    let store = app::connect_store(&config).await?;
    let listener = tokio::net::TcpListener::bind(app_config.listen)
        .await
        .with_context(|| format!("binding APP_LISTEN={}", app_config.listen))?;
    println!(
        "vedfolnir example app listening on http://{}",
        listener.local_addr()?
    );
    println!("users: {}", users.names().join(", "));
    let state = app::AppState {
        users: Arc::new(users),
        store: store.clone(),
    };
    let router = app::router(state, app::session_layer(store, app_config.fingerprint));
    app::serve(listener, router, shutdown_signal(), Duration::from_secs(10)).await?;
    metrics_shutdown.cancel();
    telemetry.shutdown();
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}
