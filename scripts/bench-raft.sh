#!/usr/bin/env bash
# bench-raft.sh -- troupe's metadata store against etcd, side by side in one run, through the
# same Rust load generator (`troupe bench raft`): 256-byte puts at 1/16/64 clients, contended
# CAS (16 clients, 8 keys), 5 leader kill -9s, as in shared/peers/etcd_bench.py, and 5 leader
# pauses (SIGSTOP for PAUSE_SECS, default 5, with a probe put every 20 ms through the others).
#
#   scripts/bench-raft.sh [OUT_DIR]
#
# Two runs, each with a fresh 3-node troupe (scripts/troupe3.sh) and a fresh 3-member etcd
# (shared/peers/etcd3.sh) on 127.0.0.1:
#   1. defaults: each store at its own default timings (etcd: heartbeat 100 ms, election
#      1000 ms; troupe: heartbeat 100 ms, election 150-300 ms): put, cas, failover;
#   2. same election timeout, 300 ms: etcd --heartbeat-interval=60 --election-timeout=300
#      (etcd wants the timeout >= 5 heartbeats; it draws each timeout from [300, 600) ms) and
#      troupe with heartbeat 60 ms and election_timeout_max_ms 300 (a follower of a live leader
#      waits the 300 ms lease plus its own timeout, drawn from [150, 300) ms): failover and
#      pause.
# The tables (Markdown) are printed; the JSON reports go to OUT_DIR (default target/bench-raft).
# Env: SECONDS_PER_POINT (default 10), PAUSE_SECS (default 5), PHASES (default
#      put,cas,failover,pause for the first run), PEERS (default ../shared/peers from the repo
#      root), RUNS (default defaults,same-election-timeout: which of the two runs), CLIENTS
#      (default 1,16,64), FAILOVER_ROUNDS (default 5), TROUPE_BIN (a troupe binary to use
#      instead of building one).
# When etcd cannot be installed, OUT_DIR/skipped.txt says so and the script exits 3.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-$ROOT/../shared/peers}
OUT=${1:-$ROOT/target/bench-raft}
SECS=${SECONDS_PER_POINT:-10}
PAUSE_SECS=${PAUSE_SECS:-5}
PHASES=${PHASES:-put,cas,failover,pause}
RUNS=${RUNS:-defaults,same-election-timeout}
CLIENTS=${CLIENTS:-1,16,64}
FAILOVER_ROUNDS=${FAILOVER_ROUNDS:-5}
# etcd3.sh has no pause verb: signal the PID it recorded for member N.
etcd_signal() { echo "kill -$1 \$(cat \$(cat \${ETCD3_POINTER:-/tmp/etcd3-peer.current})/m{n}.pid)"; }
mkdir -p "$OUT"

if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  echo "bench-raft: installing etcd (Debian packages etcd-server, etcd-client)" >&2
  apt-get install -y etcd-server etcd-client >/dev/null ||
    { echo "etcd: apt-get install etcd-server etcd-client failed" | tee "$OUT/skipped.txt" >&2; exit 3; }
fi
[[ -f $PEERS/etcd3.sh ]] || { echo "bench-raft: $PEERS/etcd3.sh not found (set PEERS)" >&2; exit 1; }

cd "$ROOT"
if [[ -z ${TROUPE_BIN:-} ]]; then
  cargo build --release -p troupe >&2
  TROUPE_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/troupe
fi
export TROUPE_BIN

cleanup() {
  bash scripts/troupe3.sh stop >/dev/null 2>&1 || true
  bash "$PEERS/etcd3.sh" stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

run() { # NAME PHASES ETCD_EXTRA TROUPE_RAFT
  local name=$1 phases=$2
  cleanup
  ETCD3_EXTRA=$3 bash "$PEERS/etcd3.sh" start >&2
  TROUPE3_RAFT=$4 bash scripts/troupe3.sh start >&2
  # The nodes serve mTLS: the bench's troupe client needs the cluster's CA and a certificate.
  eval "$(bash scripts/troupe3.sh env)"
  echo "== $name ==" >&2
  "$TROUPE_BIN" bench raft \
    --addr "$(bash scripts/troupe3.sh endpoints)" \
    --etcd "$(bash "$PEERS/etcd3.sh" endpoints)" \
    --clients "$CLIENTS" --seconds "$SECS" --phases "$phases" --failover-rounds "$FAILOVER_ROUNDS" \
    --kill-cmd "bash $ROOT/scripts/troupe3.sh kill9 {n}" \
    --restart-cmd "bash $ROOT/scripts/troupe3.sh restart {n}" \
    --etcd-kill-cmd "bash $PEERS/etcd3.sh kill9 {n}" \
    --etcd-restart-cmd "bash $PEERS/etcd3.sh restart {n}" \
    --pause-cmd "bash $ROOT/scripts/troupe3.sh pause {n}" \
    --resume-cmd "bash $ROOT/scripts/troupe3.sh resume {n}" \
    --etcd-pause-cmd "$(etcd_signal STOP)" \
    --etcd-resume-cmd "$(etcd_signal CONT)" \
    --pause-secs "$PAUSE_SECS" \
    --json-out "$OUT/$name.json"
}

if [[ ,$RUNS, == *,defaults,* ]]; then
  run defaults "$PHASES" "" ""
fi
if [[ ,$RUNS, == *,same-election-timeout,* ]]; then
  run same-election-timeout failover,pause "--heartbeat-interval=60 --election-timeout=300" \
    "heartbeat_interval_ms = 60
election_timeout_min_ms = 150
election_timeout_max_ms = 300"
fi
