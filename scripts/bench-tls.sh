#!/usr/bin/env bash
# bench-tls.sh -- what TLS costs: the same workloads on the same machine in one run, with the
# nodes in plaintext (--insecure) and with mTLS, alternating (plain, tls, plain, tls...) so a
# noisy minute hits both.
#
#   scripts/bench-tls.sh [OUT_DIR]
#
# 1. Raft puts: a 3-node cluster (scripts/troupe3.sh, TROUPE3_TLS=0 or 1), `troupe bench raft
#    --phases put` at 1 and 64 clients (256-byte puts to the leader over the API port, which
#    replicates each to the followers over the peer port).
# 2. Embed: scripts/bench-serve.sh's node (TLS=0 or 1), `troupe bench serve` at 16 clients,
#    without the raw engine or Ray runs.
# JSON reports go to OUT_DIR (default target/bench-tls); the medians per mode are printed.
# Env: SECONDS_PER_POINT (10), PAIRS (2), PORT_BASE (27500), TROUPE_BIN (a troupe binary to use
#      instead of building one),
#      COMPARE (tls: plaintext against mTLS; auth: both mTLS, the clients' credential a client
#      certificate with a role against a bearer token the node verifies on every call).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
COMPARE=${COMPARE:-tls}
[[ $COMPARE == tls || $COMPARE == auth ]] || { echo "COMPARE must be tls or auth" >&2; exit 2; }
OUT=${1:-$ROOT/target/bench-$COMPARE}
SECS=${SECONDS_PER_POINT:-10}
PAIRS=${PAIRS:-2}
PORT_BASE=${PORT_BASE:-27500}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
if [[ -z ${TROUPE_BIN:-} ]]; then
  cargo build --release -p troupe >&2
  TROUPE_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/troupe
fi
export TROUPE_BIN
cleanup() { bash scripts/troupe3.sh stop >/dev/null 2>&1 || true; }
trap cleanup EXIT

# tls: mode 0 plaintext, 1 mTLS. auth: both mTLS; mode 0 the certificate's role, 1 a token.
tls_of() { if [[ $COMPARE == auth ]]; then echo 1; else echo "$1"; fi; }
token_of() { if [[ $COMPARE == auth ]]; then echo "$1"; else echo 0; fi; }

raft() ( # MODE(0|1) RUN; a subshell, so the client's TROUPE_CA stays in it
  TROUPE3_TLS=$(tls_of "$1") bash scripts/troupe3.sh start >&2
  eval "$(bash scripts/troupe3.sh env)"
  if [[ $(token_of "$1") == 1 ]]; then
    TROUPE_TOKEN=$("$TROUPE_BIN" token issue --keys "$(dirname "$TROUPE_CA")" --role admin --ttl 2h)
    export TROUPE_TOKEN
  fi
  "$TROUPE_BIN" bench raft --addr "$(bash scripts/troupe3.sh endpoints)" \
    --clients 1,64 --seconds "$SECS" --phases put --json-out "$OUT/raft-tls$1-$2.json" >&2
  bash scripts/troupe3.sh stop >&2
)

serve() { # MODE(0|1) RUN: bench-serve.sh's node and load, at 16 clients only
  TLS=$(tls_of "$1") TOKEN=$(token_of "$1") RAY=0 ROUNDS=1 CONCURRENCY=16 ENGINE=0 PORT_BASE=$PORT_BASE SECONDS_PER_POINT=$SECS \
    bash scripts/bench-serve.sh "$OUT/serve-$1-$2" >&2
  cp "$OUT/serve-$1-$2/troupe.json" "$OUT/serve-tls$1-$2.json"
}

export COMPARE
for run in $(seq "$PAIRS"); do
  for mode in 0 1; do echo "== raft puts, $COMPARE mode $mode, pair $run ==" >&2; raft "$mode" "$run"; done
  for mode in 0 1; do echo "== embed, $COMPARE mode $mode, pair $run ==" >&2; serve "$mode" "$run"; done
done

python3 - "$OUT" <<'EOF'
import glob, json, os, statistics, sys
out = sys.argv[1]

def numbers(doc, path=()):
    """Every (path, number) in a JSON document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from numbers(v, path + (str(k),))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from numbers(v, path + (str(i),))
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool):
        yield path, doc

for kind in ("raft", "serve"):
    series = {}
    for mode in ("0", "1"):
        for f in sorted(glob.glob(os.path.join(out, f"{kind}-tls{mode}-*.json"))):
            for path, value in numbers(json.load(open(f))):
                series.setdefault(path, {}).setdefault(mode, []).append(value)
    a_name, b_name = ("certificate", "token") if os.environ["COMPARE"] == "auth" else ("plaintext", "TLS")
    print(f"\n{kind}: median {a_name} | median {b_name} | {b_name} / {a_name}")
    for path, modes in sorted(series.items()):
        name = "/".join(path)
        if not any(w in name for w in ("ops_per_s", "per_second", "throughput", "p50", "p99", "rps")):
            continue
        if "0" in modes and "1" in modes:
            a, b = statistics.median(modes["0"]), statistics.median(modes["1"])
            print(f"  {name}: {a:.2f} | {b:.2f} | {b / a if a else float('nan'):.3f}")
EOF
