#!/usr/bin/env bash
# Fuzzes troupe's untrusted-input edges with cargo-fuzz (libFuzzer, nightly toolchain):
#   proto         protobuf request bodies -> the API's checks and conversions
#   raft_payload  Raft payloads -> decoding and the peer guard
#   config        node config files -> NodeConfig and what is derived from it
#   token         bearer tokens and JWKS documents -> the verifier
#   manifest      stored artifact manifests and push paths
# Each target runs MINUTES (default 10) on its committed corpus in fuzz/corpus/<target>;
# new inputs are merged back minimised (cargo fuzz cmin), so the corpora can be committed.
# A crash stops the script with the reproducer under fuzz/artifacts/<target>/.
# The stable-toolchain replay of the corpora is cli/tests/fuzz_corpora.rs (scripts/test.sh).
#
# usage: scripts/fuzz.sh [MINUTES] [TARGET...]
# env:   TROUPE_FUZZ_TARGET_DIR  where the fuzz build goes (default ~/.cache/troupe-fuzz/target)
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=${1:-10}
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(proto raft_payload config token manifest)
[[ $minutes =~ ^[0-9]+$ && $minutes -gt 0 ]] || { echo "MINUTES must be a positive integer, got '$minutes'" >&2; exit 2; }

rustup toolchain list | grep -q '^nightly' || { echo "the nightly toolchain is missing: rustup toolchain install nightly" >&2; exit 1; }
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz (cargo install)"
  cargo +nightly install --locked cargo-fuzz
fi
export CARGO_TARGET_DIR=${TROUPE_FUZZ_TARGET_DIR:-$HOME/.cache/troupe-fuzz/target}

# No sanitizer: troupe's code is safe Rust, and what the fuzzers look for is a panic, an
# abort or a hang; -s none builds and runs several times faster on 2 cores.
flags=(--sanitizer none --release)
cargo +nightly fuzz build "${flags[@]}"
for target in "${targets[@]}"; do
  corpus=fuzz/corpus/$target
  mkdir -p "$corpus"
  scratch=$(mktemp -d)
  before=$(ls "$corpus" | wc -l)
  echo "== $target: ${minutes} min from $before inputs"
  # New inputs go to the scratch dir; the committed corpus is read-only seed material.
  cargo +nightly fuzz run "${flags[@]}" "$target" "$scratch" "$corpus" -- \
    -max_total_time=$((minutes * 60)) -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 2>&1 |
    grep -E '^(#[0-9]+ +(DONE|INITED)|stat::|Done|==[0-9]+== ERROR|SUMMARY|Test unit written)' || true
  status=${PIPESTATUS[0]}
  if [[ $status -ne 0 ]]; then
    echo "$target FAILED (exit $status): reproducer in fuzz/artifacts/$target/" >&2
    rm -rf "$scratch"
    exit 1
  fi
  # Merge and minimise: libFuzzer's -merge=1 copies into the empty first dir only the inputs
  # of the others that add coverage.
  merged=$(mktemp -d)
  cargo +nightly fuzz run "${flags[@]}" "$target" "$merged" "$corpus" "$scratch" -- -merge=1 2>&1 | tail -n 1
  rm -rf "$corpus" && mv "$merged" "$corpus"
  rm -rf "$scratch"
  echo "== $target: corpus $before -> $(ls "$corpus" | wc -l) inputs"
done
