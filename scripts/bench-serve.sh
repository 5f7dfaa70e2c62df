#!/usr/bin/env bash
# bench-serve.sh -- a serving troupe node against Ray Serve, side by side in one run, on the
# same machine and the same sentences (16 tokens, one per request, closed loop).
#
#   scripts/bench-serve.sh [OUT_DIR]
#
# 1. troupe: one node (release build) on 127.0.0.1 serving all-MiniLM-L6-v2 (fetched into the
#    cache if missing), then `troupe bench serve` at 1/4/16/64 clients with the raw engine in
#    the same round, ROUNDS times (medians; each ratio is taken within its round).
# 2. Ray Serve 2.x with @serve.batch (max 32, 5 ms) and the same model as an ONNX Runtime fp32
#    graph (shared/peers/ray): the peer's own run_all.sh at 1/16/64 clients plus its raw
#    ONNX Runtime loop. Its venv and graph are made on first use from the Python package index.
# Output: the troupe table on stdout; in OUT_DIR (default target/bench-serve) troupe.json, the
# node's /metrics after the load (metrics.txt) and its batch-size histogram (batch-size.json),
# Ray's results.jsonl and summary.md under ray/, or skipped.txt saying why Ray did not run.
# Env: SECONDS_PER_POINT (10), ROUNDS (3), RAY (1; 0 skips the peer), PEERS (../shared/peers),
#      RAY_DIR (~/.cache/troupe-peers/ray), PORT_BASE (27400),
#      CONCURRENCY (1,4,16,64), ENGINE (1; 0 skips the raw engine runs),
#      TLS (1: the node serves TLS with certificates from `troupe certs init` and the clients
#      verify it; 0: the node runs --insecure, plaintext),
#      TOKEN (0; 1 with TLS=1: clients send a bearer token instead of relying on the admin
#      certificate's role), TROUPE_BIN (a troupe binary to use instead of building one).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-$ROOT/../shared/peers}
OUT=${1:-$ROOT/target/bench-serve}
SECS=${SECONDS_PER_POINT:-10}
ROUNDS=${ROUNDS:-3}
RAY=${RAY:-1}
RAY_DIR=${RAY_DIR:-$HOME/.cache/troupe-peers/ray}
PORT_BASE=${PORT_BASE:-27400}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

cd "$ROOT"
if [[ -z ${TROUPE_BIN:-} ]]; then
  cargo build --release -p troupe >&2
  TROUPE_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/troupe
fi
TROUPE=$TROUPE_BIN
MODEL_DIR=$("$TROUPE" models fetch all-MiniLM-L6-v2 --quiet | tail -n 1)

API=127.0.0.1:$PORT_BASE
DATA=$(mktemp -d)
NODE_PID=
cleanup() {
  [[ -n $NODE_PID ]] && kill -TERM "$NODE_PID" 2>/dev/null && wait "$NODE_PID" 2>/dev/null || true
  rm -rf "$DATA"
}
trap cleanup EXIT

if [[ ${TLS:-1} == 1 ]]; then
  "$TROUPE" certs init --out "$DATA/certs" --nodes 1 >/dev/null
  security=(--tls-dir "$DATA/certs")
  export TROUPE_CA=$DATA/certs/ca.crt TROUPE_CERT=$DATA/certs/client-admin.crt TROUPE_KEY=$DATA/certs/client-admin.key
  # TOKEN=1: every call also carries a bearer token, which wins over the certificate, so the
  # node verifies a token on each call instead of reading the role from the certificate.
  if [[ ${TOKEN:-0} == 1 ]]; then
    TROUPE_TOKEN=$("$TROUPE" token issue --keys "$DATA/certs" --role admin --ttl 2h)
    export TROUPE_TOKEN
  fi
else
  security=(--insecure)
  unset TROUPE_CA TROUPE_CERT TROUPE_KEY
fi
"$TROUPE" node --id 1 --api "$API" --peer "127.0.0.1:$((PORT_BASE + 1))" \
  --metrics "127.0.0.1:$((PORT_BASE + 2))" --data-dir "$DATA/node1" "${security[@]}" >"$OUT/node.log" 2>&1 &
