#!/usr/bin/env bash
# bench.sh -- every comparison in one go, each side by side with its peer, then the generated
# section of docs/benchmarks.md and the PNG plots in docs/img/.
#
#   scripts/bench.sh [OUT_DIR]          # default target/bench/<UTC date-time>
#
# The parts (PARTS, comma-separated; default all, in this order):
#   engine    scripts/bench-engine.sh: troupe's engine against numpy and ONNX Runtime, ROUNDS
#             rounds (the engines' order rotates between rounds)
#   serve     scripts/bench-serve.sh: one node against Ray Serve, ROUNDS runs of both sides; the
#             node's batch-size histogram from /metrics after each run
#   raft      scripts/bench-raft.sh: puts and CAS against etcd, ROUNDS runs; leader kill -9
#             (failover, with the probe timeline) in the first run only
#   rollout   scripts/bench-cluster.sh: a model rolled out to 3 fresh nodes, ROUNDS times
#   scaleout  scripts/bench-cluster.sh: 3 nodes behind one against that node alone, ROUNDS
#             rounds inside one run
#   tls       scripts/bench-tls.sh: plaintext against mTLS, ROUNDS alternating pairs
#   generate  scripts/bench-generate.sh: the decoder against llama.cpp, ROUNDS engine rounds and
#             one serving run
# Each ratio is taken within one run (both sides measured minutes apart on the same machine);
# the summary gives the median over the runs and the min-max across them. A part whose peer
# cannot be set up says so in the summary and is skipped, never estimated.
#
# Env: PARTS (above), ROUNDS (3), SECONDS_PER_POINT (10), QUICK (0; 1: 2-second points, 2 rounds
#      of the fast parts, 1 of the slow ones, 2 kills, and the docs left alone: a smoke test of a
#      few minutes), DOCS (1, or 0 with QUICK=1: write docs/benchmarks.md's generated section and
#      docs/img/*.png; 0 writes OUT_DIR/summary.md and OUT_DIR/img only), PLOTS (1),
#      ENGINE_MIN_TIME (2; QUICK 0.3), GEN_SECONDS (2 x SECONDS_PER_POINT),
#      FAILOVER_ROUNDS (5; QUICK 2), LLAMA_REPS (llama-bench repetitions: 3; QUICK 1), TROUPE_HOME (~/.cache/troupe: the plots' venv lives there),
#      PEERS (../shared/peers), TROUPE_BIN (a troupe binary to use instead of building this tree),
#      DEADLINE_MIN (none: parts not yet started after this many minutes are skipped, and say so).
# Ports: 28000-28900 and 24791-24803, apart from the per-area scripts' defaults, so a run of
# those elsewhere on the machine is not disturbed.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  ROUNDS=${ROUNDS:-2}; SLOW_ROUNDS=1; SECS=${SECONDS_PER_POINT:-2}
  ENGINE_MIN_TIME=${ENGINE_MIN_TIME:-0.3}; FAILOVER_ROUNDS=${FAILOVER_ROUNDS:-2}; LLAMA_REPS=${LLAMA_REPS:-1}
  DOCS=${DOCS:-0}
else
  ROUNDS=${ROUNDS:-3}; SLOW_ROUNDS=$ROUNDS; SECS=${SECONDS_PER_POINT:-10}
  ENGINE_MIN_TIME=${ENGINE_MIN_TIME:-2}; FAILOVER_ROUNDS=${FAILOVER_ROUNDS:-5}; LLAMA_REPS=${LLAMA_REPS:-3}
  DOCS=${DOCS:-1}
fi
GEN_SECONDS=${GEN_SECONDS:-$((SECS * 2))}
PARTS=${PARTS:-engine,serve,raft,rollout,scaleout,tls,generate}
PLOTS=${PLOTS:-1}
export PEERS=${PEERS:-$ROOT/../shared/peers}
export TROUPE_PEERS=$PEERS
TROUPE_HOME=${TROUPE_HOME:-$HOME/.cache/troupe}
OUT=${1:-$ROOT/target/bench/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/status"
OUT=$(cd "$OUT" && pwd)

for part in ${PARTS//,/ }; do
  case $part in
    engine | serve | raft | rollout | scaleout | tls | generate) ;;
    *) echo "bench.sh: unknown part '$part' (PARTS=engine,serve,raft,rollout,scaleout,tls,generate)" >&2; exit 2 ;;
  esac
done

