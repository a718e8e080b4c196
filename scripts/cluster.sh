#!/usr/bin/env bash
# A local Redis Cluster for the cluster tests and for trying the store on a
# partitioned Redis: three primaries with one replica each, on loopback.
#
#   bash scripts/cluster.sh start    # idempotent: a no-op when the cluster is already up
#   bash scripts/cluster.sh stop     # shut the nodes down and remove their directory
#   bash scripts/cluster.sh status   # state of every node; exit status 0 only when all are ok
#   bash scripts/cluster.sh nodes    # the seed list, the value for REDIS_CLUSTER_NODES
#
# Ports: VEDFOLNIR_CLUSTER_PORT_BASE (default 7100) up to base+5; the cluster
# bus of each node listens on port+10000. No persistence: a stopped cluster
# is gone. Node files, logs and pid files live in
# ${TMPDIR:-/tmp}/vedfolnir-cluster-<base>.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh
log() { printf '[cluster] %s\n' "$*" >&2; }

BASE=${VEDFOLNIR_CLUSTER_PORT_BASE:-7100}
case $BASE in
  '' | *[!0-9]*) log "VEDFOLNIR_CLUSTER_PORT_BASE=$BASE is not a port number"; exit 2 ;;
esac
if [ "$BASE" -lt 1024 ] || [ "$BASE" -gt 55530 ]; then
  # port+10000 (the cluster bus) must stay a valid port.
  log "VEDFOLNIR_CLUSTER_PORT_BASE=$BASE is out of range (1024..55530)"; exit 2
fi
COUNT=6
PORTS=$(seq "$BASE" $((BASE + COUNT - 1)))
DIR="${TMPDIR:-/tmp}"
DIR="${DIR%/}/vedfolnir-cluster-$BASE"
# A failover takes about node-timeout plus an election: keep it short.
NODE_TIMEOUT_MS=${VEDFOLNIR_CLUSTER_NODE_TIMEOUT_MS:-2000}
# How long start waits for each phase (startup, slots agreed, replicas synced).
WAIT_SECONDS=${VEDFOLNIR_CLUSTER_WAIT_SECONDS:-60}

cli() { local port=$1; shift; redis-cli -h 127.0.0.1 -p "$port" "$@"; }

# The value of one "field:value" line of CLUSTER INFO or INFO output.
field() { tr -d '\r' | sed -n "s/^$1://p"; }

node_state() { cli "$1" cluster info 2>/dev/null | field cluster_state; }

# True when every node answers CLUSTER INFO with cluster_state:ok, knows all
# the nodes and sees every slot assigned.
all_ok() {
  local port info
  for port in $PORTS; do
    info=$(cli "$port" cluster info 2>/dev/null) || return 1
    [ "$(field cluster_state <<<"$info")" = ok ] || return 1
    [ "$(field cluster_known_nodes <<<"$info")" = "$COUNT" ] || return 1
    [ "$(field cluster_slots_assigned <<<"$info")" = 16384 ] || return 1
  done
}

# True when every replica has its link to its primary up and no sync running,
# and there are COUNT/2 of them.
replicas_synced() {
  local port info replicas=0
  for port in $PORTS; do
    info=$(cli "$port" info replication 2>/dev/null) || return 1
    if [ "$(field role <<<"$info")" = slave ]; then
      [ "$(field master_link_status <<<"$info")" = up ] || return 1
      [ "$(field master_sync_in_progress <<<"$info")" = 0 ] || return 1
      replicas=$((replicas + 1))
    fi
  done
  [ "$replicas" -eq $((COUNT / 2)) ]
}

# True when something accepts connections on this loopback port.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_of() { cat "$DIR/$1/redis.pid" 2>/dev/null || true; }

# True when the pid file of this port names a live redis-server of ours.
ours_running() {
  local pid
  pid=$(pid_of "$1")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] &&
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -Eq "redis-server.*:$1( |\$)"
}

