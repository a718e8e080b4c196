//! The table printed at the end of a run: operations by kind and outcome,
//! faults by kind, the audit trail, and the violations with their details.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use crate::checker::{Class, Rule, Violation, class, describe};
use crate::history::{DbFacts, FaultKind, History};
use crate::schedule::Plan;

/// Details printed per kind of violation.
const DETAILS: usize = 5;

pub fn render(
    plan: &Plan,
    h: &History,
    facts: &DbFacts,
    violations: &[Violation],
    load: Duration,
    wall: Duration,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "== fault suite report: seed {}, load {:.1}s, whole run {:.1}s",
        plan.settings.seed,
        load.as_secs_f64(),
        wall.as_secs_f64()
    );

    let mut ops: BTreeMap<String, ([usize; 3], Vec<Duration>)> = BTreeMap::new();
    for op in &h.ops {
        let name = if op.final_read {
            format!("{} (final)", op.action.name())
        } else {
            op.action.name().to_owned()
        };
        let (row, latencies) = ops.entry(name).or_default();
        row[match class(op) {
            Class::Ok => 0,
            Class::Fail => 1,
            Class::Unknown => 2,
        }] += 1;
        latencies.push(op.complete.saturating_sub(op.invoke));
    }
    let _ = writeln!(
        s,
        "{:<22} {:>7} {:>7} {:>8} {:>7} {:>10} {:>10}",
        "operation", "ok", "fail", "unknown", "total", "p50 (ms)", "max (ms)"
    );
    let mut total = [0usize; 3];
    for (name, (row, latencies)) in &mut ops {
        for (t, r) in total.iter_mut().zip(row.iter()) {
            *t += r;
        }
        latencies.sort();
        let p50 = latencies[latencies.len() / 2];
        let max = latencies[latencies.len() - 1];
        let _ = writeln!(
            s,
            "{name:<22} {:>7} {:>7} {:>8} {:>7} {:>10} {:>10}",
            row[0],
            row[1],
            row[2],
            row.iter().sum::<usize>(),
            p50.as_millis(),
            max.as_millis()
        );
    }
    let _ = writeln!(
        s,
        "{:<22} {:>7} {:>7} {:>8} {:>7}",
        "all",
        total[0],
        total[1],
        total[2],
        total.iter().sum::<usize>()
    );

    let mut faults: BTreeMap<FaultKind, (usize, Duration, Duration, usize)> = BTreeMap::new();
    for f in &h.faults {
        let row = faults.entry(f.kind).or_default();
        row.0 += 1;
        row.1 += f.end - f.start;
        match f.settled {
            Some(t) => row.2 = row.2.max(t.saturating_sub(f.end)),
            None => row.3 += 1,
        }
    }
    let _ = writeln!(
        s,
        "\n{:<22} {:>7} {:>9} {:>11} {:>11}",
        "fault", "count", "held (s)", "settle max", "unsettled"
    );
    for (kind, (n, held, settle, unsettled)) in &faults {
        let _ = writeln!(
            s,
            "{:<22} {n:>7} {:>9.2} {:>10.2}s {unsettled:>11}",
            kind.name(),
            held.as_secs_f64(),
            settle.as_secs_f64()
        );
    }

    let mut exits: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for e in &h.exits {
        let row = exits.entry(&e.who).or_default();
        if e.started {
            row.0 += 1;
        } else {
            row.1 += 1;
        }
    }
    if !exits.is_empty() {
        let _ = writeln!(s, "\nexited by themselves (restarted by the harness):");
        for (who, (running, starting)) in &exits {
            let _ = writeln!(
                s,
                "  {who}: {running} while running, {starting} while starting"
            );
        }
    }

    let fallback = facts
        .events
        .iter()
        .filter(|e| e.source == "fallback")
        .count();
    let _ = writeln!(
        s,
        "\naudit trail: {} events ({fallback} written in fallback mode; {} mutations staged \
         while Redis was unreachable), {} dead letters, verify exit {}",
        facts.events.len(),
        facts.staged,
        facts.dead_letters.len(),
        facts
            .verify
            .as_ref()
            .and_then(|v| v.code)
            .map_or_else(|| "none".to_owned(), |c| c.to_string())
    );

    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &facts.dead_letters {
        *reasons.entry(&d.reason).or_default() += 1;
    }
    for (reason, n) in reasons {
        let _ = writeln!(s, "  dead letter ×{n}: {reason}");
    }
    let _ = writeln!(
        s,
        "  {} invalid entries injected, {} snapshots folded and compared",
        h.injected.len(),
        facts.snapshots.len()
    );
    if let Some(d) = &facts.damage {
        let code = |v: &crate::history::VerifyRun| {
            v.code.map_or_else(|| "none".to_owned(), |c| c.to_string())
        };
        let _ = writeln!(
            s,
            "  damage: {}; verify exit {}, verify --repair exit {}, verify again exit {}",
            d.damaged
                .iter()
                .map(|(what, sid)| format!("{what} ({})", crate::checker::short(sid)))
                .collect::<Vec<_>>()
                .join(", "),
            code(&d.detected),
            code(&d.repair),
            code(&d.after)
        );
    }

    let mut by_kind: BTreeMap<(Rule, &str), Vec<&Violation>> = BTreeMap::new();
    for v in violations {
        by_kind.entry((v.rule, v.kind)).or_default().push(v);
    }
    let _ = writeln!(s, "\nviolations: {}", violations.len());
    let mut rule = None;
    for ((r, kind), vs) in &by_kind {
        if rule != Some(*r) {
            let _ = writeln!(s, "{}", r.title());
            rule = Some(*r);
        }
        let _ = writeln!(s, "  {kind}: {}", vs.len());
        for v in vs.iter().take(DETAILS) {
            let _ = writeln!(s, "    - {}", v.detail);
            if let Some(sid) = &v.session {
                let _ = writeln!(s, "      audit trail: {}", trail(facts, sid));
            }
        }
        if vs.len() > DETAILS {
            let _ = writeln!(s, "    - … and {} more", vs.len() - DETAILS);
        }
    }
    s
}

