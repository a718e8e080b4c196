#!/usr/bin/env bash
# The run command: the whole system on the embedded defaults.
#
# Starts Redis if needed, migrates the SQLite audit file, starts the worker
# (audit consumer, expiry reaper, healer), walks one session through its life
# with the CLI, then runs the demo: simulated app servers through a scripted
# day, a wipe of the demo's Redis data, the healing, and a report.
# Everything lives in the key namespace vedfolnir-demo: and the audit file
# demo-data/vedfolnir-audit.sqlite; no other key is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh
ensure_redis

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/vedfolnir-sessions/target}"
echo "== building (release)"
cargo build --locked --release -q -p vedfolnir-cli -p vedfolnir-worker --bins
cli="$CARGO_TARGET_DIR/release/vedfolnir-sessions"
worker_bin="$CARGO_TARGET_DIR/release/vedfolnir-worker"

mkdir -p demo-data
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
export REDIS_SESSION_PREFIX="vedfolnir-demo:session:"
export REDIS_EVENT_STREAM="vedfolnir-demo:events"
export DATABASE_URL="sqlite://demo-data/vedfolnir-audit.sqlite?mode=rwc"
# A short day needs short idle timeouts so that some sessions idle out.
export REDIS_SESSION_TIMEOUT=8 SESSION_TOUCH_INTERVAL=1 REAPER_INTERVAL_MS=250 HEAL_CHECK_MS=250
export AUDIT_BLOCK_MS=200 RUST_LOG="${RUST_LOG:-warn}"

# A fresh demo each run: its own audit file and namespace.
rm -f demo-data/vedfolnir-audit.sqlite*
keys=$(redis-cli -u "$REDIS_URL" --no-auth-warning --scan --pattern 'vedfolnir-demo:*' | head -n 100000)
[ -z "$keys" ] || printf '%s\n' "$keys" | xargs -n 500 redis-cli -u "$REDIS_URL" --no-auth-warning DEL >/dev/null

step() { printf '\n\033[1m$ vedfolnir-sessions %s\033[0m\n' "$*"; "$cli" "$@"; }

step migrate

echo; echo "== starting the worker"
"$worker_bin" 2> demo-data/worker.log &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker 2>/dev/null || true' EXIT

echo; echo "== one session through its life"
out=$(step session create --user-id 1 --username admin --email admin@example.com --role admin)
echo "$out"
id=$(printf '%s' "$out" | sed -n 's/^  "session_id": "\([0-9a-f]*\)".*/\1/p')
step session set "$id" theme='"dark"' items_per_page=25
step session switch-platform "$id" --platform-connection-id 123 --platform-name "My Platform" \
  --platform-type mastodon --platform-instance-url https://mastodon.example.com
step session show "$id"
step session destroy "$id" --reason logout
sleep 1
step history "$id"

echo; echo "== the demo"
"$cli" demo --app-servers 4 --users 40 --day 12

echo; echo "== stopping the worker (SIGTERM: it finishes its batch and exits 0)"
kill -TERM $worker
wait $worker && echo "worker exited 0"
trap - EXIT
