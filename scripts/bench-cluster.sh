#!/usr/bin/env bash
# bench-cluster.sh -- what a 3-node troupe cluster buys over one node, on this machine.
#
#   scripts/bench-cluster.sh [OUT_DIR]
#
# 1. Rollout: all-MiniLM-L6-v2 (about 90 MB) pushed to node 1 of a fresh 3-node cluster
#    (separate processes on 127.0.0.1), then `models activate --wait`: the seconds until it is
#    active on all three (two pulls from a peer, verification, load and warm-up; uncapped).
#    Repeated ROLLOUTS times on fresh clusters; median and range.
# 2. Scale-up: `troupe bench serve` against node 1's address (16-token sentences, one per
#    request, closed loop) with that node alone, then with 3 nodes serving behind it (the
#    default least-outstanding router forwards to the peers), in the same run.
# Output: a Markdown table on stdout; the JSON reports in OUT_DIR (default target/bench-cluster):
# rollout.json (seconds per rollout), one-node.json and three-nodes.json (`troupe bench serve`).
# Env: SECONDS_PER_POINT (10), CONCURRENCY (1,16,64), ROUNDS (3), ROLLOUTS (3),
#      PORT_BASE (27600), PARTS (rollout,scaleout: which of the two to run),
#      TROUPE_BIN (a troupe binary to use instead of building one).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/target/bench-cluster}
SECS=${SECONDS_PER_POINT:-10}
CONC=${CONCURRENCY:-1,16,64}
ROUNDS=${ROUNDS:-3}
ROLLOUTS=${ROLLOUTS:-3}
PORT_BASE=${PORT_BASE:-27600}
PARTS=${PARTS:-rollout,scaleout}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

cd "$ROOT"
if [[ -z ${TROUPE_BIN:-} ]]; then
  cargo build --release -p troupe >&2
  TROUPE_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/troupe
fi
TROUPE=$TROUPE_BIN
MODEL_DIR=$("$TROUPE" models fetch all-MiniLM-L6-v2 --quiet | tail -n 1)
MODEL=all-MiniLM-L6-v2

DATA=$(mktemp -d)
PIDS=()
stop_nodes() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}
cleanup() { stop_nodes; rm -rf "$DATA"; }
trap cleanup EXIT
# mTLS between the nodes, and the clients with the admin certificate.
"$TROUPE" certs init --out "$DATA/certs" --nodes 9 >/dev/null
export TROUPE_CA=$DATA/certs/ca.crt TROUPE_CERT=$DATA/certs/client-admin.crt TROUPE_KEY=$DATA/certs/client-admin.key

api() { echo "127.0.0.1:$((PORT_BASE + 10 * ($1 - 1)))"; }
peer() { echo "127.0.0.1:$((PORT_BASE + 10 * ($1 - 1) + 1))"; }

# start_cluster N RUN: N nodes with data under $DATA/RUN, formed into one cluster.
start_cluster() {
  local n=$1 run=$2 members=() i
  for ((i = 1; i <= n; i++)); do
    "$TROUPE" node --id "$i" --api "$(api "$i")" --peer "$(peer "$i")" \
      --metrics "127.0.0.1:$((PORT_BASE + 10 * (i - 1) + 2))" --data-dir "$DATA/$run/node$i" \
      --tls-dir "$DATA/certs" >"$OUT/$run-node$i.log" 2>&1 &
    PIDS+=($!)
    members+=("$i=$(peer "$i")@$(api "$i")")
  done
  local joined
  joined=$(IFS=,; echo "${members[*]}")
  until "$TROUPE" cluster init --addr "$(api 1)" --members "$joined" >/dev/null 2>&1; do sleep 0.2; done
  until "$TROUPE" cluster status --addr "$(api 1)" --json 2>/dev/null | python3 -c \
    'import json,sys; sys.exit(0 if json.load(sys.stdin)["leader"] else 1)'; do sleep 0.2; done
}

# rollout RUN: push to node 1, activate, print the seconds until active everywhere.
rollout() {
  "$TROUPE" models push "$MODEL_DIR" --name "$MODEL" --version 1 --addr "$(api 1)" --quiet >/dev/null
  local started ended
  started=$(date +%s.%N)
  "$TROUPE" models activate "$MODEL" 1 --addr "$(api 1)" --wait >/dev/null
  ended=$(date +%s.%N)
  python3 -c "print(f'{$ended - $started:.2f}')"
}

TIMES=()
if [[ ,$PARTS, == *,rollout,* ]]; then
  echo "== rollout of a $(du -sm "$MODEL_DIR" | cut -f1) MB version on 3 nodes, $ROLLOUTS times ==" >&2
  for ((r = 1; r <= ROLLOUTS; r++)); do
    start_cluster 3 "rollout$r"
    TIMES+=("$(rollout)")
    echo "rollout $r: ${TIMES[-1]} s" >&2
    stop_nodes
  done
  python3 - "$(du -sm "$MODEL_DIR" | cut -f1)" "${TIMES[@]}" >"$OUT/rollout.json" <<'EOF'
import json, sys
json.dump({"model_mb": float(sys.argv[1]), "nodes": 3, "seconds": [float(t) for t in sys.argv[2:]]}, sys.stdout)
EOF
  echo "Rollout, 3 nodes, uncapped: ${TIMES[*]} s"
fi
[[ ,$PARTS, == *,scaleout,* ]] || exit 0

bench() {
  "$TROUPE" bench serve --addr "$(api 1)" --model "$MODEL" --model-dir "$MODEL_DIR" \
    --concurrency "$CONC" --seconds "$SECS" --rounds "$ROUNDS" --no-engine --json-out "$1" >/dev/null
}

echo "== bench serve, 1 node ==" >&2
start_cluster 1 one
rollout >/dev/null
bench "$OUT/one-node.json"
stop_nodes

echo "== bench serve, 3 nodes, load on node 1 ==" >&2
start_cluster 3 three
rollout >/dev/null
bench "$OUT/three-nodes.json"
stop_nodes

python3 - "$OUT/one-node.json" "$OUT/three-nodes.json" <<'EOF'
import json, sys
one, three = (json.load(open(p)) for p in sys.argv[1:3])
print()
print("| clients | 1 node req/s | p50 / p99 ms | 3 nodes req/s | p50 / p99 ms | scale-up |")
print("|---:|---:|---:|---:|---:|---:|")
for a, b in zip(one["points"], three["points"]):
    print(f"| {a['concurrency']} | {a['throughput']:.1f} | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} "
          f"| {b['throughput']:.1f} | {b['p50_ms']:.1f} / {b['p99_ms']:.1f} "
          f"| {b['throughput'] / a['throughput']:.2f}x |")
EOF
