#!/usr/bin/env bash
# Start the local services the product needs, installing what is missing.
# Sourced by scripts/test.sh and scripts/run.sh; safe to run on its own:
#   bash scripts/services.sh redis postgres
# Each service is started only when it is not already answering on its
# standard loopback port, and installed with apt-get only when it is missing.

log() { printf '[services] %s\n' "$*" >&2; }

apt_install() {
  if [ -z "${_VEDFOLNIR_APT_UPDATED:-}" ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    _VEDFOLNIR_APT_UPDATED=1
  fi
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Polls "$@" every 0.1 s until it succeeds or the deadline passes.
poll() {
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then log "timed out after ${seconds}s waiting for $what"; return 1; fi
    sleep 0.1
  done
}

# A service that was just started: ten seconds to answer.
wait_for() {
  local what=$1; shift
  poll "$what" 10 "$@"
}

ensure_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then return 0; fi
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server redis-tools
  log "starting redis on 127.0.0.1:6379 (no persistence)"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/vedfolnir.log
  wait_for redis redis-cli -h 127.0.0.1 -p 6379 ping
}

ensure_postgres() {
  if pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then return 0; fi
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql
    # Trust local TCP connections, as the development machines do.
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
      sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    done
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  log "starting postgresql $version on 127.0.0.1:5432"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
  wait_for postgresql pg_isready -h 127.0.0.1 -p 5432
}

ensure_cluster() {
  # The local Redis Cluster (3 primaries, 1 replica each, ports 7100..7105
  # unless VEDFOLNIR_CLUSTER_PORT_BASE says otherwise); see scripts/cluster.sh.
  bash "$(dirname "${BASH_SOURCE[0]}")/cluster.sh" start
}

ensure_chromium() {
  # The headless browser test (tests/browser.rs) drives Debian's chromium.
  if command -v chromium >/dev/null 2>&1; then return 0; fi
  apt_install chromium
}

ensure_promtool() {
  # The alert rule checks use promtool from Debian's prometheus package.
  if command -v promtool >/dev/null 2>&1; then return 0; fi
  apt_install prometheus
}

ensure_python() {
  # The Python package (python/): an interpreter, venv to install it into,
  # and the headers PyO3 builds against.
  if python3 -c 'import ensurepip, venv' >/dev/null 2>&1 \
    && python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' >/dev/null 2>&1; then
    return 0
  fi
  apt_install python3 python3-venv python3-dev
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  for s in "${@:-redis postgres}"; do
    for one in $s; do "ensure_$one"; done
  done
fi
