//! Exporters for the binaries (feature `export`): logs to stderr (filtered
//! by `RUST_LOG`), traces to an OTLP collector when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (filtered by `OTEL_TRACES_FILTER`,
//! independently of the logs; nothing is exported and nothing complains
//! when no endpoint is set), and metrics in the Prometheus text format at
//! `/metrics` on `METRICS_LISTEN`.

use std::net::SocketAddr;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The installed telemetry. Keep it alive for the life of the process and
/// call [`Telemetry::shutdown`] at the end to flush traces.
#[derive(Debug)]
pub struct Telemetry {
    registry: prometheus::Registry,
    meter_provider: SdkMeterProvider,
    tracer_provider: Option<SdkTracerProvider>,
}

/// Telemetry that could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install telemetry: {0}")]
pub struct TelemetryError(String);

/// Installs logging, metrics and (when configured) trace export for a
/// service named `service`.
pub fn install(service: &'static str) -> Result<Telemetry, TelemetryError> {
    let err = |e: &dyn std::fmt::Display| TelemetryError(e.to_string());
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = Resource::builder().with_service_name(service).build();

    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .without_target_info()
        .scope_info_enabled(false)
        .build()
        .map_err(|e| err(&e))?;
    let meter_provider = SdkMeterProvider::builder()
        .with_reader(exporter)
        .with_resource(resource.clone())
        .build();
    opentelemetry::global::set_meter_provider(meter_provider.clone());

    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty());
    let tracer_provider = match endpoint {
        Some(_) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .build()
                .map_err(|e| err(&e))?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    let tracer = tracer_provider.as_ref().map(|p| p.tracer(service));
    subscriber(|k| std::env::var(k).ok(), tracer)?
        .try_init()
        .map_err(|e| err(&e))?;
    Ok(Telemetry {
        registry,
        meter_provider,
        tracer_provider,
    })
}

/// The subscriber of a service: log lines to stderr, filtered by `RUST_LOG`
/// (default `info`), and, with a `tracer`, spans to it, filtered on their
/// own by `OTEL_TRACES_FILTER` (default `info`). Each output has its own
/// filter, so `RUST_LOG=warn` quiets the logs without turning off the
/// traces or the `traceparent` of events. `lookup` reads the variables
/// ([`install`] passes the environment).
pub fn subscriber(
    lookup: impl Fn(&str) -> Option<String>,
    tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
) -> Result<impl tracing::Subscriber + Send + Sync + 'static, TelemetryError> {
    let value = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
    // An unreadable RUST_LOG falls back to `info`, as env_logger does.
    let logs = value("RUST_LOG")
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(logs);
    let traces = match tracer {
        None => None,
        Some(tracer) => {
            let filter = match value("OTEL_TRACES_FILTER") {
                None => EnvFilter::new(DEFAULT_TRACES_FILTER),
                Some(v) => EnvFilter::try_new(&v).map_err(|e| {
                    TelemetryError(
                        crate::config::ConfigError {
                            var: "OTEL_TRACES_FILTER",
                            value: v.clone(),
                            reason: format!(
                                "a filter like `info` or `vedfolnir_sessions=debug` ({e})"
                            ),
                        }
                        .to_string(),
                    )
                })?,
            };
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(filter),
            )
        }
    };
    Ok(tracing_subscriber::registry().with(fmt).with(traces))
}

/// `OTEL_TRACES_FILTER` when unset: every span at `info` and above (the
/// store's operations, the session layer's requests, the audit batches).
pub const DEFAULT_TRACES_FILTER: &str = "info";

impl Telemetry {
    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        render(&self.registry)
    }

    /// The Prometheus registry the metrics are exported to.
    pub fn registry(&self) -> prometheus::Registry {
        self.registry.clone()
    }

    /// Serves `/metrics` on `listen` until `shutdown` is cancelled.
    pub async fn serve_metrics(
        &self,
        listen: SocketAddr,
        shutdown: CancellationToken,
    ) -> std::io::Result<SocketAddr> {
        serve(self.registry.clone(), listen, shutdown).await
    }

    /// Flushes and stops the exporters.
    pub fn shutdown(self) {
        if let Some(tp) = self.tracer_provider {
            let _ = tp.shutdown();
        }
        let _ = self.meter_provider.shutdown();
    }
}

/// The registry's metrics in the Prometheus text format.
pub fn render(registry: &prometheus::Registry) -> String {
    use prometheus::Encoder as _;
    let mut out = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves `/metrics` for `registry` on `listen` until `shutdown` is
/// cancelled; returns the bound address (port 0 picks a free one).
pub async fn serve(
    registry: prometheus::Registry,
    listen: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(&registry),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(addr)
}

/// `METRICS_LISTEN`, when set: where to serve `/metrics`.
pub fn metrics_listen() -> Result<Option<SocketAddr>, crate::config::ConfigError> {
    match std::env::var("METRICS_LISTEN") {
        Ok(v) if !v.trim().is_empty() => {
            v.trim()
                .parse()
                .map(Some)
                .map_err(|_| crate::config::ConfigError {
                    var: "METRICS_LISTEN",
                    value: v,
                    reason: "an address like 127.0.0.1:9464".to_owned(),
                })
        }
        _ => Ok(None),
    }
}
