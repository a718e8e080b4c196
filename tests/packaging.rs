//! What a library user gets: the published crate and what it pulls in.
//!
//! The package (`cargo package --list`) holds the library alone: its
//! sources, the README and the licences, with the metadata crates.io and
//! docs.rs show. With the feature `axum` alone (the store and the layer, no
//! audit database, no TLS), as `cargo tree` resolves it from the lock file,
//! the library pulls in
//!
//! - at most [`BOUND`] crates besides itself;
//! - none of the crates that belong to the audit database, the binaries or
//!   their exporters;
//! - tokio with only what the library uses (no multi-threaded runtime, no
//!   signals, files or processes: those are the binaries').
//!
//! The figures when the bound was set: 259 crates before the workspace was
//! split (`--features web`), 126 after.

use std::process::Command;

/// The most crates `--no-default-features --features axum` may pull in.
const BOUND: usize = 160;

/// Crates (or name prefixes) that must not reach a build with `axum` alone.
const FORBIDDEN: &[&str] = &[
    "sea-orm",
    "sea-query",
    "sqlx",
    "libsqlite3-sys",
    "clap",
    "indicatif",
    "mimalloc",
    "libmimalloc-sys",
    "tracing-subscriber",
    "tracing-opentelemetry",
    "anyhow",
    "opentelemetry_sdk",
    "opentelemetry-otlp",
    "opentelemetry-prometheus",
    "prometheus",
    "rustls",
    "ring",
];

/// tokio features only binaries need.
const TOKIO_FOR_BINARIES: &[&str] = &[
    "full",
    "rt-multi-thread",
    "signal",
    "fs",
    "process",
    "io-std",
];

/// Runs cargo in the workspace; its stdout.
fn cargo(args: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(args)
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "cargo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cargo tree` of the library with `features`, normal dependencies only, one
/// `name vX.Y.Z [features]` line per crate (the library itself left out).
fn tree(features: &str) -> Vec<String> {
    let out = cargo(&[
        "tree",
        "--locked",
        "--offline",
        "-e",
        "normal",
        "-p",
        "vedfolnir-sessions",
        "--no-default-features",
        "--features",
        features,
        "--prefix",
        "none",
        "--format",
        "{p} [{f}]",
    ]);
    let mut lines: Vec<String> = out
        .lines()
        .map(|l| l.trim_end_matches(" (*)").to_owned())
        .filter(|l| !l.is_empty() && !l.starts_with("vedfolnir-sessions "))
        .collect();
    lines.sort();
    lines.dedup();
    lines
}

fn name(line: &str) -> &str {
    line.split(' ').next().unwrap_or_default()
}

fn distinct_crates(lines: &[String]) -> Vec<String> {
    // `name vX.Y.Z`: one crate, whatever its features print as.
    let mut crates: Vec<String> = lines
        .iter()
        .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect();
    crates.sort();
    crates.dedup();
    crates
}

#[test]
fn the_store_and_the_layer_pull_in_at_most_the_bound() {
    let lines = tree("axum");
    let crates = distinct_crates(&lines);
    assert!(
        crates.len() <= BOUND,
        "`vedfolnir-sessions --no-default-features --features axum` pulls in {} crates, over \
         the bound of {BOUND}:\n{}",
        crates.len(),
        crates.join("\n")
    );
    // The tree is read right: the crates the feature needs are there.
    for needed in ["axum", "redis", "tokio", "tower"] {
        assert!(
            lines.iter().any(|l| name(l) == needed),
            "{needed} missing from the tree"
        );
    }
}

#[test]
fn no_database_binary_or_exporter_crate_reaches_the_layer() {
    let lines = tree("axum");
    let found: Vec<&String> = lines
        .iter()
        .filter(|l| FORBIDDEN.iter().any(|f| name(l).starts_with(f)))
        .collect();
    assert!(
        found.is_empty(),
        "crates that belong to the audit database, the binaries or TLS: {found:?}"
    );
}

#[test]
fn tokio_has_only_the_features_the_library_uses() {
    let lines = tree("axum");
    let tokio: Vec<&String> = lines.iter().filter(|l| name(l) == "tokio").collect();
    assert!(!tokio.is_empty(), "tokio missing from the tree");
    for line in tokio {
        let features = line
            .split('[')
            .nth(1)
            .unwrap_or_default()
            .trim_end_matches(']');
        for f in features.split(',') {
            assert!(
                !TOKIO_FOR_BINARIES.contains(&f),
                "tokio's `{f}` reaches the library: {line}"
            );
        }
    }
}

#[test]
fn the_audit_feature_brings_the_database() {
    // The other side of the bound: the crates kept out above are what
    // `audit` is for, so the check cannot pass by reading an empty tree.
    let lines = tree("axum,audit");
    for needed in ["sea-orm", "vedfolnir-migrations"] {
        assert!(
            lines.iter().any(|l| name(l) == needed),
            "{needed} missing with `audit`"
        );
    }
}

#[test]
fn the_package_is_the_library_with_its_readme_and_licences() {
    let list = cargo(&[
        "package",
        "--list",
        "--offline",
        "--allow-dirty",
        "-p",
        "vedfolnir-sessions",
    ]);
    let files: Vec<&str> = list.lines().map(str::trim).collect();
    for needed in [
        "README.md",
        "LICENSE-MIT",
        "LICENSE-APACHE",
        "Cargo.toml",
        "src/lib.rs",
        "src/lua/session.lua",
    ] {
        assert!(
            files.contains(&needed),
            "{needed} is not packaged: {files:?}"
        );
    }
    // Only the library: no tests, guides, scripts or other crates.
    let extra: Vec<&&str> = files
        .iter()
        .filter(|f| {
            !f.starts_with("src/")
                && ![
                    "README.md",
                    "LICENSE-MIT",
                    "LICENSE-APACHE",
                    "Cargo.toml",
                    "Cargo.toml.orig",
                    "Cargo.lock",
                    ".cargo_vcs_info.json",
                ]
                .contains(*f)
        })
        .collect();
    assert!(extra.is_empty(), "packaged beside the library: {extra:?}");
}

#[test]
fn the_manifest_describes_the_crate_for_crates_io_and_docs_rs() {
    let meta: serde_json::Value = serde_json::from_str(&cargo(&[
        "metadata",
        "--no-deps",
        "--offline",
        "--format-version",
        "1",
    ]))
    .expect("cargo metadata is JSON");
    let lib = meta["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "vedfolnir-sessions"))
        .expect("the library package");
    for field in ["description", "license", "readme", "repository"] {
        assert!(
            lib[field].as_str().is_some_and(|v| !v.is_empty()),
            "{field} missing"
        );
    }
    for list in ["keywords", "categories"] {
        assert!(
            lib[list].as_array().is_some_and(|v| !v.is_empty()),
            "{list} missing"
        );
    }
    assert_eq!(
        lib["metadata"]["docs"]["rs"]["all-features"],
        serde_json::Value::Bool(true),
        "docs.rs documents every feature"
    );
    // Only library targets: the binaries live in their own crates.
    let kinds: Vec<&serde_json::Value> = lib["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .flat_map(|t| t["kind"].as_array().into_iter().flatten())
        .collect();
    assert!(
        kinds.iter().all(|k| *k == "lib"),
        "targets other than the library: {kinds:?}"
    );
}