# Clusters and nodes of this run on their own ports and pointer files (see Ports above).
export TROUPE3_BASE=280 TROUPE3_POINTER=$OUT/troupe3.current
export ETCD3_BASE=2479 ETCD3_POINTER=$OUT/etcd3.current
# Ray's run_all.sh: its own port; no retries or long waits for an idle machine, as troupe's
# side gets none either.
export PORT=28800 QUIET_WAIT=${QUIET_WAIT:-0} ATTEMPTS=${ATTEMPTS:-1} RAW_TIME=${RAW_TIME:-$((SECS < 8 ? SECS : 8))}

log() { echo "[bench $(date -u +%H:%M:%S)] $*" >&2; }

# One troupe binary for the whole run (TROUPE_BIN, or built from this tree), copied out of the
# shared target dir so that another worktree's build cannot swap it mid-run.
cd "$ROOT" || exit 1
if [[ -z ${TROUPE_BIN:-} ]]; then
  log "building troupe (release)"
  cargo build --release -q -p troupe || { log "cargo build failed"; exit 1; }
  TROUPE_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/troupe
fi
mkdir -p "$OUT/bin"
cp "$TROUPE_BIN" "$OUT/bin/troupe"
export TROUPE_BIN=$OUT/bin/troupe

python3 - "$OUT/machine.json" "$ROOT" "$QUICK" "$ROUNDS" "$SLOW_ROUNDS" "$SECS" "$ENGINE_MIN_TIME" \
  "$GEN_SECONDS" "$FAILOVER_ROUNDS" "$PARTS" <<'PY'
import json, os, platform, subprocess, sys, time
path, root = sys.argv[1], sys.argv[2]
cpu = {}
for line in open("/proc/cpuinfo"):
    key, _, value = line.partition(":")
    cpu.setdefault(key.strip(), value.strip())
flags = cpu.get("flags", "").split()
wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
          "amx_tile", "amx_int8", "amx_bf16"]
mem_kib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True).stdout.strip()
json.dump({
    "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    "cpu_model": cpu.get("model name", "unknown"),
    "cores": os.cpu_count(),
    "flags": [f for f in wanted if f in flags],
    "ram_gib": round(mem_kib / 2**20, 1),
    "kernel": platform.release(),
    "commit": git("rev-parse", "--short", "HEAD"),
    "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    "settings": dict(zip(["quick", "rounds", "slow_rounds", "seconds_per_point", "engine_min_time",
                          "gen_seconds", "failover_rounds", "parts"], sys.argv[3:])),
}, open(path, "w"), indent=1)
PY

# status PART STATE SECONDS NOTE: one JSON file per part for the summary.
status() {
  python3 -c 'import json, sys, time; json.dump({"part": sys.argv[1], "state": sys.argv[2],
    "seconds": int(sys.argv[3]), "note": sys.argv[4], "ended_epoch": time.time()}, open(sys.argv[5], "w"))' \
    "$1" "$2" "$3" "$4" "$OUT/status/$1.json"
}

# run_step PART DIR CMD...: one run of a per-area script, its tables to DIR.md and its log to
# DIR.log. Returns the script's exit code (3: its peer could not be set up).
run_step() {
  local part=$1 dir=$2; shift 2
  mkdir -p "$dir"
  log "$part: $(basename "$dir")"
  "$@" "$dir" >"$dir.md" 2>"$dir.log"
}

