//! Traces, metrics and logs.
//!
//! The library records with the `tracing` crate and the OpenTelemetry API
//! only; what is exported, and where, is decided by the binaries (the
//! workspace's `exporters/` crate installs the log subscriber and the
//! exporters). Without an installed provider every instrument is a no-op.
//!
//! - `current_traceparent` is how a store operation learns the W3C trace
//!   context of the request that caused it, to write it into the event: the
//!   current OpenTelemetry span when one is recorded (feature
//!   `tracing-opentelemetry`), else the `traceparent` the request came with
//!   ([`scope_traceparent`], which the session layer applies), so the audit
//!   row links to the caller's trace even where no exporter is configured
//!   or the span is filtered out.
//! - [`metrics`] holds the instruments; their Prometheus names are listed in
//!   the README and used by `observability/`.

use std::sync::LazyLock;
use std::time::Instant;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
#[cfg(feature = "tracing-opentelemetry")]
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::trace::{SpanContext, TraceFlags, TraceState};

tokio::task_local! {
    /// The `traceparent` the current request came with.
    static INCOMING: Option<String>;
}

/// The W3C `traceparent` to write into an event: the current span's when it
/// belongs to an OpenTelemetry trace (feature `tracing-opentelemetry`), else
/// the one the current request came with (see [`scope_traceparent`]), else
/// none.
pub(crate) fn current_traceparent() -> Option<String> {
    #[cfg(feature = "tracing-opentelemetry")]
    {
        let cx = tracing_opentelemetry::OpenTelemetrySpanExt::context(&tracing::Span::current());
        let span = cx.span();
        let sc = span.span_context();
        if sc.is_valid() {
            return Some(format_traceparent(sc));
        }
    }
    INCOMING.try_with(Clone::clone).ok().flatten()
}

fn format_traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Runs `fut` with `traceparent` (a W3C `traceparent` header's value, from
/// outside: checked, and ignored unless valid) as the trace context events
/// fall back to when no OpenTelemetry span is recorded.
pub async fn scope_traceparent<F: std::future::Future>(
    traceparent: Option<&str>,
    fut: F,
) -> F::Output {
    let tp = traceparent
        .and_then(parse_traceparent)
        .map(|sc| format_traceparent(&sc));
    INCOMING.scope(tp, fut).await
}

/// [`scope_traceparent`] with an owned header value (the future holds no
/// borrow of the request).
#[cfg(feature = "axum")]
pub(crate) async fn scope_traceparent_owned<F: std::future::Future>(
    traceparent: Option<String>,
    fut: F,
) -> F::Output {
    scope_traceparent(traceparent.as_deref(), fut).await
}

/// Parses a W3C `traceparent` into a remote span context (for span links).
pub fn parse_traceparent(tp: &str) -> Option<SpanContext> {
    let mut parts = tp.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2 || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace_id = opentelemetry::trace::TraceId::from_hex(trace).ok()?;
    let span_id = opentelemetry::trace::SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

/// The product's instruments.
#[derive(Debug)]
pub struct Metrics {
    /// `vedfolnir_session_operations_total{op, outcome}`.
    pub operations: Counter<u64>,
    /// `vedfolnir_session_operation_duration_seconds{op}`.
    pub operation_duration: Histogram<f64>,
    /// `vedfolnir_session_conflicts_total`: version conflicts met by writes.
    pub conflicts: Counter<u64>,
    /// `vedfolnir_session_retries_total`: writes folded again after a conflict.
    pub retries: Counter<u64>,
    /// `vedfolnir_fallback_writes_total`: mutations written to the database
    /// because Redis was unreachable.
    pub fallback_writes: Counter<u64>,
    /// `vedfolnir_audit_batch_size`: entries per audit batch.
    pub audit_batch_size: Histogram<u64>,
    /// `vedfolnir_audit_batch_duration_seconds`.
    pub audit_batch_duration: Histogram<f64>,
    /// `vedfolnir_audit_events_total{result}`: `inserted` or `duplicate`.
    pub audit_events: Counter<u64>,
    /// `vedfolnir_audit_dead_letters_total`.
    pub dead_letters: Counter<u64>,
    /// `vedfolnir_sessions_expired_total`.
    pub expired: Counter<u64>,
    /// `vedfolnir_recovery_runs_total`.
    pub recovery_runs: Counter<u64>,
    /// `vedfolnir_redis_loss_detected_total`.
    pub redis_loss_detected: Counter<u64>,
    /// `vedfolnir_audit_sync_failures_total`: mutations Redis took whose
    /// synchronous audit write (`DB_SESSION_SYNC`) failed; the audit
    /// consumer records them from the stream instead.
    pub audit_sync_failures: Counter<u64>,
    /// `vedfolnir_fallback_projected_total`: staged events applied to Redis
    /// once it answered again.
    pub fallback_projected: Counter<u64>,
}

const SECONDS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let m = opentelemetry::global::meter("vedfolnir-sessions");
    Metrics {
        operations: m
            .u64_counter("vedfolnir.session.operations")
            .with_description("Session store operations by type and outcome")
            .build(),
        operation_duration: m
            .f64_histogram("vedfolnir.session.operation.duration")
            .with_unit("s")
            .with_description("Session store operation latency")
            .with_boundaries(SECONDS.to_vec())
            .build(),
        conflicts: m
            .u64_counter("vedfolnir.session.conflicts")
            .with_description("Version conflicts met by session writes")
            .build(),
        retries: m
            .u64_counter("vedfolnir.session.retries")
            .with_description("Session writes folded again after a conflict")
            .build(),
        fallback_writes: m
            .u64_counter("vedfolnir.fallback.writes")
            .with_description("Mutations written to the audit database while Redis was unreachable")
            .build(),
        audit_batch_size: m
            .u64_histogram("vedfolnir.audit.batch.size")
            .with_description("Stream entries per audit batch")
            .with_boundaries(vec![
                1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0,
            ])
            .build(),
        audit_batch_duration: m
            .f64_histogram("vedfolnir.audit.batch.duration")
            .with_unit("s")
            .with_description("Time to commit and acknowledge one audit batch")
            .with_boundaries(SECONDS.to_vec())
            .build(),
        audit_events: m
            .u64_counter("vedfolnir.audit.events")
            .with_description("Events written to the audit database (inserted or duplicate)")
            .build(),
        dead_letters: m
            .u64_counter("vedfolnir.audit.dead_letters")
            .with_description("Stream entries set aside as dead letters")
            .build(),
        expired: m
            .u64_counter("vedfolnir.sessions.expired")
            .with_description("Sessions ended by idle timeout (expired events)")
            .build(),
        recovery_runs: m
            .u64_counter("vedfolnir.recovery.runs")
            .with_description("Replays of the audit database into Redis")
            .build(),
        redis_loss_detected: m
            .u64_counter("vedfolnir.redis.loss_detected")
            .with_description("Times Redis was found to have lost its data")
            .build(),
        audit_sync_failures: m
            .u64_counter("vedfolnir.audit.sync_failures")
            .with_description(
                "Mutations whose synchronous audit write failed (audited later from the stream)",
            )
            .build(),
        fallback_projected: m
            .u64_counter("vedfolnir.fallback.projected")
            .with_description("Events staged during a Redis outage and applied to Redis since")
            .build(),
    }
});

