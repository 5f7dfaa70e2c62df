#!/usr/bin/env bash
# troupe3.sh -- a 3-node troupe cluster on 127.0.0.1 as separate processes, with the same
# verbs as shared/peers/etcd3.sh, so that `troupe bench raft` can kill -9 and restart members.
#
#   scripts/troupe3.sh start       # start 3 nodes, form the cluster, wait for a leader
#   scripts/troupe3.sh endpoints   # 127.0.0.1:27001,127.0.0.1:27002,127.0.0.1:27003
#   scripts/troupe3.sh status      # troupe cluster status
#   scripts/troupe3.sh kill9 N     # SIGKILL node N (by its PID file)
#   scripts/troupe3.sh restart N   # start node N again on its existing data dir
#   scripts/troupe3.sh pause N     # SIGSTOP node N (it keeps its sockets, answers nothing)
#   scripts/troupe3.sh resume N    # SIGCONT node N
#   scripts/troupe3.sh env         # the export line a client of this cluster needs
#   scripts/troupe3.sh stop        # SIGTERM (then SIGKILL) exactly the PIDs we started;
#                                  # removes the run dir unless KEEP=1
#
# Env: TROUPE_BIN (default: troupe on PATH, else target/release/troupe),
#      TROUPE3_BASE (default 270): API port of node i = ${BASE}0i, peer ${BASE+1}0i,
#      metrics ${BASE+2}0i, i.e. 27001-3, 27101-3, 27201-3.
#      TROUPE3_RAFT: extra lines for the [raft] section of every node's config, e.g.
#      "election_timeout_min_ms = 1000
#       election_timeout_max_ms = 2000".
#      TROUPE3_POINTER (default /tmp/troupe3.current): file naming the run dir.
#      TROUPE3_TLS (default 1): 1 runs the nodes with mTLS (certificates from
#      `troupe certs init` in <run dir>/certs; `troupe3.sh env` prints the TROUPE_CA,
#      TROUPE_CERT and TROUPE_KEY a client needs), 0 runs them --insecure (plaintext).
# Nothing is killed by name: only PIDs from <run dir>/nN.pid whose command line still names
# that node's config file.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
BASE=${TROUPE3_BASE:-270}
POINTER=${TROUPE3_POINTER:-/tmp/troupe3.current}
if [[ -n ${TROUPE_BIN:-} ]]; then BIN=$TROUPE_BIN
elif command -v troupe >/dev/null; then BIN=$(command -v troupe)
else BIN="${CARGO_TARGET_DIR:-$HERE/../target}/release/troupe"; fi
HOST=127.0.0.1

api() { echo "$HOST:${BASE}0$1"; }
peer() { echo "$HOST:$((BASE + 1))0$1"; }
metrics() { echo "$HOST:$((BASE + 2))0$1"; }
endpoints() { echo "$(api 1),$(api 2),$(api 3)"; }
rundir() {
  [[ -f $POINTER ]] || { echo "troupe3: no running cluster ($POINTER missing)" >&2; return 1; }
  cat "$POINTER"
}

# pid_alive DIR N -> prints the PID if nN.pid names a live troupe started with DIR/nN.toml
pid_alive() {
  local dir=$1 n=$2 pid
  [[ -f $dir/n$n.pid ]] || return 1
  pid=$(cat "$dir/n$n.pid")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "--config $dir/n$n.toml" || return 1
  echo "$pid"
}

TLS=${TROUPE3_TLS:-1}
# The client side of this script's own calls: TLS with the admin certificate when the run uses it.
client_env() {
  local dir=$1
  if [[ -d $dir/certs ]]; then
    export TROUPE_CA=$dir/certs/ca.crt TROUPE_CERT=$dir/certs/client-admin.crt TROUPE_KEY=$dir/certs/client-admin.key
  else
    unset TROUPE_CA TROUPE_CERT TROUPE_KEY
  fi
}

write_config() {
  local dir=$1 n=$2 security
  if [[ -d $dir/certs ]]; then security="[tls]
dir = \"$dir/certs\""
  else security="insecure = true"; fi
  cat >"$dir/n$n.toml" <<EOF
id = $n
api = "$(api "$n")"
peer = "$(peer "$n")"
metrics = "$(metrics "$n")"
data_dir = "$dir/n$n.data"
$security

[raft]
${TROUPE3_RAFT:-}
EOF
}

start_node() {
  local dir=$1 n=$2 pid i
  if pid=$(pid_alive "$dir" "$n"); then echo "n$n already running (pid $pid)"; return 0; fi
  setsid "$BIN" node --config "$dir/n$n.toml" </dev/null >>"$dir/n$n.log" 2>&1 &
  pid=$!
  echo "$pid" >"$dir/n$n.pid"
  for i in $(seq 100); do
    [[ -d /proc/$pid ]] || break
    if "$BIN" cluster status --addr "$(api "$n")" --json >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "troupe3: n$n (pid $pid) did not come up; tail of $dir/n$n.log:" >&2
  tail -n 20 "$dir/n$n.log" >&2 || true
  return 1
}

