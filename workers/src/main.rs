//! `vedfolnir-worker`: the audit consumer, the expiry reaper and the healer.
//!
//! Thin over [`vedfolnir_worker::run`]: parses the configuration,
//! installs telemetry (logs; OTLP traces when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! is set; Prometheus metrics at `/metrics` when `METRICS_LISTEN` is set), and
//! turns SIGINT/SIGTERM into a graceful shutdown (the batch in hand is
//! committed and acknowledged, then the process exits 0).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use tokio_util::sync::CancellationToken;
use vedfolnir_exporters as export;
use vedfolnir_sessions::Config;
use vedfolnir_sessions::audit::ConsumerConfig;
use vedfolnir_sessions::reaper::ReaperConfig;
use vedfolnir_worker::{self as worker, Parts};

// Decoding stream replies and folding sessions allocate many small values;
// mimalloc serves them faster than glibc's malloc (BENCHMARKS.md,
// "Allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A part to run alone. Each has leases of its own, so the parts can be
/// split over processes in any way and every partition is still covered.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Only {
    /// The audit consumer (with the healer, which needs the same database).
    Audit,
    /// The expiry reaper (no database needed).
    Reaper,
    /// The healer alone.
    Healer,
}

/// Audit consumer, expiry reaper and healer for vedfolnir-sessions.
#[derive(Debug, Parser)]
#[command(name = "vedfolnir-worker", version, about)]
struct Args {
    /// Run only one part (default: all).
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// How long a shutdown may take before the process gives up, seconds.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run(args: Args) -> anyhow::Result<()> {
    let telemetry = export::install("vedfolnir-worker").context("installing telemetry")?;
    let config = Config::from_env()?;
    let consumer = ConsumerConfig::from_env()?;
    let reaper = ReaperConfig::from_env()?;
    let lease_ttl = vedfolnir_sessions::lease::lease_ttl_from_lookup(|k| std::env::var(k).ok())?;
    let parts = match args.only {
        None => Parts::Both,
        Some(Only::Audit) => Parts::Audit,
        Some(Only::Reaper) => Parts::Reaper,
        Some(Only::Healer) => Parts::Healer,
    };
    let shutdown = CancellationToken::new();
    if let Some(listen) = export::metrics_listen()? {
        let addr = telemetry
            .serve_metrics(listen, shutdown.clone())
            .await
            .with_context(|| format!("serving /metrics on {listen}"))?;
        tracing::info!(%addr, "metrics at /metrics");
    }
    let signals = shutdown.clone();
    let drain = Duration::from_secs(args.drain_timeout);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing the batch in hand");
        signals.cancel();
        tokio::time::sleep(drain).await;
        tracing::error!("shutdown took longer than the drain timeout; exiting");
        // The drain timeout is a hard bound: nothing acknowledged is lost by
        // stopping here, the unacknowledged batch is redelivered.
        #[allow(clippy::exit)]
        std::process::exit(1);
    });
    let result = worker::run(&config, parts, consumer, reaper, lease_ttl, shutdown)
        .await
        .context("worker failed");
    telemetry.shutdown();
    result
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
