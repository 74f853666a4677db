# shellcheck shell=bash
# The broker at AMQP_URL, for scripts/test and scripts/bench: source this file
# (from the repository's root, with AMQP_URL exported and a `log` function
# defined), then call `ensure_broker`.
#
# Sets amqp_host and amqp_port (of the first URL in AMQP_URL) and defines:
#   listening      the port accepts a TCP connection within 2 s
#   is_local       the host is this machine (so rabbitmqctl reaches it)
#   ensure_broker  makes the broker reachable: installs and starts a local
#                  RabbitMQ when needed, and restores a node left stopped or
#                  alarmed by a broker-fault test; returns 1 when it cannot

# host and port of the first URL in AMQP_URL (a comma-separated list is allowed)
first_url="${AMQP_URL%%,*}"
hostport="${first_url#*://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"; hostport="${hostport%%\?*}"
amqp_host="${hostport%:*}"; amqp_port="${hostport##*:}"
[ "$amqp_host" = "$hostport" ] && amqp_port=5672
amqp_host="${amqp_host#[}"; amqp_host="${amqp_host%]}"

listening() { timeout 2 bash -c "exec 3<>/dev/tcp/$amqp_host/$amqp_port" 2>/dev/null; }
is_local() { case "$amqp_host" in 127.*|localhost|::1) return 0;; *) return 1;; esac; }

ensure_broker() {
  if ! is_local; then
    listening && return 0
    log "broker at $amqp_host:$amqp_port is not reachable and is not local"; return 1
  fi
  if ! command -v rabbitmqctl >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      log "installing rabbitmq-server from Debian's packages"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
    else
      log "rabbitmq-server is not installed and we cannot install it"; return 1
    fi
  fi
  if ! rabbitmqctl -q status >/dev/null 2>&1; then
    log "starting rabbitmq-server"
    without_lock_fds rabbitmq-server -detached || true
    timeout 120 rabbitmqctl -q await_startup || { log "rabbitmq did not start"; return 1; }
  fi
  # A broker-fault test that died may have left the app stopped, listeners
  # suspended or a memory alarm set: undo all three (each is a no-op otherwise).
  if ! rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1; then
    log "restoring a stopped rabbit app"; rabbitmqctl -q start_app
    timeout 120 rabbitmqctl -q await_startup
  fi
  rabbitmqctl -q eval 'rabbit_alarm:clear_alarm({resource_limit, memory, node()}).' >/dev/null 2>&1 || true
  rabbitmqctl -q resume_listeners >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do listening && return 0; sleep 0.5; done
  log "rabbitmq is up but $amqp_host:$amqp_port does not accept connections"; return 1
}

# Runs "$@" (a command or function) holding the conformance suite's broker lock
# exclusively: the same flock(2) file as amqp_rebound_tests::broker::BrokerLock,
# so that an exclusive case of a suite running beside it does not have its memory
# alarm cleared or its listeners resumed under it. Without flock(1), runs "$@".
with_broker_lock() {
  local lock_file fd rc=0
  command -v flock >/dev/null 2>&1 || { "$@"; return; }
  lock_file="${TMPDIR:-/tmp}/amqp-rebound-tests.${amqp_host//[:\/]/_}-${amqp_port}.lock"
  exec {fd}>>"$lock_file"
  if ! flock --exclusive --timeout 1800 "$fd"; then
    exec {fd}>&-
    log "could not take the broker lock $lock_file"; return 1
  fi
  "$@" || rc=$?
  exec {fd}>&-
  return "$rc"
}

# Runs "$@" with every descriptor above 2 closed: a daemon started under a lock
# (rabbitmq-server -detached) would inherit the lock's descriptor and hold the
# lock for as long as it runs, and every later taker would wait forever.
without_lock_fds() {
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec $fd>&-"; fi
    done
    exec "$@"
  )
}

# Takes the lock that keeps the cluster sections of two runs (scripts/test's
# cluster tests, scripts/bench's cluster figures: up, use, down) apart, so one
# run cannot restart a node another one stopped on purpose, or take the cluster
# down under it. Held until release_cluster_lock or the shell's exit. (The tests
# themselves also take amqp-rebound-cluster.lock, one test at a time.)
take_cluster_lock() {
  command -v flock >/dev/null 2>&1 || return 0
  exec {cluster_lock_fd}>>"${TMPDIR:-/tmp}/amqp-rebound-cluster-run.lock"
  flock --exclusive --timeout 3600 "$cluster_lock_fd" || {
    log "could not take the cluster run lock"; return 1; }
}
release_cluster_lock() {
  if [ -n "${cluster_lock_fd:-}" ]; then exec {cluster_lock_fd}>&-; cluster_lock_fd=; fi
}