NODE_PID=$!
until "$TROUPE" cluster init --addr "$API" --members "1=127.0.0.1:$((PORT_BASE + 1))@$API" >/dev/null 2>&1; do
  kill -0 "$NODE_PID" 2>/dev/null || { echo "bench-serve: the node died, see $OUT/node.log" >&2; exit 1; }
  sleep 0.2
done
"$TROUPE" models register all-MiniLM-L6-v2 --version 1 --dir "$MODEL_DIR" --addr "$API" >/dev/null
"$TROUPE" models activate all-MiniLM-L6-v2 1 --addr "$API" >/dev/null
until "$TROUPE" embed --addr "$API" --model all-MiniLM-L6-v2 "warm" >/dev/null 2>&1; do sleep 0.2; done

echo "== troupe ==" >&2
engine=()
[[ ${ENGINE:-1} == 1 ]] || engine=(--no-engine)
"$TROUPE" bench serve --addr "$API" --model all-MiniLM-L6-v2 --model-dir "$MODEL_DIR" \
  --concurrency "${CONCURRENCY:-1,4,16,64}" --seconds "$SECS" --rounds "$ROUNDS" "${engine[@]}" \
  --json-out "$OUT/troupe.json"
# The node's batch sizes over the whole load (every client count and round), from /metrics.
curl -sf "http://127.0.0.1:$((PORT_BASE + 2))/metrics" >"$OUT/metrics.txt"
python3 - "$OUT/metrics.txt" >"$OUT/batch-size.json" <<'PY'
import json, re, sys
buckets, texts, batches = [], None, None
for line in open(sys.argv[1]):
    if 'model="all-MiniLM-L6-v2"' not in line:
        continue
    if line.startswith("troupe_batch_size_bucket"):
        buckets.append((re.search(r'le="([^"]+)"', line)[1], int(float(line.split()[-1]))))
    elif line.startswith("troupe_batch_size_sum"):
        texts = int(float(line.split()[-1]))
    elif line.startswith("troupe_batch_size_count"):
        batches = int(float(line.split()[-1]))
# Prometheus buckets are cumulative: counts per (above, up_to] instead.
rows, above, seen = [], 0, 0
for le, cumulative in buckets:
    up_to = None if le == "+Inf" else int(le)
    rows.append({"above": above, "up_to": up_to, "batches": cumulative - seen})
    above, seen = up_to, cumulative
json.dump({"model": "all-MiniLM-L6-v2", "buckets": rows, "batches": batches, "texts": texts},
          sys.stdout, indent=1)
PY
kill -TERM "$NODE_PID"; wait "$NODE_PID" 2>/dev/null || true; NODE_PID=

[[ $RAY == 1 ]] || exit 0
echo "== Ray Serve ==" >&2
# A peer that cannot be set up is reported in OUT_DIR/skipped.txt, never left out silently.
ray_unavailable() { echo "Ray Serve: $1" | tee "$OUT/skipped.txt" >&2; exit 0; }
setup=$(bash "$PEERS/setup-minilm-peers.sh") || ray_unavailable "shared/peers/setup-minilm-peers.sh failed"
eval "$(grep -E '^(MODEL_DIR|ONNX)=' <<<"$setup" | sed 's/^/PEER_/')"
if ! "$RAY_DIR/venv/bin/python" -c 'import ray.serve' 2>/dev/null; then
  { python3 -m venv "$RAY_DIR/venv" &&
    "$RAY_DIR/venv/bin/pip" install -q "ray[serve]" numpy onnxruntime tokenizers safetensors httpx aiohttp; } >&2 ||
    ray_unavailable "its venv could not be made in $RAY_DIR/venv (pip install of ray[serve] failed)"
fi
TOKENS=16 CONCS="1 16 64" DURATION=$SECS PY=$RAY_DIR/venv/bin/python \
  MODEL_DIR=$PEER_MODEL_DIR ONNX=$PEER_ONNX bash "$PEERS/ray/run_all.sh" "$OUT/ray" >&2 ||
  ray_unavailable "shared/peers/ray/run_all.sh failed (its output is in $OUT/ray)"
cat "$OUT/ray/summary.md"