wait_leader() {
  local deadline=$((SECONDS + ${1:-30})) out
  while ((SECONDS < deadline)); do
    out=$("$BIN" cluster status --addr "$(api 1)" --json 2>/dev/null || true)
    if [[ $out == *'"leader": '[0-9]* ]]; then
      echo "troupe3: 3 nodes with a leader at $(endpoints)"
      return 0
    fi
    sleep 0.2
  done
  echo "troupe3: no leader after ${1:-30}s" >&2
  return 1
}

cmd_start() {
  [[ -x $BIN ]] || { echo "troupe3: $BIN is not an executable troupe (build it, or set TROUPE_BIN)" >&2; return 1; }
  if [[ -f $POINTER ]]; then
    local old n; old=$(cat "$POINTER")
    for n in 1 2 3; do
      if pid_alive "$old" "$n" >/dev/null; then
        echo "troupe3: a cluster is already running in $old (use stop first)" >&2; return 1
      fi
    done
  fi
  local dir n; dir=$(mktemp -d /tmp/troupe3.XXXXXX)
  echo "$dir" >"$POINTER"
  if [[ $TLS == 1 ]]; then "$BIN" certs init --out "$dir/certs" --nodes 3 >/dev/null; fi
  client_env "$dir"
  for n in 1 2 3; do write_config "$dir" "$n"; start_node "$dir" "$n"; done
  "$BIN" cluster init --addr "$(api 1)" --members "1=$(peer 1)@$(api 1),2=$(peer 2)@$(api 2),3=$(peer 3)@$(api 3)" >/dev/null
  echo "troupe3: run dir $dir (logs n1.log..n3.log)"
  wait_leader 30
}

cmd_stop() {
  local dir; dir=$(rundir) || return 0
  local n pid pids=()
  for n in 1 2 3; do
    if pid=$(pid_alive "$dir" "$n"); then kill -TERM "$pid" && pids+=("$pid"); fi
  done
  local deadline=$((SECONDS + 10))
  for pid in "${pids[@]}"; do
    while [[ -d /proc/$pid ]] && ((SECONDS < deadline)); do sleep 0.1; done
  done
  for n in 1 2 3; do
    if pid=$(pid_alive "$dir" "$n"); then kill -KILL "$pid" || true; fi
  done
  rm -f "$POINTER"
  if [[ ${KEEP:-0} == 1 ]]; then echo "troupe3: stopped; kept $dir"
  else rm -rf -- "$dir"; echo "troupe3: stopped; removed $dir"; fi
}

cmd_kill9() {
  local n=${1:?node number 1..3} dir pid; dir=$(rundir)
  pid=$(pid_alive "$dir" "$n") || { echo "troupe3: n$n not running" >&2; return 1; }
  kill -KILL "$pid"
  echo "troupe3: SIGKILL n$n pid $pid"
}

cmd_signal() { # SIGNAL N
  local sig=$1 n=${2:?node number 1..3} dir pid; dir=$(rundir)
  pid=$(pid_alive "$dir" "$n") || { echo "troupe3: n$n not running" >&2; return 1; }
  kill "-$sig" "$pid"
  echo "troupe3: SIG$sig n$n pid $pid"
}

cmd_env() {
  local dir; dir=$(rundir)
  if [[ -d $dir/certs ]]; then
    echo "export TROUPE_CA=$dir/certs/ca.crt TROUPE_CERT=$dir/certs/client-admin.crt TROUPE_KEY=$dir/certs/client-admin.key"
  else
    echo "unset TROUPE_CA TROUPE_CERT TROUPE_KEY"
  fi
}

cmd_restart() {
  local n=${1:?node number 1..3} dir; dir=$(rundir); client_env "$dir"
  start_node "$dir" "$n"
  echo "troupe3: restarted n$n pid $(cat "$dir/n$n.pid")"
}

case ${1:-} in
  start)     cmd_start ;;
  stop)      cmd_stop ;;
  endpoints) endpoints ;;
  status)    client_env "$(rundir)"; "$BIN" cluster status --addr "$(api 1)" ;;
  env)       cmd_env ;;
  kill9)     cmd_kill9 "${2:-}" ;;
  restart)   cmd_restart "${2:-}" ;;
  pause)     cmd_signal STOP "${2:-}" ;;
  resume)    cmd_signal CONT "${2:-}" ;;
  dir)       rundir ;;
  *) sed -n '2,27p' "$0"; exit 2 ;;
esac
