#!/usr/bin/env bash
# bench-raft.sh -- troupe's metadata store against etcd, side by side in one run, through the
# same Rust load generator (`troupe bench raft`): 256-byte puts at 1/16/64 clients, contended
# CAS (16 clients, 8 keys), and 5 leader kill -9s, as in shared/peers/etcd_bench.py.
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
#      waits the 300 ms lease plus its own timeout, drawn from [150, 300) ms): failover only.
# The tables (Markdown) are printed; the JSON reports go to OUT_DIR (default target/bench-raft).
# Env: SECONDS_PER_POINT (default 10), PEERS (default ../shared/peers from the repo root).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-$ROOT/../shared/peers}
OUT=${1:-$ROOT/target/bench-raft}
SECS=${SECONDS_PER_POINT:-10}
mkdir -p "$OUT"

if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  echo "bench-raft: installing etcd (Debian packages etcd-server, etcd-client)" >&2
  apt-get install -y etcd-server etcd-client >/dev/null
fi
[[ -f $PEERS/etcd3.sh ]] || { echo "bench-raft: $PEERS/etcd3.sh not found (set PEERS)" >&2; exit 1; }

cd "$ROOT"
cargo build --release -p troupe >&2
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
export TROUPE_BIN=$TARGET/release/troupe

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
  echo "== $name ==" >&2
  "$TROUPE_BIN" bench raft \
    --addr "$(bash scripts/troupe3.sh endpoints)" \
    --etcd "$(bash "$PEERS/etcd3.sh" endpoints)" \
    --clients 1,16,64 --seconds "$SECS" --phases "$phases" \
    --kill-cmd "bash $ROOT/scripts/troupe3.sh kill9 {n}" \
    --restart-cmd "bash $ROOT/scripts/troupe3.sh restart {n}" \
    --etcd-kill-cmd "bash $PEERS/etcd3.sh kill9 {n}" \
    --etcd-restart-cmd "bash $PEERS/etcd3.sh restart {n}" \
    --json-out "$OUT/$name.json"
}

run defaults put,cas,failover "" ""
run same-election-timeout failover "--heartbeat-interval=60 --election-timeout=300" \
  "heartbeat_interval_ms = 60
election_timeout_min_ms = 150
election_timeout_max_ms = 300"
