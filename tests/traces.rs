//! Traces survive the log level: the subscriber the binaries install
//! (`telemetry::export::subscriber`) gives the trace layer a filter of its
//! own (`OTEL_TRACES_FILTER`), so with `RUST_LOG=warn` — a normal production
//! setting — spans still reach the exporter, and a request's W3C
//! `traceparent` still reaches the stream entry and the audit row of the
//! event it caused.

mod common;

use std::collections::HashMap;

use common::TestContext;
use common::db::{Backend, TestDb};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _};
use vedfolnir_sessions::audit::AuditSink;
use vedfolnir_sessions::audit::entity::session_events;
use vedfolnir_sessions::telemetry::export;
use vedfolnir_sessions::web::{Session, SessionError, SessionLayer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_warn_keeps_spans_and_traceparents() {
    let spans = InMemorySpanExporter::default();
    let tracers = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let env: HashMap<&str, &str> = HashMap::from([("RUST_LOG", "warn")]);
    let subscriber = export::subscriber(
        |k| env.get(k).map(|v| (*v).to_owned()),
        Some(tracers.tracer("test")),
    )
    .expect("subscriber");
    tracing::subscriber::set_global_default(subscriber).expect("install");
    // No propagator is installed: the layer reads the header itself.

    let ctx = TestContext::new().await;
    let db = TestDb::new(Backend::Sqlite).await;
    let sink = AuditSink::new(
        db.db.clone(),
        ctx.config.session_timeout,
        ctx.config.event_stream.clone(),
    );
    // DB_SESSION_SYNC (the default): the audit row is written as the
    // request returns.
    let store = ctx.store.clone().with_audit(sink);
    let app = axum::Router::new()
        .route(
            "/visit",
            axum::routing::get(|s: Session| async move {
                s.insert("visited", true)?;
                Ok::<_, SessionError>("ok")
            }),
        )
        .layer(SessionLayer::new(store));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let trace = "5c7e2a1f9b3d4e8a0f6b2c4d8e1a3b5c";
    let res = reqwest::Client::new()
        .get(format!("http://{addr}/visit"))
        .header("traceparent", format!("00-{trace}-1f2e3d4c5b6a7988-01"))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), 200);
    server.abort();

    // The stream entry and the audit row carry the caller's trace.
    let stream = ctx.stream().await;
    assert_eq!(stream.len(), 1, "{stream:?}");
    let tp = stream[0].get("traceparent").expect("a traceparent");
    assert!(tp.starts_with(&format!("00-{trace}-")), "{tp}");
    let rows = session_events::Entity::find()
        .filter(session_events::Column::SessionId.eq(stream[0]["session_id"].as_str()))
        .all(&db.db)
        .await
        .expect("rows");
    assert_eq!(rows.len(), 1);
    assert!(
        rows[0]
            .traceparent
            .as_deref()
            .is_some_and(|t| t.contains(trace)),
        "{:?}",
        rows[0].traceparent
    );

    // The spans were exported in spite of RUST_LOG=warn.
    let _ = tracers.force_flush();
    let finished = spans.get_finished_spans().expect("spans");
    let in_trace: Vec<&str> = finished
        .iter()
        .filter(|s| s.span_context.trace_id().to_string() == trace)
        .map(|s| s.name.as_ref())
        .collect();
    assert!(in_trace.contains(&"session"), "{in_trace:?}");
    assert!(in_trace.contains(&"create"), "{in_trace:?}");
    // The event names the span that wrote it, a child in the caller's trace.
    assert!(
        !tp.contains("1f2e3d4c5b6a7988"),
        "the store's own span, not the caller's: {tp}"
    );
}

#[test]
fn a_bad_traces_filter_names_the_variable() {
    let env: HashMap<&str, &str> = HashMap::from([("OTEL_TRACES_FILTER", "[[[")]);
    let tracers = SdkTracerProvider::builder().build();
    let e = export::subscriber(
        |k| env.get(k).map(|v| (*v).to_owned()),
        Some(tracers.tracer("test")),
    )
    .err()
    .expect("refused");
    assert!(e.to_string().contains("OTEL_TRACES_FILTER"), "{e}");
}
