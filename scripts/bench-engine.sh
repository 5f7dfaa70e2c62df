#!/usr/bin/env bash
# Engine benchmark, side by side with its peers in one run: troupe (burn, fused CPU kernels),
# the numpy reference and ONNX Runtime fp32, on the same machine, same workload, same
# model files. Prints a markdown table with ratios; keeps each side's raw output (NAME.txt) and
# engine.json (every side's points, parsed from those files) in OUT_DIR.
#
# usage: scripts/bench-engine.sh [--threads N] [--min-time S] [OUT_DIR]
# env:   TROUPE_PEERS  folder of the peer scripts (default ../shared/peers)
#        TROUPE_BIN    a troupe binary to use instead of building one (scripts/bench.sh sets it)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
peers=${TROUPE_PEERS:-$root/../shared/peers}
threads=2
min_time=2
out=$root/target/bench-engine
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --min-time) min_time=$2; shift 2 ;;
    -*) echo "unknown argument $1" >&2; exit 2 ;;
    *) out=$1; shift ;;
  esac
done
[ -f "$peers/setup-minilm-peers.sh" ] || { echo "peer scripts not found in $peers: set TROUPE_PEERS" >&2; exit 2; }

mkdir -p "$out"
# A peer that cannot be set up is reported in OUT_DIR/skipped.txt (exit 3), never left out silently.
if ! setup=$(bash "$peers/setup-minilm-peers.sh"); then
  echo "numpy and ONNX Runtime: shared/peers/setup-minilm-peers.sh failed" | tee "$out/skipped.txt" >&2
  exit 3
fi
eval "$(grep -E '^(PEER_PY|MODEL_DIR|ONNX)=' <<<"$setup")"
if [ -z "${TROUPE_BIN:-}" ]; then
  cargo build --release -q -p troupe --manifest-path "$root/Cargo.toml"
  TROUPE_BIN=${CARGO_TARGET_DIR:-$root/target}/release/troupe
fi

echo "== troupe" >&2
"$TROUPE_BIN" bench engine --model-dir "$MODEL_DIR" --threads "$threads" \
  --min-time "$min_time" | tee "$out/troupe.txt" >&2
echo "== numpy reference" >&2
"$PEER_PY" "$peers/minilm_ref.py" --model-dir "$MODEL_DIR" --bench --threads "$threads" \
  --min-time "$min_time" | tee "$out/numpy.txt" >&2
echo "== onnxruntime" >&2
"$PEER_PY" "$peers/bench_ort.py" "$MODEL_DIR" "$ONNX" --threads "$threads" \
  --min-time "$min_time" | tee "$out/ort.txt" >&2

python3 - "$out" "$threads" "$min_time" <<'PY'
import glob, json, re, sys, os
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
# engine.json: every side whose raw output is in OUT_DIR (NAME.txt), so a further side run into
# the same folder is kept too.
sides = {os.path.basename(p)[:-4]: parse(os.path.basename(p)) for p in sorted(glob.glob(os.path.join(out, "*.txt")))}
json.dump({"threads": int(sys.argv[2]), "min_time_s": float(sys.argv[3]),
           "gemm": gemm[0].strip() if gemm else None,
           "sides": {side: [{"tokens": k[0], "batch": k[1], "ms_per_batch": v[0], "sentences_per_s": v[1]}
                            for k, v in sorted(rows.items())] for side, rows in sides.items() if rows}},
          open(os.path.join(out, "engine.json"), "w"), indent=1)
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
