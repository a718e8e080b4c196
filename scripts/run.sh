#!/usr/bin/env bash
# The run command: starts Redis if needed and walks one session through its
# life with the operator CLI, printing each step. It works in its own key
# namespace (vedfolnir-demo:) and never touches other keys.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh
ensure_redis

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/vedfolnir-sessions/target}"
cargo build --locked --release -q --bin vedfolnir-sessions
cli="$CARGO_TARGET_DIR/release/vedfolnir-sessions"

export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
export REDIS_SESSION_PREFIX="vedfolnir-demo:session:"
export REDIS_EVENT_STREAM="vedfolnir-demo:events"

step() { printf '\n\033[1m$ vedfolnir-sessions %s\033[0m\n' "$*"; "$cli" "$@"; }

out=$(step session create --user-id 1 --username admin --email admin@example.com --role admin)
echo "$out"
id=$(printf '%s' "$out" | sed -n 's/^  "session_id": "\([0-9a-f]*\)".*/\1/p')
step session set "$id" theme='"dark"' items_per_page=25
step session switch-platform "$id" --platform-connection-id 123 --platform-name "My Platform" \
  --platform-type mastodon --platform-instance-url https://mastodon.example.com
step session unset "$id" items_per_page
step session show "$id"
step user sessions 1
step stats
step session destroy "$id" --reason logout
printf '\n$ vedfolnir-sessions session show %s   (destroyed: exits 1)\n' "$id"
"$cli" session show "$id" || echo "exit code $?"
printf '\nThe events of this session, from the stream %s:\n' "$REDIS_EVENT_STREAM"
redis-cli -u "$REDIS_URL" --no-auth-warning XRANGE "$REDIS_EVENT_STREAM" - + |
  paste -sd' ' | grep -o "session_id $id seq [0-9]* type [a-z_]*" || true
step health
