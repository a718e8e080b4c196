//! Metrics and traces end to end: drive every code path with a Prometheus
//! exporter and an in-memory span exporter installed, scrape the real
//! `/metrics` endpoint, and check that
//! - every metric the dashboard and the alert rules name is exported;
//! - the `traceparent` of the request travels into the stream entry and the
//!   audit row, and the audit batch span links back to it.

use std::collections::BTreeSet;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;
use vedfolnir_exporters as export;
use vedfolnir_sessions::audit::entity::session_events;
use vedfolnir_sessions::audit::{AuditConsumer, AuditSink, ConsumerConfig};
use vedfolnir_sessions::config::RedisTarget;
use vedfolnir_sessions::reaper::{Reaper, ReaperConfig};
use vedfolnir_sessions::recovery::Healer;
use vedfolnir_sessions::{Changes, NewSession, SessionStore};
use vedfolnir_tests::TestContext;
use vedfolnir_tests::db::{Backend, TestDb};
use vedfolnir_worker::Sample;

/// Metric names a text (dashboard JSON or rules YAML) refers to.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("vedfolnir_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        out.insert(text[start..end].to_owned());
        i = end;
    }
    out
}

/// The series names a Prometheus text exposition holds.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_named_metric_is_exported_and_traces_reach_the_audit_row() {
    // Exporters, as a binary installs them, plus an in-memory span exporter.
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .without_target_info()
        .build()
        .expect("prometheus exporter");
    let meters = SdkMeterProvider::builder().with_reader(exporter).build();
    opentelemetry::global::set_meter_provider(meters.clone());
    let spans = InMemorySpanExporter::default();
    let tracers = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(tracers.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).expect("subscriber");

    let ctx = TestContext::with(|c| c.with_session_timeout(Duration::from_secs(1))).await;
    let db = TestDb::new(Backend::Sqlite).await;
    let sink = AuditSink::new(
        db.db.clone(),
        ctx.config.session_timeout,
        ctx.config.event_stream.clone(),
    );
    let store = ctx.store.clone().with_audit(sink.clone());

    // A request: one root span, as the app server's layer makes.
    let request = tracing::info_span!("POST /login");
    let request_trace = {
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        request.context().span().span_context().trace_id()
    };
    let created = async {
        let c = store
            .create(NewSession::for_user(1, "admin"))
            .await
            .expect("create");
        store
            .update(&c.session_id, Changes::new().with_set("theme", "dark"))
            .await
            .expect("update");
        c
    }
    .instrument(request)
    .await;
    store.load(&created.session_id).await.expect("load");
    let mut racers = Vec::new();
    for i in 0..8 {
        let (store, id) = (store.clone(), created.session_id.clone());
        racers.push(tokio::spawn(async move {
            store
                .update(&id, Changes::new().with_set(format!("k{i}"), i))
                .await
        }));
    }
    for r in racers {
        r.await.expect("join").expect("update");
    }

    // The worker's parts.
    let mut consumer = AuditConsumer::new(
        &ctx.config,
        sink.clone(),
        ConsumerConfig {
            block: Duration::from_millis(20),
            ..ConsumerConfig::default()
        },
    )
    .await
    .expect("consumer");
    consumer.ensure_group().await.expect("group");
    let token = CancellationToken::new();
    while consumer.step(&token).await.expect("step") > 0 {}
    let healer = Healer::new(ctx.store.clone(), db.db.clone(), Duration::from_millis(50));
    // A fresh namespace: its epoch is recorded, nothing is recovered.
    assert!(healer.check().await.expect("heal").is_none());
    // Redis loses its data (the epoch goes with it): one loss, healed.
    let _: () = redis::AsyncCommands::del(&mut ctx.conn(), &ctx.store.keys().part(0).epoch)
        .await
        .expect("del");
    assert!(healer.check().await.expect("heal").is_some());
    let reaper = Reaper::new(ctx.store.clone(), ReaperConfig::default());
    reaper.sweep().await.expect("sweep");
    let sample = std::sync::Arc::new(Sample::default());
    sample.refresh(&ctx.store).await.expect("sample");
    let _gauges = sample.register();
    // An HTTP request carrying a traceparent: the layer continues the trace.
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let app = axum::Router::new()
        .route(
            "/visit",
            axum::routing::get(|s: vedfolnir_sessions::web::Session| async move {
                s.insert("visited", true)?;
                Ok::<_, vedfolnir_sessions::web::SessionError>("ok")
            }),
        )
        .layer(vedfolnir_sessions::web::SessionLayer::new(store.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http_addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let res = reqwest::Client::new()
        .get(format!("http://{http_addr}/visit"))
        .header(
            "traceparent",
            format!("00-{incoming_trace}-00f067aa0ba902b7-01"),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), 200);
    server.abort();
    while consumer.step(&token).await.expect("step") > 0 {}
    let via_http = session_events::Entity::find()
        .filter(session_events::Column::Traceparent.contains(incoming_trace))
        .all(&db.db)
        .await
        .expect("rows");
    assert_eq!(
        via_http.len(),
        1,
        "the HTTP request's event carries its trace"
    );
    assert_eq!(via_http[0].event_type, "created");

    // A write while Redis is unreachable goes to the database.
    let mut down = ctx.config.clone();
    down.redis = RedisTarget::parse("REDIS_URL", "redis://127.0.0.1:1/0").expect("url");
    down.redis_timeout = Duration::from_millis(200);
    let offline = SessionStore::connect_lazy(&down)
        .expect("lazy")
        .with_audit(sink.clone());
    offline
        .create(NewSession::for_user(2, "user"))
        .await
        .expect("fallback create");

    // Scrape the real endpoint.
    let addr = export::serve(
        registry,
        "127.0.0.1:0".parse().expect("addr"),
        token.clone(),
    )
    .await
    .expect("serve");
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    token.cancel();
    let series = exported(&body);
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let dashboard = std::fs::read_to_string(format!(
        "{root}/observability/grafana/vedfolnir-sessions.json"
    ))
    .expect("dashboard");
    let rules = std::fs::read_to_string(format!("{root}/observability/prometheus/alerts.yml"))
        .expect("rules");
    let mut named = names_in(&dashboard);
    named.extend(names_in(&rules));
    assert!(
        named.len() >= 15,
        "the dashboard and rules name metrics: {named:?}"
    );
    let missing: Vec<_> = named.iter().filter(|n| !series.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "named but not exported: {missing:?}\n{body}"
    );
    // The README lists every metric too.
    let readme = std::fs::read_to_string(format!("{root}/README.md")).expect("readme");
    for family in [
        "vedfolnir_session_operations_total",
        "vedfolnir_session_operation_duration_seconds",
        "vedfolnir_audit_lag",
        "vedfolnir_fallback_writes_total",
        "vedfolnir_redis_memory_used_bytes",
    ] {
        assert!(readme.contains(family), "README does not list {family}");
    }
    let value = |name: &str| {
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(
        value("vedfolnir_fallback_writes_total").as_deref(),
        Some("1")
    );
    assert_eq!(
        value("vedfolnir_redis_loss_detected_total").as_deref(),
        Some("1")
    );
    assert_eq!(value("vedfolnir_sessions_active").as_deref(), Some("1"));

    // One trace from the request to the audit row.
    let rows = session_events::Entity::find()
        .filter(session_events::Column::SessionId.eq(created.session_id.as_str()))
        .all(&db.db)
        .await
        .expect("rows");
    let first = rows.iter().find(|r| r.seq == 1).expect("created row");
    let tp = first
        .traceparent
        .clone()
        .expect("the audit row carries the traceparent");
    assert!(
        tp.contains(&request_trace.to_string()),
        "{tp} is not in trace {request_trace}"
    );
    let _ = tracers.force_flush();
    let finished = spans.get_finished_spans().expect("spans");
    let batch = finished
        .iter()
        .find(|s| {
            s.name == "audit batch"
                && s.links
                    .iter()
                    .any(|l| l.span_context.trace_id() == request_trace)
        })
        .expect("an audit batch span linked to the request's trace");
    assert!(!batch.links.is_empty());
    assert!(
        finished
            .iter()
            .any(|s| s.name == "create" && s.span_context.trace_id() == request_trace)
    );
}