# finish PART CODE STARTED: records how the part ended; a peer's skipped.txt is its note.
finish() {
  local part=$1 code=$2 started=$3 note="" state=ok skipped
  skipped=$(cat "$OUT/$part"/*/skipped.txt 2>/dev/null | sort -u | paste -sd ';' -)
  if [[ $code == 3 ]]; then
    state=skipped; note=${skipped:-the peer could not be set up}
  elif [[ $code != 0 ]]; then
    state=failed; note="exit $code; its logs are $OUT/$part/*.log"
  elif [[ -n $skipped ]]; then
    state=partial; note=$skipped
  fi
  status "$part" "$state" $((SECONDS - started)) "$note"
  log "$part: $state ${note:+($note)} in $((SECONDS - started)) s"
}

part_engine() { # one run whose rounds rotate the engines' order
  run_step engine "$OUT/engine/run" bash scripts/bench-engine.sh --min-time "$ENGINE_MIN_TIME" --rounds "$ROUNDS"
}

part_serve() {
  local r code=0 ray=1
  for ((r = 1; r <= ROUNDS; r++)); do
    RAY=$ray ROUNDS=1 SECONDS_PER_POINT=$SECS PORT_BASE=28400 \
      run_step serve "$OUT/serve/r$r" bash scripts/bench-serve.sh || { code=$?; break; }
    # The peer is set up once: if it could not be, later runs measure troupe alone.
    [[ -f $OUT/serve/r$r/skipped.txt ]] && ray=0
  done
  return "$code"
}

part_raft() {
  local r code=0 phases
  for ((r = 1; r <= ROUNDS; r++)); do
    phases=put,cas
    [[ $r == 1 ]] && phases=put,cas,failover
    PHASES=$phases RUNS=defaults CLIENTS=1,4,16,64 SECONDS_PER_POINT=$SECS FAILOVER_ROUNDS=$FAILOVER_ROUNDS \
      run_step raft "$OUT/raft/r$r" bash scripts/bench-raft.sh || { code=$?; break; }
  done
  return "$code"
}

part_rollout() {
  PARTS=rollout ROLLOUTS=$((ROUNDS < 3 && QUICK == 0 ? 3 : ROUNDS)) PORT_BASE=28600 \
    run_step rollout "$OUT/rollout/run" bash scripts/bench-cluster.sh
}

part_scaleout() {
  PARTS=scaleout ROUNDS=$SLOW_ROUNDS SECONDS_PER_POINT=$SECS CONCURRENCY=1,16,64 PORT_BASE=28600 \
    run_step scaleout "$OUT/scaleout/run" bash scripts/bench-cluster.sh
}

part_tls() {
  PAIRS=$SLOW_ROUNDS SECONDS_PER_POINT=$SECS PORT_BASE=28500 \
    run_step tls "$OUT/tls/run" bash scripts/bench-tls.sh
}

part_generate() {
  PARTS=engines,serve ROUNDS=$SLOW_ROUNDS SECONDS_PER_POINT=$GEN_SECONDS LLAMA_REPS=$LLAMA_REPS LLAMA_PORT=28180 API_PORT=28190 \
    run_step generate "$OUT/generate/run" bash scripts/bench-generate.sh
}

# The machine's 1-minute load average every 5 s, so the summary can say how busy it was during
# each part (about 2 is this benchmark alone on 2 cores; more is other work).
while :; do echo "$(date +%s) $(cut -d' ' -f1 /proc/loadavg)"; sleep 5; done >"$OUT/load.txt" &
LOAD_SAMPLER=$!
trap 'kill "$LOAD_SAMPLER" 2>/dev/null' EXIT
trap 'exit 143' TERM INT

log "out: $OUT; parts: $PARTS; rounds $ROUNDS (slow parts $SLOW_ROUNDS); ${SECS} s per point"
for part in ${PARTS//,/ }; do
  started=$SECONDS
  if [[ -n ${DEADLINE_MIN:-} ]] && ((SECONDS >= DEADLINE_MIN * 60)); then
    status "$part" skipped 0 "not started: the run had used its DEADLINE_MIN=$DEADLINE_MIN minutes"
    log "$part: not started (DEADLINE_MIN=$DEADLINE_MIN reached)"
    continue
  fi
  "part_$part"
  finish "$part" $? "$started"
done
kill "$LOAD_SAMPLER" 2>/dev/null
python3 -c 'import json, sys, time; m = json.load(open(sys.argv[1])); m["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()); json.dump(m, open(sys.argv[1], "w"), indent=1)' "$OUT/machine.json"

if [[ $DOCS == 1 ]]; then
  IMG=$ROOT/docs/img DOC=$ROOT/docs/benchmarks.md
else
  IMG=$OUT/img DOC=
fi
if [[ $PLOTS == 1 ]]; then
  # matplotlib in a venv of its own, made on first use.
  venv=$TROUPE_HOME/plots-venv
  if ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    log "making the plots' venv in $venv"
    { python3 -m venv "$venv" && "$venv/bin/pip" install -q matplotlib; } >&2 || log "the plots' venv could not be made: no plots"
  fi
  if "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    "$venv/bin/python" scripts/plots.py "$OUT" "$IMG" || log "plots.py failed"
  fi
fi
python3 scripts/bench-summary.py "$OUT" --img "$IMG" ${DOC:+--doc "$DOC"} >"$OUT/summary.md" || { log "bench-summary.py failed"; exit 1; }
cat "$OUT/summary.md"
log "done in $((SECONDS / 60)) min: $OUT${DOC:+; $DOC and $IMG updated}"
# A part that failed (not one whose peer was missing) fails the run, after the summary is written.
! grep -l '"state": "failed"' "$OUT"/status/*.json >&2
