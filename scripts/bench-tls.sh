#!/usr/bin/env bash
# bench-tls.sh -- what TLS costs: the same workloads on the same machine in one run, with the
# nodes in plaintext (--insecure) and with mTLS, alternating (plain, tls, plain, tls...) so a
# noisy minute hits both.
#
#   scripts/bench-tls.sh [OUT_DIR]
#
# 1. Raft puts: a 3-node cluster (scripts/troupe3.sh, TROUPE3_TLS=0 or 1), `troupe bench raft
#    --phases put` at 1 and 64 clients (writes through every node; followers forward them to
#    the leader over the peer port).
# 2. Embed: one node serving all-MiniLM-L6-v2, `troupe bench serve` at 16 clients, no raw
#    engine run.
# JSON reports go to OUT_DIR (default target/bench-tls); the medians per mode are printed.
# Env: SECONDS_PER_POINT (10), PAIRS (2), PORT_BASE (27500).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/target/bench-tls}
SECS=${SECONDS_PER_POINT:-10}
PAIRS=${PAIRS:-2}
PORT_BASE=${PORT_BASE:-27500}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
cargo build --release -p troupe >&2
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
export TROUPE_BIN=$TARGET/release/troupe
MODEL_DIR=$("$TROUPE_BIN" models fetch all-MiniLM-L6-v2 --quiet | tail -n 1)
DATA=$(mktemp -d)
NODE_PID=
cleanup() {
  bash scripts/troupe3.sh stop >/dev/null 2>&1 || true
  [[ -n $NODE_PID ]] && kill -TERM "$NODE_PID" 2>/dev/null && wait "$NODE_PID" 2>/dev/null || true
  rm -rf "$DATA"
}
trap cleanup EXIT

raft() { # MODE(0|1) RUN
  TROUPE3_TLS=$1 bash scripts/troupe3.sh start >&2
  eval "$(bash scripts/troupe3.sh env)"
  "$TROUPE_BIN" bench raft --addr "$(bash scripts/troupe3.sh endpoints)" \
    --clients 1,64 --seconds "$SECS" --phases put --json-out "$OUT/raft-tls$1-$2.json" >&2
  bash scripts/troupe3.sh stop >&2
}

serve() { # MODE(0|1) RUN
  local api=127.0.0.1:$PORT_BASE dir=$DATA/serve-$1-$2 security
  mkdir -p "$dir"
  if [[ $1 == 1 ]]; then
    "$TROUPE_BIN" certs init --out "$dir/certs" --nodes 1 >/dev/null
    security=(--tls-dir "$dir/certs")
    export TROUPE_CA=$dir/certs/ca.crt TROUPE_CERT=$dir/certs/client-admin.crt TROUPE_KEY=$dir/certs/client-admin.key
  else
    security=(--insecure)
    unset TROUPE_CA TROUPE_CERT TROUPE_KEY
  fi
  "$TROUPE_BIN" node --id 1 --api "$api" --peer "127.0.0.1:$((PORT_BASE + 1))" \
    --metrics "127.0.0.1:$((PORT_BASE + 2))" --data-dir "$dir/node1" "${security[@]}" >"$OUT/serve-node-$1-$2.log" 2>&1 &
  NODE_PID=$!
  until "$TROUPE_BIN" cluster init --addr "$api" --members "1=127.0.0.1:$((PORT_BASE + 1))@$api" >/dev/null 2>&1; do
    kill -0 "$NODE_PID" 2>/dev/null || { echo "bench-tls: the node died, see $OUT/serve-node-$1-$2.log" >&2; exit 1; }
    sleep 0.2
  done
  "$TROUPE_BIN" models register all-MiniLM-L6-v2 --version 1 --dir "$MODEL_DIR" --addr "$api" >/dev/null
  "$TROUPE_BIN" models activate all-MiniLM-L6-v2 1 --addr "$api" --wait >/dev/null
  "$TROUPE_BIN" bench serve --addr "$api" --model all-MiniLM-L6-v2 --model-dir "$MODEL_DIR" \
    --concurrency 16 --seconds "$SECS" --rounds 1 --no-engine --json-out "$OUT/serve-tls$1-$2.json" >&2
  kill -TERM "$NODE_PID"; wait "$NODE_PID" 2>/dev/null || true; NODE_PID=
}

for run in $(seq "$PAIRS"); do
  for mode in 0 1; do echo "== raft puts, tls=$mode, pair $run ==" >&2; raft "$mode" "$run"; done
  for mode in 0 1; do echo "== embed, tls=$mode, pair $run ==" >&2; serve "$mode" "$run"; done
done

python3 - "$OUT" <<'EOF'
import glob, json, os, statistics, sys
out = sys.argv[1]

def numbers(doc, path=()):
    """Every (path, number) in a JSON document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from numbers(v, path + (str(k),))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from numbers(v, path + (str(i),))
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool):
        yield path, doc

for kind in ("raft", "serve"):
    series = {}
    for mode in ("0", "1"):
        for f in sorted(glob.glob(os.path.join(out, f"{kind}-tls{mode}-*.json"))):
            for path, value in numbers(json.load(open(f))):
                series.setdefault(path, {}).setdefault(mode, []).append(value)
    print(f"\n{kind}: median plaintext | median TLS | TLS / plaintext")
    for path, modes in sorted(series.items()):
        name = "/".join(path)
        if not any(w in name for w in ("ops_per_s", "per_second", "throughput", "p50", "p99", "rps")):
            continue
        if "0" in modes and "1" in modes:
            a, b = statistics.median(modes["0"]), statistics.median(modes["1"])
            print(f"  {name}: {a:.2f} | {b:.2f} | {b / a if a else float('nan'):.3f}")
EOF
