//! Trace context for events.
//!
//! The library only depends on `tracing`; exporters are installed by the
//! binaries. [`current_traceparent`] is where a store operation learns the
//! W3C trace context of the request that caused it, to write it into the
//! event's `traceparent` field.

/// The W3C `traceparent` of the current span, when one is being exported.
pub fn current_traceparent() -> Option<String> {
    None
}

/// Logging for the CLI: stderr, silent unless `RUST_LOG` asks, so a failing
/// command prints exactly one line.
pub fn init_cli_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Logging for long-running services (the worker, the example app): stderr,
/// `info` unless `RUST_LOG` says otherwise.
pub fn init_service_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