/// The instruments (created from the global meter provider on first use;
/// counters without labels start at zero so that they are exported before
/// their first event).
pub fn metrics() -> &'static Metrics {
    static STARTED: std::sync::Once = std::sync::Once::new();
    let m = &*METRICS;
    STARTED.call_once(|| {
        for c in [
            &m.conflicts,
            &m.retries,
            &m.fallback_writes,
            &m.dead_letters,
            &m.expired,
            &m.recovery_runs,
            &m.redis_loss_detected,
            &m.audit_sync_failures,
            &m.fallback_projected,
        ] {
            c.add(0, &[]);
        }
    });
    m
}

/// Records one store operation: its outcome and its latency.
pub(crate) fn record_operation<T>(op: &'static str, started: Instant, result: &crate::Result<T>) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(crate::Error::Conflict { .. }) => "conflict",
        Err(crate::Error::NotFound(_)) => "not_found",
        Err(crate::Error::Ended { .. }) => "ended",
        Err(crate::Error::TooLarge { .. } | crate::Error::InvalidInput(_)) => "invalid",
        Err(e) if e.is_unavailable() => "unavailable",
        Err(_) => "error",
    };
    let m = metrics();
    m.operations.add(
        1,
        &[KeyValue::new("op", op), KeyValue::new("outcome", outcome)],
    );
    m.operation_duration
        .record(started.elapsed().as_secs_f64(), &[KeyValue::new("op", op)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(tp).expect("valid");
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(sc.is_sampled());
        assert!(parse_traceparent("00-0000-00f067aa0ba902b7-01").is_none());
        assert!(parse_traceparent("garbage").is_none());
        assert!(current_traceparent().is_none(), "no exporter, no context");
    }

    #[tokio::test]
    async fn an_incoming_traceparent_is_the_fallback() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let seen = scope_traceparent(Some(tp), async { current_traceparent() }).await;
        assert_eq!(seen.as_deref(), Some(tp));
        // Anything that is not a valid traceparent is left out.
        for junk in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            let seen = scope_traceparent(Some(junk), async { current_traceparent() }).await;
            assert_eq!(seen, None, "{junk}");
        }
        assert_eq!(current_traceparent(), None, "outside the scope");
    }
}