stop_nodes() {
  local port pid pids=()
  for port in $PORTS; do
    if ours_running "$port"; then
      pid=$(pid_of "$port")
      cli "$port" shutdown nosave >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  local deadline=$((SECONDS + 20))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do
      if [ "$SECONDS" -ge "$deadline" ]; then kill -9 "$pid" 2>/dev/null || true; fi
      sleep 0.05
    done
  done
  if [ -d "$DIR" ]; then
    rm -rf "$DIR"
  fi
}

start() {
  if all_ok; then
    log "cluster on 127.0.0.1:$BASE..$((BASE + COUNT - 1)) is already up"
    return 0
  fi
  command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 ||
    apt_install redis-server redis-tools

  # Our nodes may be up but the cluster not yet settled (a failover in
  # progress, a start still running elsewhere): give them a moment.
  local ours=0 port
  for port in $PORTS; do ours_running "$port" && ours=$((ours + 1)); done
  if [ "$ours" -eq "$COUNT" ] && poll "the running cluster to be ok (rebuilding it)" 10 all_ok; then
    log "cluster on 127.0.0.1:$BASE..$((BASE + COUNT - 1)) is up"
    return 0
  fi

  # A fresh start: whatever a previous cluster left behind (node files that
  # would make the nodes rejoin an old cluster, half-started nodes) goes.
  stop_nodes
  for port in $PORTS; do
    if listening "$port" || listening $((port + 10000)); then
      log "port $port or $((port + 10000)) is taken by a process that is not ours; set VEDFOLNIR_CLUSTER_PORT_BASE"
      return 1
    fi
  done
  log "starting 6 nodes on 127.0.0.1:$BASE..$((BASE + COUNT - 1)) in $DIR (node timeout ${NODE_TIMEOUT_MS} ms)"
  for port in $PORTS; do
    mkdir -p "$DIR/$port"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" \
      --cluster-enabled yes --cluster-config-file "$DIR/$port/nodes.conf" \
      --cluster-node-timeout "$NODE_TIMEOUT_MS" \
      --save "" --appendonly no \
      --dir "$DIR/$port" --pidfile "$DIR/$port/redis.pid" \
      --logfile "$DIR/$port/redis.log"
  done
  for port in $PORTS; do
    if ! poll "node $port to answer PING" "$WAIT_SECONDS" cli "$port" ping; then
      tail -n 20 "$DIR/$port/redis.log" >&2 || true
      return 1
    fi
  done

  local seeds=()
  for port in $PORTS; do seeds+=("127.0.0.1:$port"); done
  log "creating the cluster: 3 primaries, 1 replica each"
  redis-cli --cluster create "${seeds[@]}" --cluster-replicas 1 --cluster-yes >"$DIR/create.log" 2>&1 || {
    cat "$DIR/create.log" >&2; return 1
  }
  poll "cluster_state:ok on every node" "$WAIT_SECONDS" all_ok
  poll "every replica to be in sync" "$WAIT_SECONDS" replicas_synced
  log "cluster up: $(nodes)"
}

status() {
  local port state role rc=0
  for port in $PORTS; do
    state=$(node_state "$port" || true)
    role=$(cli "$port" info replication 2>/dev/null | field role || true)
    printf '127.0.0.1:%s %s %s\n' "$port" "${role:-down}" "cluster_state:${state:-unreachable}"
    [ "$state" = ok ] || rc=1
  done
  cli "$BASE" cluster nodes 2>/dev/null | sort -k2 || true
  return "$rc"
}

nodes() {
  local port out=()
  for port in $PORTS; do out+=("127.0.0.1:$port"); done
  (IFS=,; printf '%s\n' "${out[*]}")
}

case "${1:-}" in
  start) start ;;
  stop) stop_nodes; log "cluster on 127.0.0.1:$BASE.. stopped" ;;
  status) status ;;
  nodes) nodes ;;
  *) echo "usage: bash scripts/cluster.sh start|stop|status|nodes" >&2; exit 2 ;;
esac