/// A session's events in `session_events`, one short item each:
/// `seq type/source` plus the reason of an end, the keys of an update, the
/// session a rotation came from.
fn trail(facts: &DbFacts, sid: &str) -> String {
    let mut events: Vec<_> = facts
        .events
        .iter()
        .filter(|e| e.session_id == sid)
        .collect();
    events.sort_by_key(|e| e.seq);
    if events.is_empty() {
        return "none".to_owned();
    }
    let items: Vec<String> = events
        .iter()
        .map(|e| {
            let p: Value = serde_json::from_str(&e.payload).unwrap_or(Value::Null);
            let what = match e.event_type.as_str() {
                "destroyed" => p["reason"].as_str().unwrap_or_default().to_owned(),
                "updated" => p["set"]
                    .as_object()
                    .map(|m| m.keys().cloned().collect::<Vec<_>>().join("+"))
                    .unwrap_or_default(),
                "created" => p["rotated_from"]
                    .as_str()
                    .map(|f| format!("from {}", &f[..f.len().min(10)]))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            let source = if e.source == "fallback" {
                "/fallback"
            } else {
                ""
            };
            format!(
                "{} {}{source}{}",
                e.seq,
                e.event_type,
                if what.is_empty() {
                    String::new()
                } else {
                    format!(" {what}")
                }
            )
        })
        .collect();
    items.join(", ")
}

/// The whole history, one line per operation, fault and exit, in time
/// order: what `VEDFOLNIR_FAULTS_KEEP=1` leaves beside the logs.
pub fn history_text(h: &History) -> String {
    let mut lines: Vec<(Duration, String)> = Vec::new();
    for op in &h.ops {
        let session = op.session.as_deref().map_or("-", |s| &s[..s.len().min(10)]);
        let phase = if op.final_read { " (final)" } else { "" };
        lines.push((
            op.invoke,
            format!("{} session {session}{phase}", describe(op)),
        ));
    }
    for i in &h.injected {
        lines.push((
            i.at,
            format!(
                "INJECTED {} as stream entry {} (session {})",
                i.what,
                i.stream_id,
                &i.session_id[..i.session_id.len().min(10)]
            ),
        ));
    }
    for f in &h.faults {
        lines.push((
            f.start,
            format!(
                "FAULT {}{} [{:.3}s..{:.3}s] settled {}",
                f.kind.name(),
                f.target.map(|t| format!(" #{t}")).unwrap_or_default(),
                f.start.as_secs_f64(),
                f.end.as_secs_f64(),
                f.settled.map_or_else(
                    || "never".to_owned(),
                    |t| format!("{:.3}s", t.as_secs_f64())
                )
            ),
        ));
    }
    for e in &h.exits {
        let when = if e.started { "running" } else { "starting" };
        lines.push((
            e.at,
            format!(
                "EXIT {} at {:.3}s ({when}, {})",
                e.who,
                e.at.as_secs_f64(),
                e.status
            ),
        ));
    }
    lines.sort_by_key(|(t, _)| *t);
    let mut s = String::new();
    for (_, l) in lines {
        s.push_str(&l);
        s.push('\n');
    }
    s
}
