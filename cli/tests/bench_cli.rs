//! `vedfolnir-sessions bench` end to end: a short store suite against the
//! real Redis prints the documented JSON, with figures that make sense, and
//! leaves no key behind.

use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vedfolnir-sessions");

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

fn number(r: &Value, field: &str) -> f64 {
    r[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number in {r}"))
}

#[test]
fn store_suite_reports_every_workload_and_cleans_up() {
    let out = Command::new(BIN)
        .args([
            "bench",
            "--suite",
            "store",
            "--clients",
            "4",
            "--duration",
            "1",
            "--rounds",
            "2",
            "--json",
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("REDIS_URL", redis_url())
        .output()
        .expect("run the CLI");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    assert!(
        stderr.contains("bench store:"),
        "progress goes to stderr: {stderr}"
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("only JSON on stdout");

    let results = report["results"].as_array().expect("results");
    let ops: Vec<&str> = results.iter().filter_map(|r| r["op"].as_str()).collect();
    assert_eq!(
        ops,
        ["create", "load", "update", "update_from", "touch", "mixed"]
    );
    for r in results {
        for field in ["ops_per_sec", "baseline_ops_per_sec", "ratio", "p50_ms"] {
            assert!(number(r, field) > 0.0, "{field} not positive in {r}");
        }
        let (p50, p95, p99, max) = (
            number(r, "p50_ms"),
            number(r, "p95_ms"),
            number(r, "p99_ms"),
            number(r, "max_ms"),
        );
        assert!(
            p50 <= p95 && p95 <= p99 && p99 <= max,
            "percentiles out of order in {r}"
        );
        let ratio = number(r, "ratio");
        let expected = number(r, "ops_per_sec") / number(r, "baseline_ops_per_sec");
        assert!(
            (ratio - expected).abs() < 0.01,
            "ratio is ours / baseline in {r}"
        );
        assert_eq!(r["errors"], 0, "no failed operation in {r}");
        assert!(r["baseline"].as_str().is_some_and(|b| !b.is_empty()));
        // Every workload that writes also runs the logging baseline (SET +
        // XADD in one script); a load has none.
        if r["op"] == "load" {
            assert!(
                r["logged_ops_per_sec"].is_null(),
                "a load has no logging baseline: {r}"
            );
        } else {
            assert!(
                number(r, "logged_ops_per_sec") > 0.0,
                "no logging baseline in {r}"
            );
            assert_eq!(r["logged_errors"], 0, "no failed logging write in {r}");
            let expected = number(r, "ops_per_sec") / number(r, "logged_ops_per_sec");
            assert!(
                (number(r, "ratio_to_logged") - expected).abs() < 0.01,
                "ratio_to_logged is ours / logging baseline in {r}"
            );
            assert!(
                r["logged_baseline"]
                    .as_str()
                    .is_some_and(|b| b.contains("XADD"))
            );
            // Redis time per operation from INFO commandstats, for both.
            assert!(number(r, "redis_us_per_op") > 0.0, "{r}");
            assert!(number(r, "logged_redis_us_per_op") > 0.0, "{r}");
            // The median over the two rounds is their mean.
            let rounds = r["rounds"].as_array().expect("rounds");
            assert_eq!(rounds.len(), 2, "{r}");
            let mean = (number(&rounds[0], "ratio_to_logged")
                + number(&rounds[1], "ratio_to_logged"))
                / 2.0;
            assert!(
                (number(r, "median_ratio_to_logged") - mean).abs() < 0.002,
                "median of the rounds in {r}"
            );
            assert!(number(r, "median_redis_us_ratio_to_logged") > 0.0, "{r}");
        }
        // The calls that take no state (update, touch) also run the logging
        // baseline reading the session first; the others do not.
        if r["op"] == "update" || r["op"] == "touch" {
            assert!(number(r, "read_logged_ops_per_sec") > 0.0, "{r}");
            assert_eq!(
                r["read_logged_errors"], 0,
                "no failed read-first write in {r}"
            );
            assert!(
                r["read_logged_baseline"]
                    .as_str()
                    .is_some_and(|b| b.starts_with("GET"))
            );
            let rounds = r["rounds"].as_array().expect("rounds");
            let mean = (number(&rounds[0], "ratio_to_read_logged")
                + number(&rounds[1], "ratio_to_read_logged"))
                / 2.0;
            assert!(
                (number(r, "median_ratio_to_read_logged") - mean).abs() < 0.002,
                "median of the rounds in {r}"
            );
        } else {
            assert!(r["read_logged_ops_per_sec"].is_null(), "{r}");
        }
    }

    let memory = &report["memory"];
    for field in [
        "bytes_per_live_session",
        "plain_bytes_per_session",
        "session_key_bytes",
        "index_bytes_per_session",
        "bytes_per_stream_entry",
        "stream_entries",
    ] {
        assert!(
            number(memory, field) > 0.0,
            "{field} not positive in {memory}"
        );
    }
    // The session key holds the JSON, so it takes at least its length.
    assert!(number(memory, "session_key_bytes") >= number(memory, "session_json_bytes"));
    // The lean layout keeps no ledger for sessions far from their deadline.
    assert_eq!(number(memory, "ledger_key_bytes"), 0.0, "{memory}");
    let live = number(memory, "bytes_per_live_session");
    assert!(
        (live - number(memory, "session_key_bytes") - number(memory, "index_bytes_per_session"))
            .abs()
            < 0.2,
        "a live session is its key and its index entries: {memory}"
    );
    assert!(
        (number(memory, "ratio_to_plain") - live / number(memory, "plain_bytes_per_session")).abs()
            < 0.002,
        "{memory}"
    );
    // Every target of the write path, each with a value and a verdict (the
    // p99 target is stated for 64 clients: no verdict at 4).
    let targets = report["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 11, "{targets:?}");
    for t in targets {
        assert!(t["value"].is_number(), "{t}");
        let p99 = t["target"].as_str().is_some_and(|n| n.contains("p99"));
        assert_eq!(t["met"].is_boolean(), !p99, "{t}");
    }

    // Nothing of the run's namespace is left.
    let ns = report["namespace"].as_str().expect("namespace");
    assert!(ns.starts_with("vedfolnir-bench:"), "{ns}");
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut conn = client.get_connection().expect("connect to redis");
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}*"))
        .query(&mut conn)
        .expect("KEYS");
    assert!(left.is_empty(), "the bench left {} keys behind", left.len());
}
