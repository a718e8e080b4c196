#!/usr/bin/env bash
# The test command: start what the tests need, then format check, clippy with
# -D warnings, the library alone with the `axum` feature (build, clippy, unit
# tests), the documentation with -D warnings, the published package, and the
# whole suite against the real Redis and PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh
ensure_redis
ensure_postgres
ensure_chromium
ensure_cluster
ensure_python

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/vedfolnir-sessions/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== the library with the axum feature alone: build, clippy, unit tests"
lean=(-p vedfolnir-sessions --no-default-features --features axum --locked)
cargo build "${lean[@]}"
cargo clippy "${lean[@]}" --all-targets -- -D warnings
cargo test "${lean[@]}" --lib
echo "== cargo doc -D warnings (default features, every feature)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked -p vedfolnir-sessions
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked -p vedfolnir-sessions --all-features
echo "== cargo package: the library (and the migrations it depends on), built from the packages"
cargo package --locked --allow-dirty -p vedfolnir-migrations -p vedfolnir-sessions
echo "== promtool: alert rules, their unit tests, the Prometheus configuration"
ensure_promtool
promtool check rules observability/prometheus/alerts.yml
promtool check config observability/prometheus/prometheus.yml
(cd observability/prometheus && promtool test rules alerts_test.yml)
echo "== cargo test"
# The store suite also runs on the local Redis Cluster through this seed list.
VEDFOLNIR_TEST_CLUSTER_NODES=$(bash scripts/cluster.sh nodes)
export VEDFOLNIR_TEST_CLUSTER_NODES
cargo test --workspace --locked --no-fail-fast
echo "== python: pip install ./python into a venv, then pytest"
# The package's own suite, the Flask integration and the cross-language
# end-to-end test (it runs the example app, the worker and the CLI built
# above).
VENV="$HOME/.cache/vedfolnir-sessions/venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check pytest flask flask-session redis
# The README's install command; the wheel is built with the dev profile
# here, so it reuses most of what `cargo test` just compiled (a plain
# `pip install ./python` builds a release wheel).
MATURIN_PEP517_ARGS="--profile dev" \
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check ./python
# `pytest` itself, not `python -m pytest`: the latter puts python/ first on
# the path, where the package's sources (without the native module the
# wheel installed) would shadow the installed package.
(cd python && "$VENV/bin/pytest" -q -p no:cacheprovider)
