#!/usr/bin/env bash
# faults.sh -- the fault tier, kept out of scripts/test.sh: Jepsen-style runs of troupe-jepsen
# with kill -9, pauses and partitions on a schedule drawn from a seed.
#
#   scripts/faults.sh [SECONDS] [SEED]            # local: 3 `troupe node` processes
#   scripts/faults.sh --compose [SECONDS] [SEED]  # compose: the docker-compose cluster
#   scripts/faults.sh --crash [CYCLES] [SEED]     # crash durability, local (default 500)
#
# Default 600 s and a seed from the clock.
# - local: each node in its own network namespace when run as root, so that partitions are
#   possible; SIGKILL, SIGSTOP and iptables cuts, and the nodes' failpoints (a slow disk, a
#   failed fsync, a clock jump).
# - crash: kill -9 and aborts at failpoints in the Raft storage, one node at a time, with
#   the dead node's disk checked between crashes (troupe-jepsen --crash-cycles).
# - compose: a project of its own (troupe-faults, ports 27700-27722, network 10.177.2.0/24,
#   image troupe:faults) made by scripts/compose-up.sh (static build, model pushed and
#   active), hurt with docker kill, docker pause and docker network disconnect, with Embed
#   traffic beside the register clients; removed at the end (TROUPE_COMPOSE_KEEP=1 keeps it
#   after a failure).
# Prints the seed and the schedule first, then the fault table and the checks
# (linearizability per key, acknowledged writes in every node's watch stream, identical
# watch streams, no value applied twice). A failing run names the seed that reproduces its
# schedule. Env: CARGO_TARGET_DIR, FAULTS (default all), OUT (JSON report, default
# target/faults/<tier>.json), REPEAT (default 1: runs in a row, each with its own seed unless
# SEED is given, against one compose cluster or a new local one each time; stops at the
# first failure and prints the pass count and each run's wall time).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
tier=local
crash=
if [[ ${1:-} == --compose ]]; then tier=compose; shift; fi
if [[ ${1:-} == --crash ]]; then crash=${2:-500}; shift; shift || true; fi
SECS=${1:-600}
SEED=${2:-}
cargo build --release -p troupe -p troupe-cluster-tests >&2
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$TARGET/faults/$tier.json}
mkdir -p "$(dirname "$OUT")"
args=(--cluster "$tier" --time "$SECS" --json-out "$OUT")
if [[ -n $crash ]]; then
  # Snapshots every 50 entries and no log kept behind them, so that snapshot writes,
  # installs and purges happen often enough to be crashed in.
  SEED=${1:-}
  args=(--cluster local --crash-cycles "$crash" --time 5 --json-out "${OUT%.json}-crash.json"
    --raft $'snapshot_every_entries = 50\nkeep_entries_after_snapshot = 0')
fi
[[ -n $SEED ]] && args+=(--seed "$SEED")
[[ -n ${FAULTS:-} ]] && args+=(--faults "$FAULTS")

REPEAT=${REPEAT:-1}
# Runs "$@" REPEAT times in a row; stops at the first failure.
repeat() {
  local i start passed=0 times=()
  for ((i = 1; i <= REPEAT; i++)); do
    start=$SECONDS
    if ! "$@"; then
      echo "faults.sh: run $i of $REPEAT FAILED after $((SECONDS - start)) s; $passed passed before it (times: ${times[*]:-none} s)" >&2
      return 1
    fi
    passed=$((passed + 1))
    times+=("$((SECONDS - start))")
    ((REPEAT > 1)) && echo "faults.sh: run $i of $REPEAT passed in $((SECONDS - start)) s" >&2
  done
  ((REPEAT > 1)) && echo "faults.sh: $passed of $REPEAT runs passed; wall times ${times[*]} s" >&2
  return 0
}

if [[ $tier == local ]]; then
  repeat "$TARGET/release/troupe-jepsen" --bin "$TARGET/release/troupe" "${args[@]}"
  exit
fi

export TROUPE_COMPOSE_PROJECT=troupe-faults TROUPE_IMAGE=troupe:faults TROUPE_COMPOSE_NET=10.177.2
export TROUPE_COMPOSE_API1=27700 TROUPE_COMPOSE_API2=27710 TROUPE_COMPOSE_API3=27720
export TROUPE_COMPOSE_METRICS1=27702 TROUPE_COMPOSE_METRICS2=27712 TROUPE_COMPOSE_METRICS3=27722
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
dc() { "${compose[@]}" -p "$TROUPE_COMPOSE_PROJECT" -f "$ROOT/docker-compose.yml" "$@"; }
cleanup() {
  local rc=$?
  if ((rc != 0)) && [[ ${TROUPE_COMPOSE_KEEP:-0} == 1 ]]; then
    echo "TROUPE_COMPOSE_KEEP=1: project $TROUPE_COMPOSE_PROJECT left up" >&2
    exit "$rc"
  fi
  dc down -v --remove-orphans >/dev/null 2>&1 || true
  docker image rm "$TROUPE_IMAGE" >/dev/null 2>&1 || true
  exit "$rc"
}
trap cleanup EXIT
dc down -v --remove-orphans >/dev/null 2>&1 || true
bash scripts/compose-up.sh >&2
if [[ -n ${TROUPE_STATIC_TARGET_DIR:-} ]]; then static_target=$TROUPE_STATIC_TARGET_DIR
elif [[ -n ${CARGO_TARGET_DIR:-} ]]; then static_target=$(dirname "$CARGO_TARGET_DIR")/static-target
else static_target=$ROOT/target/static; fi
# shellcheck disable=SC1090
source "$static_target/compose-certs/$TROUPE_COMPOSE_PROJECT/env"
repeat "$TARGET/release/troupe-jepsen" "${args[@]}" --project "$TROUPE_COMPOSE_PROJECT" \
  --addrs "127.0.0.1:$TROUPE_COMPOSE_API1,127.0.0.1:$TROUPE_COMPOSE_API2,127.0.0.1:$TROUPE_COMPOSE_API3" \
  --embed-model all-MiniLM-L6-v2
