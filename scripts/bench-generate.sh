#!/usr/bin/env bash
# bench-generate.sh -- troupe's decoder against llama.cpp, side by side in one run, on the same
# GGUF file (SmolLM2-135M-Instruct Q4_1) and the same 2 threads:
#   1. the engines alone, ROUNDS times, alternating: llama-bench (pp128, pp512, tg128) and
#      llama-batched-bench (64-token prompts, 64 tokens, 1/4/16 sequences) against
#      `troupe bench generate --model-dir` (the same tests);
#   2. serving: streams at 1/4/16 concurrent clients, each asking 64 tokens (ignore_eos),
#      through one load generator (`troupe bench generate --openai`) against llama-server
#      (-np 16, continuous batching) and against one troupe node's OpenAI port, and through
#      gRPC Generate against the same node.
# Prints Markdown tables; raw outputs go to OUT_DIR (default target/bench-generate): llama.cpp's
# own outputs, troupe-engine-N.json / troupe-tg128-N.json, and serve-{llama,troupe-http,
# troupe-grpc}.json. When llama.cpp cannot be set up, OUT_DIR/skipped.txt says why (exit 3).
#
#   scripts/bench-generate.sh [OUT_DIR]
#
# Env: PEERS (default ../shared/peers from the repo root), ROUNDS (default 3), SECONDS_PER_POINT
#      (default 20), THREADS (default 2), PARTS (default engines,serve: which parts to run),
#      LLAMA_REPS (default 5: llama-bench's repetitions), LLAMA_PORT (18180), API_PORT (18190),
#      TROUPE_BIN (a troupe binary to use instead of building one).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-$ROOT/../shared/peers}
OUT=${1:-$ROOT/target/bench-generate}
ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_POINT:-20}
THREADS=${THREADS:-2}
PARTS=${PARTS:-engines,serve}
LLAMA_REPS=${LLAMA_REPS:-5}
mkdir -p "$OUT"
cd "$ROOT"

if [[ -z ${TROUPE_BIN:-} ]]; then
  cargo build --release -q -p troupe
  TROUPE_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/troupe
fi
TROUPE=$TROUPE_BIN

# A peer that cannot be set up is reported in OUT_DIR/skipped.txt, never left out silently.
if ! setup=$("$PEERS/llamacpp/setup.sh"); then
  echo "llama.cpp: shared/peers/llamacpp/setup.sh failed (build or download)" | tee "$OUT/skipped.txt" >&2
  exit 3
fi
eval "$(grep -E '^(LLAMA_BIN|SMOLLM2_GGUF)=' <<<"$setup")"
MODEL_DIR=$("$TROUPE" models fetch smollm2-135m --quiet | tail -n 1)
GGUF=$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf
cmp -s "$GGUF" "$SMOLLM2_GGUF" || { echo "bench-generate: the peer's GGUF differs from troupe's" >&2; exit 1; }

if [[ ,$PARTS, == *,engines,* ]]; then
echo "## Engines ($ROUNDS rounds, $THREADS threads)"
for round in $(seq "$ROUNDS"); do
  "$LLAMA_BIN/llama-bench" -m "$GGUF" -t "$THREADS" -r "$LLAMA_REPS" -p 128,512 -n 128 -o json >"$OUT/llama-bench-$round.json" 2>/dev/null
  "$LLAMA_BIN/llama-batched-bench" -m "$GGUF" -t "$THREADS" -c 8192 -npp 64 -ntg 64 -npl 1,4,16 >"$OUT/llama-batched-$round.txt" 2>/dev/null
  RAYON_NUM_THREADS=$THREADS "$TROUPE" bench generate --model-dir "$MODEL_DIR" --prompt-tokens 128,512 \
    --streams 1,4,16 --tokens 64 --json >"$OUT/troupe-engine-$round.json"
  RAYON_NUM_THREADS=$THREADS "$TROUPE" bench generate --model-dir "$MODEL_DIR" --prompt-tokens 128 \
    --streams 1 --tokens 128 --json >"$OUT/troupe-tg128-$round.json"
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rows = {}
def add(test, who, value):
    rows.setdefault(test, {}).setdefault(who, []).append(value)
