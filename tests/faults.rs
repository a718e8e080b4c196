//! The fault-injection suite, Jepsen-style: real processes (a Redis of the
//! test's own and a fresh PostgreSQL database, each behind a TCP proxy the
//! test controls; two example app servers; the worker; the CLI), a seeded
//! schedule of client operations and faults, a recorded history of what
//! every client was told, and a checker that judges the whole history plus
//! the audit database at the end. See `docs/recovery.md`, "The fault suite".
//!
//! - `short_schedule_seed_*`: every fault kind once, one at a time, under
//!   load; fixed seeds (seed 2 with the worker split into `--only audit`
//!   and `--only reaper`); under a minute each.
//! - `long_schedule_from_env` (ignored): `VEDFOLNIR_FAULTS_SEED`,
//!   `VEDFOLNIR_FAULTS_DURATION_SECS`, `VEDFOLNIR_FAULTS_OVERLAP=1`,
//!   `VEDFOLNIR_FAULTS_SPLIT=1`.
//! - The checker's own tests (`checker_tests.rs`) feed it hand-made
//!   histories with a resurrection, a lost write, lost increments, a valid
//!   event in the dead letters, a snapshot that is not its fold and damage
//!   that `verify` missed.
//!
//! Needs the example app server (`app_server`), the worker
//! (`vedfolnir-worker`) and the CLI (`vedfolnir-sessions`) built in the
//! target directory of this test: `cargo test --workspace` builds them
//! (`cargo test --workspace --test faults` for this file alone; see
//! `vedfolnir_tests::binary`), `redis-server` on the PATH and the local
//! PostgreSQL (`TEST_PG_URL`).

#[path = "faults/checker.rs"]
mod checker;
#[path = "faults/client.rs"]
mod client;
#[path = "faults/history.rs"]
mod history;
#[path = "faults/inject.rs"]
mod inject;
#[path = "faults/proxy.rs"]
mod proxy;
#[path = "faults/report.rs"]
mod report;
#[path = "faults/run.rs"]
mod run;
#[path = "faults/schedule.rs"]
mod schedule;
#[path = "faults/system.rs"]
mod system;

use std::collections::BTreeSet;
use std::time::Duration;

use checker::{Class, class};
use history::{Action, FaultKind};
use schedule::{Form, Settings};

/// The shared-session increments (`POST /session/incr/{key}`). Switch off
/// only for an app server that does not have the route yet.
const INCREMENTS: bool = true;

/// One run at a time: the runs share two cores, and timing matters to the
/// faults' windows.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a schedule, prints the report, and fails on any violation, or on a
/// run that did not exercise what it should.
async fn run_and_judge(settings: Settings) {
    let _serial = SERIAL.lock().await;
    let outcome = run::run(settings.clone()).await;
    println!("{}", outcome.report);

    // The run did what it was meant to: the faults fired (the short form's
    // all of them; the long form skips those past its duration), and the
    // operations were acknowledged.
    let planned: usize = outcome.plan.lanes.iter().map(Vec::len).sum();
    let fired = outcome.history.faults.len();
    match settings.form {
        Form::Short => assert_eq!(fired, planned, "every planned fault was injected"),
        Form::Long => assert!(
            fired > 0 && fired <= planned,
            "{fired} of {planned} faults fired"
        ),
    }
    let names = |pick: fn(&history::Op) -> bool| -> BTreeSet<&str> {
        outcome
            .history
            .ops
            .iter()
            .filter(|op| !op.final_read && pick(op))
            .map(|op| op.action.name())
            .collect()
    };
    // The frequent kinds (dozens per short run); the rare ones (logouts,
    // destroys: a few per short run) are not required, so that a seed's
    // timing cannot make this check flaky.
    let acked = names(|op| class(op) == Class::Ok);
    let mut missing: Vec<&str> = ["login", "me", "platform", "data put", "data get"]
        .into_iter()
        .filter(|k| !acked.contains(k))
        .collect();
    if settings.increments
        && !outcome
            .history
            .ops
            .iter()
            .any(|op| matches!(op.action, Action::Incr { .. }))
    {
        missing.push("incr");
    }
    assert!(
        missing.is_empty(),
        "the run did not exercise these operations: {missing:?}"
    );
    assert!(
        !outcome.facts.events.is_empty(),
        "the audit database holds no event"
    );
    // A Redis cut outlasts the wait before the database stands in for it:
    // the fallback itself was exercised, not only the refusals around it.
    if outcome
        .history
        .faults
        .iter()
        .any(|f| f.kind == FaultKind::RedisCut)
    {
        assert!(
            outcome.facts.staged > 0,
            "no mutation was staged in the database during a Redis cut"
        );
    }
    assert!(
        outcome.violations.is_empty(),
        "{} violation(s) of the session invariants under faults (seed {}); the report above \
         names each",
        outcome.violations.len(),
        settings.seed
    );
}

fn short(seed: u64, split_roles: bool) -> Settings {
    Settings {
        seed,
        form: Form::Short,
        duration: Duration::ZERO,
        overlap: false,
        increments: INCREMENTS,
        split_roles,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_schedule_seed_1() {
    // Proves: under every fault kind, one at a time, with a fixed seed, no
    // ended session is served again, every acknowledged write and increment
    // stays visible and is audited exactly once, and the audit trail
    // verifies; only invalid input becomes a dead letter, every snapshot is
    // the fold of its events, and verify detects damage and repairs it.
    run_and_judge(short(1, false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_schedule_seed_2() {
    // Proves: the same, in another order with other timings, with the
    // worker's roles split over two processes (`--only audit`, `--only
    // reaper`).
    run_and_judge(short(2, true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long form: VEDFOLNIR_FAULTS_SEED, VEDFOLNIR_FAULTS_DURATION_SECS, VEDFOLNIR_FAULTS_OVERLAP, VEDFOLNIR_FAULTS_SPLIT"]
async fn long_schedule_from_env() {
    // Proves: the same over a long random schedule; with overlap, faults of
    // Redis and of the database or a process may coincide.
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let seed = var("VEDFOLNIR_FAULTS_SEED")
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .expect("VEDFOLNIR_FAULTS_SEED: a number")
        })
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1)
        });
    let secs = var("VEDFOLNIR_FAULTS_DURATION_SECS")
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .expect("VEDFOLNIR_FAULTS_DURATION_SECS: a number of seconds")
        })
        .unwrap_or(300);
    let overlap = var("VEDFOLNIR_FAULTS_OVERLAP").is_some_and(|v| v == "1" || v == "true");
    let split_roles = var("VEDFOLNIR_FAULTS_SPLIT").is_some_and(|v| v == "1" || v == "true");
    run_and_judge(Settings {
        seed,
        form: Form::Long,
        duration: Duration::from_secs(secs.max(10)),
        overlap,
        increments: INCREMENTS,
        split_roles,
    })
    .await;
}
