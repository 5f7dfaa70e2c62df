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
# JSON reports go to OUT_DIR (default target/bench-raft); the tables are printed.
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
    --json >"$OUT/$name.json"
  python3 - "$OUT/$name.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
stores = {s["store"]: s for s in report["stores"]}
t, e = stores.get("troupe"), stores.get("etcd")
rows = []
for p in (t or {}).get("put", []):
    q = next((x for x in (e or {}).get("put", []) if x["clients"] == p["clients"]), None)
    c = p["clients"]
    rows.append((f"put {c} clients: ops/s", p["ops_per_s"], q and q["ops_per_s"]))
    rows.append((f"put {c} clients: p50 ms", p["latency"]["p50_ms"], q and q["latency"]["p50_ms"]))
    rows.append((f"put {c} clients: p99 ms", p["latency"]["p99_ms"], q and q["latency"]["p99_ms"]))
if t and t.get("cas"):
    rows.append(("cas: successes/s", t["cas"]["cas_ok_per_s"], e and e["cas"] and e["cas"]["cas_ok_per_s"]))
    rows.append(("cas: conflict rate", t["cas"]["conflict_rate"], e and e["cas"] and e["cas"]["conflict_rate"]))
if t and t.get("failover"):
    rows.append(("failover: median s", t["failover"]["median_s"], e and e["failover"] and e["failover"]["median_s"]))
    rows.append(("failover: max s", t["failover"]["max_s"], e and e["failover"] and e["failover"]["max_s"]))
print(f"| test | troupe | etcd | troupe / etcd |\n|---|---:|---:|---:|")
for name, a, b in rows:
    ratio = f"{a / b:.2f}x" if a is not None and b else "-"
    fa = "-" if a is None else f"{a:.3f}" if a < 100 else f"{a:.0f}"
    fb = "-" if b is None else f"{b:.3f}" if b < 100 else f"{b:.0f}"
    print(f"| {name} | {fa} | {fb} | {ratio} |")
for s in report["stores"]:
    if s.get("cas") and not s["cas"]["lost_update_check_ok"]:
        print(f"{s['store']}: LOST UPDATE in the CAS phase")
    if s.get("failover"):
        print(f"{s['store']} failover rounds (s): {[r['unavailable_s'] for r in s['failover']['rounds']]}")
EOF
}

run defaults put,cas,failover "" ""
run same-election-timeout failover "--heartbeat-interval=60 --election-timeout=300" \
  "heartbeat_interval_ms = 60
election_timeout_min_ms = 150
election_timeout_max_ms = 300"