for r in range(1, rounds + 1):
    for entry in json.load(open(f"{out}/llama-bench-{r}.json")):
        if entry["n_prompt"] and not entry["n_gen"]:
            add(f"prefill {entry['n_prompt']}", "llama", entry["avg_ts"])
        elif entry["n_gen"] and not entry["n_prompt"]:
            add(f"decode, 1 stream ({entry['n_gen']} tokens)", "llama", entry["avg_ts"])
    for line in open(f"{out}/llama-batched-{r}.txt"):
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 9 and cells[1].isdigit() and cells[3].isdigit():
            npl, s_tg = int(cells[3]), float(cells[8])
            add(f"decode, {npl} stream{'s' if npl > 1 else ''} (64 tokens, batched)", "llama", s_tg)
    for point in json.load(open(f"{out}/troupe-engine-{r}.json"))["engine"]:
        test = point["test"]
        if test.startswith("decode"):
            test = test.replace("decode, ", "decode, ") + " (64 tokens, batched)"
        add(test, "troupe", point["tokens_per_s"])
    for point in json.load(open(f"{out}/troupe-tg128-{r}.json"))["engine"]:
        if point["test"].startswith("decode"):
            add("decode, 1 stream (128 tokens)", "troupe", point["tokens_per_s"])
# engines.json: tokens/s per test and side, one value per round (round order).
json.dump({"rounds": rounds, "tests": rows}, open(f"{out}/engines.json", "w"), indent=1)
print("| test | troupe tokens/s | llama.cpp tokens/s | troupe / llama.cpp (median; min-max over rounds) |")
print("|---|---:|---:|---:|")
for test, who in rows.items():
    t, l = who.get("troupe", []), who.get("llama", [])
    if not t or not l:
        continue
    ratios = [a / b for a, b in zip(t, l)]
    print(f"| {test} | {statistics.median(t):.1f} | {statistics.median(l):.1f} | "
          f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")
PY
fi

[[ ,$PARTS, == *,serve,* ]] || exit 0
echo
echo "## Serving (${SECS} s per point)"
LLAMA_PORT=${LLAMA_PORT:-18180}
"$LLAMA_BIN/llama-server" -m "$GGUF" -t "$THREADS" -np 16 -c $((16 * 256)) --cont-batching \
  --host 127.0.0.1 --port "$LLAMA_PORT" >"$OUT/llama-server.log" 2>&1 &
LLAMA_PID=$!
trap 'kill $LLAMA_PID 2>/dev/null || true; [[ -n ${NODE_PID:-} ]] && kill $NODE_PID 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$LLAMA_PORT/health" >/dev/null 2>&1 && break
  sleep 0.5
done
"$TROUPE" bench generate --openai "http://127.0.0.1:$LLAMA_PORT" --model smollm2 --streams 1,4,16 \
  --tokens 64 --seconds "$SECS" --json >"$OUT/serve-llama.json"
kill $LLAMA_PID; wait $LLAMA_PID 2>/dev/null || true

NODE_DIR=$(mktemp -d)
API_PORT=${API_PORT:-18190}
cat >"$NODE_DIR/node.toml" <<EOF
id = 1
api = "127.0.0.1:$API_PORT"
peer = "127.0.0.1:$((API_PORT + 1))"
metrics = "127.0.0.1:$((API_PORT + 2))"
http = "127.0.0.1:$((API_PORT + 3))"
data_dir = "$NODE_DIR/data"
insecure = true
EOF
RAYON_NUM_THREADS=$THREADS "$TROUPE" node --config "$NODE_DIR/node.toml" >"$OUT/troupe-node.log" 2>&1 &
NODE_PID=$!
for _ in $(seq 120); do
  "$TROUPE" cluster init --addr "127.0.0.1:$API_PORT" --members "1=127.0.0.1:$((API_PORT + 1))@127.0.0.1:$API_PORT" >/dev/null 2>&1 && break
  sleep 0.5
done
"$TROUPE" models register smollm2-135m --version 1 --dir "$MODEL_DIR" --addr "127.0.0.1:$API_PORT" >/dev/null
"$TROUPE" models activate smollm2-135m 1 --wait --addr "127.0.0.1:$API_PORT" >/dev/null
"$TROUPE" bench generate --openai "http://127.0.0.1:$((API_PORT + 3))" --model smollm2-135m --streams 1,4,16 \
  --tokens 64 --seconds "$SECS" --json >"$OUT/serve-troupe-http.json"
"$TROUPE" bench generate --addr "127.0.0.1:$API_PORT" --model smollm2-135m --streams 1,4,16 \
  --tokens 64 --seconds "$SECS" --json >"$OUT/serve-troupe-grpc.json"
kill $NODE_PID; wait $NODE_PID 2>/dev/null || true
python3 - "$OUT" <<'PY'
import json, sys
for side in ("llama", "troupe-http", "troupe-grpc"):
    print(f"### {side}\n")
    print("| streams | requests | tokens/s | TTFT p50 ms | ITL p50 ms | ITL p99 ms | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for p in json.load(open(f"{sys.argv[1]}/serve-{side}.json"))["serve"]:
        print(f"| {p['streams']} | {p['requests']} | {p['tokens_per_s']:.1f} | {p['ttft_p50_ms']:.1f} | "
              f"{p['itl_p50_ms']:.1f} | {p['itl_p99_ms']:.1f} | {p['errors']} |")
    print()
PY
