//! One run of the suite: start the system, run the clients and the fault
//! lanes of a seed's schedule, stop the faults, restore everything, wait
//! (bounded, on observable conditions) until the worker drained every
//! stream and the healer finished, read every session's state at
//! quiescence, run `verify`, read the audit database, and check.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sea_orm::EntityTrait as _;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vedfolnir_sessions::audit::entity::{dead_letters, session_events, session_snapshots};

use crate::checker::{Rule, Violation, check};
use crate::client::{self, ClientEnd, CounterState, Ctx, Recorder};
use crate::history::{
    AuditEvent, DamageCheck, DbFacts, DeadLetter, FaultRecord, History, SnapshotRow, VerifyRun,
};
use crate::inject::run_lane;
use crate::report;
use crate::schedule::{Form, Plan, Settings, plan};
use crate::system::{System, poll};

/// Longest wait for quiescence after the faults stop.
const QUIESCE: Duration = Duration::from_secs(60);
/// Longest time `verify` may keep failing while the system converges.
const VERIFY_PATIENCE: Duration = Duration::from_secs(20);

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    pub plan: Plan,
    pub history: History,
    pub facts: DbFacts,
    pub violations: Vec<Violation>,
    /// The printed table.
    pub report: String,
}

pub async fn run(settings: Settings) -> Outcome {
    let wall = Instant::now();
    let plan = plan(&settings);
    eprintln!(
        "fault suite: seed {} ({} form{}), load at least {:.1}s, increments {}; reproduce with \
         VEDFOLNIR_FAULTS_SEED={}{}\nplanned faults:\n{}",
        settings.seed,
        match settings.form {
            Form::Short => "short",
            Form::Long => "long",
        },
        if settings.overlap {
            ", overlapping"
        } else {
            ""
        },
        plan.load.as_secs_f64(),
        if settings.increments { "on" } else { "off" },
        settings.seed,
        match settings.form {
            Form::Short => String::new(),
            Form::Long => format!(
                " VEDFOLNIR_FAULTS_DURATION_SECS={} VEDFOLNIR_FAULTS_OVERLAP={}",
                settings.duration.as_secs(),
                u8::from(settings.overlap)
            ),
        },
        plan.describe_faults()
    );
    let sys = Arc::new(
        System::start(2, settings.split_roles)
            .await
            .expect("start redis, postgres and the proxies"),
    );
    eprintln!("  {}", sys.describe());
    let (code, out, err) = sys.cli(&["migrate"], Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "vedfolnir-sessions migrate: {out}{err}");
    sys.start_worker().await.expect("start the worker");
    // The standby too, so that an app server killed early in the run is
    // replaced at once.
    let (a, b, ()) = tokio::join!(sys.launch_app(0), sys.launch_app(1), sys.prepare_standby());
    a.expect("start app server 0");
    b.expect("start app server 1");
    assert!(
        poll(Duration::from_secs(30), Duration::from_millis(50), || sys
            .healed())
        .await,
        "the worker's healer never set its marker"
    );
    assert!(
        poll(Duration::from_secs(30), Duration::from_millis(50), || sys
            .apps_healthy())
        .await,
        "the app servers never reached Redis"
    );

    let origin = Instant::now();
    let rec = Arc::new(Recorder::new(origin));
    let ctx = Arc::new(Ctx {
        sys: sys.clone(),
        rec: rec.clone(),
        seed: settings.seed,
        current: Mutex::new(vec![None; plan.clients.len() + 1]),
        counter: tokio::sync::Mutex::new(CounterState::default()),
        storm: Arc::new(tokio::sync::watch::Sender::new(0)),
    });
    sys.set_origin(origin);
    let stop = CancellationToken::new();
    // Runs until the facts are read, through quiescence.
    let supervising = CancellationToken::new();
    let supervisor = {
        let (sys, stop) = (sys.clone(), supervising.clone());
        tokio::spawn(async move { sys.supervise(stop).await })
    };
    let until = match settings.form {
        Form::Short => None,
        Form::Long => Some(origin + plan.load),
    };
    let lanes: Vec<JoinHandle<Vec<FaultRecord>>> = plan
        .lanes
        .iter()
        .map(|l| {
            tokio::spawn(run_lane(
                sys.clone(),
                origin,
                l.clone(),
                plan.quiet,
                until,
                ctx.storm.clone(),
            ))
        })
        .collect();
    let clients: Vec<JoinHandle<ClientEnd>> = plan
        .clients
        .iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(client::regular(ctx.clone(), i, c.clone(), stop.clone())))
        .collect();
    let counter_slot = plan.clients.len();
    let counters: Vec<JoinHandle<()>> = plan
        .counters
        .iter()
        .map(|c| {
            tokio::spawn(client::counter(
                ctx.clone(),
                counter_slot,
                c.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let operator = tokio::spawn(client::operator(
        ctx.clone(),
        plan.admin.clone(),
        stop.clone(),
    ));

    // Load until the planned end, every lane done, and one quiet period.
    tokio::time::sleep_until(origin + plan.load).await;
    let mut faults = Vec::new();
    for l in lanes {
        faults.extend(l.await.expect("fault lane"));
    }
    tokio::time::sleep(plan.quiet).await;
    let load = origin.elapsed();
    stop.cancel();
    let mut ends = Vec::new();
    for c in clients {
        ends.push(c.await.expect("client"));
    }
    for c in counters {
        c.await.expect("counter client");
    }
    operator.await.expect("operator");
    eprintln!(
        "  load stopped at {:.2}s; restoring and waiting for quiescence",
        load.as_secs_f64()
    );

    // Quiescence (the supervisor keeps restarting what exits by itself).
    let mut harness = Vec::new();
    sys.restore_all().await.expect("restore every part");
    if !settle(&sys).await {
        harness.push(quiescence_violation("before the final reads", &sys).await);
    }
    client::final_reads(&ctx, &ends).await;
    if !settle(&sys).await {
        harness.push(quiescence_violation("after the final reads", &sys).await);
    }
    let verify = verify(&sys).await;
    let passed = verify.code == Some(0);
    let mut facts = read_facts(&sys, verify).await;
    // Damage beside the audit trail's back, only once verify passed: it
    // must see it, and its repair must undo it.
    if passed {
        facts.damage = Some(damage_check(&sys).await);
    }
    supervising.cancel();
    supervisor.await.expect("supervisor");
    faults.sort_by_key(|f| f.start);
    let history = History {
        ops: rec.take(),
        faults,
        exits: sys.exits(),
        injected: sys.injected(),
    };
    let mut violations = check(&history, &facts);
    violations.extend(harness);
    let report = report::render(&plan, &history, &facts, &violations, load, wall.elapsed());
    if sys.scratch.keep {
        let path = sys.scratch.path.join("history.txt");
        let _ = std::fs::write(&path, report::history_text(&history));
        eprintln!("fault suite: history written to {}", path.display());
    }
    Outcome {
        plan,
        history,
        facts,
        violations,
        report,
    }
}

/// Which conditions of quiescence are missing, with the last lines the worker
/// and the app servers logged (warnings and errors by default), so that a
/// run on CI says why without its scratch directory.
async fn quiescence_violation(when: &str, sys: &System) -> Violation {
    let missing = sys.unsettled().await.join("; ");
    let mut tails = String::new();
    if let Ok(dir) = std::fs::read_dir(&sys.scratch.path) {
        let mut logs: Vec<_> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for path in logs {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(6)..];
            if tail.is_empty() {
                continue;
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            tails.push_str(&format!("\n      {}:", name.unwrap_or_default()));
            for l in tail {
                tails.push_str("\n        ");
                tails.push_str(&l.chars().take(300).collect::<String>());
            }
        }
    }
    Violation {
        rule: Rule::E,
        kind: "no quiescence",
        session: None,
        detail: format!(
            "{when}: within {QUIESCE:?} of restoring everything: {missing}; the logs end \
             with:{tails}"
        ),
    }
}

/// Waits until the app servers reach Redis, the healer has finished and
/// the audit group has drained every stream of the namespace. Each round
/// sends every app server a request with an unknown cookie, as traffic
/// would, so a store projects what it wrote in fallback mode.
async fn settle(sys: &System) -> bool {
    poll(QUIESCE, Duration::from_millis(100), || async {
        sys.poke_apps().await;
        sys.apps_healthy().await && sys.healed().await && sys.caught_up().await
    })
    .await
}

/// `vedfolnir-sessions verify`, until it exits 0 or [`VERIFY_PATIENCE`]
/// passes; the last run.
async fn verify(sys: &System) -> VerifyRun {
    let deadline = Instant::now() + VERIFY_PATIENCE;
    loop {
        let (code, stdout, stderr) = sys.cli(&["verify"], Duration::from_secs(60)).await;
        if code == Some(0) || Instant::now() >= deadline {
            return VerifyRun {
                code,
                stdout: format!("{stdout}{stderr}"),
            };
        }
        sys.poke_apps().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The audit tables, read directly (not through the proxy).
async fn read_facts(sys: &System, verify: VerifyRun) -> DbFacts {
    let events = session_events::Entity::find()
        .all(&sys.db.db)
        .await
        .expect("read session_events")
        .into_iter()
        .map(|e| AuditEvent {
            session_id: e.session_id,
            seq: e.seq,
            event_type: e.event_type,
            payload: e.payload,
            source: serde_json::to_value(e.source)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            user_id: e.user_id,
            occurred_at: e.occurred_at,
            schema_version: e.schema_version,
        })
        .collect();
    let dead_letters = dead_letters::Entity::find()
        .all(&sys.db.db)
        .await
        .expect("read dead_letters")
        .into_iter()
        .map(|d| DeadLetter {
            stream_id: d.stream_id,
            fields: d.fields,
            reason: d.reason,
        })
        .collect();
    let snapshots = session_snapshots::Entity::find()
        .all(&sys.db.db)
        .await
        .expect("read session_snapshots")
        .into_iter()
        .map(|s| SnapshotRow {
            session_id: s.session_id,
            seq: s.seq,
            status: serde_json::to_value(s.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            state: s.state,
        })
        .collect();
    DbFacts {
        events,
        dead_letters,
        snapshots,
        verify: Some(verify),
        damage: None,
        staged: staged_in_logs(&sys.scratch.path),
    }
}

/// The mutations of existing sessions that the app servers' logs say they
/// staged in the database (the warning of each staging, with its `events=`
/// count; the creation of a new session, staged at once, is left out).
fn staged_in_logs(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("app-"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .flat_map(|text| {
            text.lines()
                .filter(|l| l.contains("staged in the audit database") && !l.contains(":create{"))
                .map(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("events=")?.parse::<u64>().ok())
                        .unwrap_or(1)
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Damages Redis (see [`System::damage`]), then runs `verify` (which must
/// exit 1 naming each damaged session), `verify --repair`, and `verify`
/// again until it passes (or [`VERIFY_PATIENCE`]).
async fn damage_check(sys: &System) -> DamageCheck {
    let limit = Duration::from_secs(60);
    let damaged = match sys.damage().await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("  the damage could not be done: {e:#}");
            Vec::new()
        }
    };
    eprintln!(
        "  damage: {}",
        damaged
            .iter()
            .map(|(what, sid)| format!("{what} ({})", crate::checker::short(sid)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let run = |(code, out, err): (Option<i32>, String, String)| VerifyRun {
        code,
        stdout: format!("{out}{err}"),
    };
    let detected = run(sys.cli(&["verify"], limit).await);
    let repair = run(sys.cli(&["verify", "--repair"], limit).await);
    let after = verify(sys).await;
    DamageCheck {
        damaged,
        detected,
        repair,
        after,
    }
}
