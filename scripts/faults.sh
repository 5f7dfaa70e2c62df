#!/usr/bin/env bash
# faults.sh -- the fault tier, kept out of scripts/test.sh: Jepsen-style runs of troupe-jepsen
# against a local 3-node cluster of real `troupe node` processes (each in its own network
# namespace when run as root, so that partitions are possible), with kill -9, SIGSTOP and
# partitions (isolate, minority, bridge) on a schedule drawn from a seed.
#
#   scripts/faults.sh [SECONDS] [SEED]     # default 600 s, a seed from the clock
#
# Prints the seed and the schedule first, then the fault table and the checks
# (linearizability per key, acknowledged writes in every node's watch stream, identical
# watch streams, no value applied twice). A failing run keeps its data and logs and names the
# seed that reproduces its schedule. Env: CARGO_TARGET_DIR, FAULTS (default all),
# OUT (JSON report, default target/faults/local.json).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SECS=${1:-600}
SEED=${2:-}
cargo build --release -p troupe -p troupe-cluster-tests >&2
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$TARGET/faults/local.json}
mkdir -p "$(dirname "$OUT")"
args=(--cluster local --bin "$TARGET/release/troupe" --time "$SECS" --json-out "$OUT")
[[ -n $SEED ]] && args+=(--seed "$SEED")
[[ -n ${FAULTS:-} ]] && args+=(--faults "$FAULTS")
exec "$TARGET/release/troupe-jepsen" "${args[@]}"
