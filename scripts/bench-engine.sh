#!/usr/bin/env bash
# Engine benchmark, side by side with its peers in one run: troupe (burn, fused CPU kernels),
# the numpy reference and ONNX Runtime fp32, on the same machine, same workload, same
# model files. Prints a markdown table with ratios.
#
# usage: scripts/bench-engine.sh [--threads N] [--min-time S]
# env:   TROUPE_PEERS  folder of the peer scripts (default ../shared/peers)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
peers=${TROUPE_PEERS:-$root/../shared/peers}
threads=2
min_time=2
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --min-time) min_time=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -f "$peers/setup-minilm-peers.sh" ] || { echo "peer scripts not found in $peers: set TROUPE_PEERS" >&2; exit 2; }

eval "$(bash "$peers/setup-minilm-peers.sh" | grep -E '^(PEER_PY|MODEL_DIR|ONNX)=')"
cargo build --release -q -p troupe --manifest-path "$root/Cargo.toml"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== troupe" >&2
"$root/target/release/troupe" bench engine --model-dir "$MODEL_DIR" --threads "$threads" \
  --min-time "$min_time" | tee "$out/troupe.txt" >&2
echo "== numpy reference" >&2
"$PEER_PY" "$peers/minilm_ref.py" --model-dir "$MODEL_DIR" --bench --threads "$threads" \
  --min-time "$min_time" | tee "$out/numpy.txt" >&2
echo "== onnxruntime" >&2
"$PEER_PY" "$peers/bench_ort.py" "$MODEL_DIR" "$ONNX" --threads "$threads" \
  --min-time "$min_time" | tee "$out/ort.txt" >&2

python3 - "$out" <<'PY'
import re, sys, os
out = sys.argv[1]
def parse(name):
    rows = {}
    for line in open(os.path.join(out, name)):
        m = re.search(r"tokens=\s*(\d+) batch=\s*(\d+) .*ms/batch=\s*([\d.]+) sentences/sec=\s*([\d.]+)", line)
        if m:
            rows[(int(m[1]), int(m[2]))] = (float(m[3]), float(m[4]))
    return rows
t, n, o = parse("troupe.txt"), parse("numpy.txt"), parse("ort.txt")
gemm = [l for l in open(os.path.join(out, "troupe.txt")) if l.startswith("gemm")]
print("| tokens | batch | troupe sent/s (ms/batch) | numpy sent/s | ONNX Runtime sent/s | troupe / numpy | troupe / ORT |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for key in sorted(t):
    ts, ns, os_ = t[key][1], n.get(key, (0, 0))[1], o.get(key, (0, 0))[1]
    r = lambda a, b: f"{a / b:.2f}x" if b else "n/a"
    print(f"| {key[0]} | {key[1]} | {ts:.1f} ({t[key][0]:.1f}) | {ns:.1f} | {os_:.1f} | {r(ts, ns)} | {r(ts, os_)} |")
if gemm:
    print()
    print(gemm[0].strip())
PY
