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
# Output: the troupe table on stdout, both JSON reports and Ray's summary.md in OUT_DIR
# (default target/bench-serve).
# Env: SECONDS_PER_POINT (10), ROUNDS (3), RAY (1; 0 skips the peer), PEERS (../shared/peers),
#      RAY_DIR (~/.cache/troupe-peers/ray), PORT_BASE (27400),
#      CONCURRENCY (1,4,16,64), ENGINE (1; 0 skips the raw engine runs),
#      TLS (1: the node serves TLS with certificates from `troupe certs init` and the clients
#      verify it; 0: the node runs --insecure, plaintext),
#      TOKEN (0; 1 with TLS=1: clients send a bearer token instead of relying on the admin
#      certificate's role).
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
cargo build --release -p troupe >&2
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
TROUPE=$TARGET/release/troupe
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
kill -TERM "$NODE_PID"; wait "$NODE_PID" 2>/dev/null || true; NODE_PID=

[[ $RAY == 1 ]] || exit 0
echo "== Ray Serve ==" >&2
eval "$(bash "$PEERS/setup-minilm-peers.sh" | grep -E '^(MODEL_DIR|ONNX)=' | sed 's/^/PEER_/')"
if [[ ! -x $RAY_DIR/venv/bin/python ]]; then
  python3 -m venv "$RAY_DIR/venv"
  "$RAY_DIR/venv/bin/pip" install -q "ray[serve]" numpy onnxruntime tokenizers safetensors httpx aiohttp
fi
TOKENS=16 CONCS="1 16 64" DURATION=$SECS PY=$RAY_DIR/venv/bin/python \
  MODEL_DIR=$PEER_MODEL_DIR ONNX=$PEER_ONNX bash "$PEERS/ray/run_all.sh" "$OUT/ray" >&2
cat "$OUT/ray/summary.md"
