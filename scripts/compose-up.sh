#!/usr/bin/env bash
# compose-up.sh -- the three-node cluster of docker-compose.yml, from source to a served
# embedding:
#   1. builds troupe statically (glibc, +crt-static) and the image $TROUPE_IMAGE
#      (troupe:local), FROM scratch: nothing is pulled, no registry is needed;
#   2. makes the cluster CA and certificates in the `certs` volume (once: `troupe certs init`
#      with the service names as hosts), copies the CA and the admin's certificate to
#      $static_target/compose-certs/<project> for host-side clients (it prints the export
#      line; env file: that dir's `env`), starts node1..node3 with mTLS and waits until their
#      healthchecks pass;
#   3. forms the Raft group (`troupe cluster init`, a no-op on an initialised cluster);
#   4. pushes all-MiniLM-L6-v2 to node1 (fetched into $TROUPE_HOME first when missing; the
#      version is the digest's first 12 hex characters, so the same files are "unchanged")
#      and activates it with --wait (a no-op when it is already active);
#   5. waits until an Embed through node1's published port answers 384 numbers.
# Run it again on existing volumes and it resumes: every step is idempotent.
#
# The host-side client is the same static binary: $TROUPE_COMPOSE_BIN after a run.
#
# env: TROUPE_COMPOSE_PROJECT   compose project name (default troupe)
#      TROUPE_IMAGE             image tag (default troupe:local)
#      TROUPE_COMPOSE_NET       /24 prefix of the cluster network (default 10.177.0); one
#                               per project on a host (members are service names, not IPs)
#      TROUPE_COMPOSE_API1..3   published API ports on 127.0.0.1 (7700, 7710, 7720)
#      TROUPE_COMPOSE_METRICS1..3  published metrics ports (7702, 7712, 7722)
#      TROUPE_MODEL_DIR         model directory to push (default: fetched into the cache)
#      TROUPE_STATIC_TARGET_DIR cargo target dir of the static build (default: beside
#                               $CARGO_TARGET_DIR as static-target, else target/static)
#      TROUPE_COMPOSE_BUILD=0   use the existing image and binary, build nothing
#      TROUPE_COMPOSE_TIMEOUT   seconds each wait may take (default 300)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

project=${TROUPE_COMPOSE_PROJECT:-troupe}
export TROUPE_IMAGE=${TROUPE_IMAGE:-troupe:local}
export TROUPE_COMPOSE_NET=${TROUPE_COMPOSE_NET:-10.177.0}
export TROUPE_COMPOSE_API1=${TROUPE_COMPOSE_API1:-7700}
export TROUPE_COMPOSE_API2=${TROUPE_COMPOSE_API2:-7710}
export TROUPE_COMPOSE_API3=${TROUPE_COMPOSE_API3:-7720}
timeout_s=${TROUPE_COMPOSE_TIMEOUT:-300}
model=all-MiniLM-L6-v2

if [[ -n ${TROUPE_STATIC_TARGET_DIR:-} ]]; then static_target=$TROUPE_STATIC_TARGET_DIR
elif [[ -n ${CARGO_TARGET_DIR:-} ]]; then static_target=$(dirname "$CARGO_TARGET_DIR")/static-target
else static_target=$repo/target/static; fi
host_triple=$(rustc -vV 2>/dev/null | sed -n 's/^host: //p' || true)
host_triple=${host_triple:-x86_64-unknown-linux-gnu}
bin=$static_target/$host_triple/release/troupe

say() { printf '[compose-up] %s\n' "$*"; }
die() { printf '[compose-up] FAILED: %s\n' "$*" >&2; exit 1; }

if docker compose version >/dev/null 2>&1; then compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then compose=(docker-compose)
else die "neither 'docker compose' nor 'docker-compose' is installed"; fi
dc() { "${compose[@]}" -p "$project" -f "$repo/docker-compose.yml" "$@"; }
docker info >/dev/null 2>&1 || die "no Docker engine reachable (docker info fails)"

# Polls `"$@"` every half second until it succeeds; fails naming WHAT after the timeout.
wait_for() {
  local what=$1; shift
  local deadline=$((SECONDS + timeout_s))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      say "timed out after ${timeout_s}s waiting for $what; last attempt:"
      "$@" || true
      dc ps || true
      dc logs --tail 30 || true
      die "$what"
    fi
    sleep 0.5
  done
}

build() {
  [[ $host_triple == *-linux-gnu ]] || die "the static build needs a *-linux-gnu host, not $host_triple"
  say "building static troupe ($host_triple, +crt-static) in $static_target"
  local started=$SECONDS
  # No debug info in the image binary; the workspace's release profile keeps it for profiling.
  CARGO_TARGET_DIR=$static_target RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
    nice -n 10 cargo build --release -p troupe --target "$host_triple"
  say "static build took $((SECONDS - started))s"
  # A dynamically linked binary would start in the image and die on the missing loader.
  if command -v file >/dev/null && ! file "$bin" | grep -q 'static'; then
    die "$bin is not statically linked: $(file "$bin")"
  fi

  # The build context holds only what the image needs (never target/).
  local context=$static_target/image-context
  rm -rf "$context"
  mkdir -p "$context/data" "$context/tmp" "$context/certs"
  chmod 1777 "$context/tmp"
  cp "$bin" "$context/troupe"
  local certs
  for certs in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    [[ -f $certs ]] && break
  done
  [[ -f $certs ]] || die "no CA bundle on this host (apt-get install -y ca-certificates)"
  cp "$certs" "$context/ca-certificates.crt"
  printf 'hosts: files dns\n' >"$context/nsswitch.conf"
  cp deploy/Dockerfile "$context/Dockerfile"

  local old
  old=$(docker image inspect -f '{{.Id}}' "$TROUPE_IMAGE" 2>/dev/null || true)
  say "building image $TROUPE_IMAGE"
  docker build -q -t "$TROUPE_IMAGE" "$context" >/dev/null
  local new
  new=$(docker image inspect -f '{{.Id}}' "$TROUPE_IMAGE")
  # The previous build of this tag would be left dangling; containers still using it keep it.
  if [[ -n $old && $old != "$new" ]]; then docker image rm "$old" >/dev/null 2>&1 || true; fi
  say "image $TROUPE_IMAGE: $(docker image inspect -f '{{.Size}}' "$TROUPE_IMAGE" | awk '{printf "%.1f MB", $1/1e6}')"
}

if [[ ${TROUPE_COMPOSE_BUILD:-1} != 0 ]]; then build; fi
[[ -x $bin ]] || die "no static troupe at $bin: run without TROUPE_COMPOSE_BUILD=0"
docker image inspect "$TROUPE_IMAGE" >/dev/null 2>&1 || die "no image $TROUPE_IMAGE: run without TROUPE_COMPOSE_BUILD=0"
troupe() { "$bin" "$@"; }

healthy() {
  local id status
  id=$(dc ps -q "$1")
  [[ -n $id ]] || return 1
  status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")
  [[ $status == healthy ]]
}

# The CA and certificates, made once in the certs volume (the nodes mount it read-only).
certs_host=$static_target/compose-certs/$project
if out=$(dc run --rm certs 2>&1); then
  say "made the cluster CA and node certificates in the certs volume"
elif [[ $out == *"never overwrites"* ]]; then
  say "certificates: the certs volume already holds the cluster CA"
else
  die "cannot make the certificates: $out"
fi
rm -rf "$certs_host"
mkdir -p "$certs_host"
chmod 700 "$certs_host"
copier=$(docker create -v "${project}_certs:/certs" "$TROUPE_IMAGE" --version)
docker cp "$copier:/certs/tls/." "$certs_host/" >/dev/null || { docker rm -v "$copier" >/dev/null; die "cannot copy the certificates out of volume ${project}_certs"; }
# -v: the image's /data volume, made for this container, goes with it.
docker rm -v "$copier" >/dev/null
chmod 600 "$certs_host"/*.key
rm -f "$certs_host/ca.key" "$certs_host"/node-*.key "$certs_host/jwt-signing.key"
# A certs volume made before API tokens has no signing key: make one (never replaced).
if ! out=$(dc run --rm certs token init --keys /certs/tls 2>&1) && [[ $out != *"already exists"* ]]; then
  die "cannot make the token signing key: $out"
fi
# An admin API token, minted inside the volume (the signing key never leaves it).
(umask 077; dc run --rm certs token issue --keys /certs/tls --role admin --ttl 30d --subject compose-admin \
  2>/dev/null >"$certs_host/admin.token") || die "cannot mint the admin token"
grep -q '^ey' "$certs_host/admin.token" || die "the admin token is not a JWT: $(head -c 200 "$certs_host/admin.token")"
export TROUPE_CA=$certs_host/ca.crt TROUPE_CERT=$certs_host/client-admin.crt TROUPE_KEY=$certs_host/client-admin.key
export TROUPE_TOKEN_FILE=$certs_host/admin.token
printf 'export TROUPE_CA=%s TROUPE_CERT=%s TROUPE_KEY=%s TROUPE_TOKEN_FILE=%s\n' "$TROUPE_CA" "$TROUPE_CERT" "$TROUPE_KEY" "$TROUPE_TOKEN_FILE" >"$certs_host/env"

say "starting node1..node3 with mTLS (project $project, network $TROUPE_COMPOSE_NET.0/24)"
dc up -d
for n in 1 2 3; do wait_for "node$n to be healthy" healthy "node$n"; done

api1=127.0.0.1:$TROUPE_COMPOSE_API1
members=()
# By service name: each node resolves the others through the compose network's DNS.
for n in 1 2 3; do members+=("$n=node$n:7701@node$n:7700"); done
init_out=$(IFS=,; troupe cluster init --addr "$api1" --members "${members[*]}")
say "cluster init: $init_out"

has_leader() {
  troupe cluster status --addr "$api1" --json |
    python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["leader"] else 1)'
}
wait_for "a Raft leader" has_leader

if [[ -n ${TROUPE_MODEL_DIR:-} ]]; then model_dir=$TROUPE_MODEL_DIR
else model_dir=$(troupe models fetch "$model" --quiet | tail -n 1); fi
[[ -f $model_dir/model.safetensors ]] || die "$model_dir holds no model.safetensors"

say "pushing $model from $model_dir to node1"
push_json=$(mktemp)
trap 'rm -f "$push_json"' EXIT
push() { troupe models push "$model_dir" --name "$model" --addr "$api1" --quiet --json >"$push_json"; }
# A push right after an election can meet a leader change; retry until the timeout.
wait_for "the model push to node1" push
version=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$push_json")
say "$(python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); print(("pushed" if v["changed"] else "unchanged:"), v["name"], "version", v["version"], v["size_bytes"], "bytes")' "$push_json")"

say "activating $model@$version"
# Exit 1 naming the reason when a node cannot load it; the previous version stays active.
troupe models activate "$model" "$version" --addr "$api1" --wait --json >/dev/null
say "$model@$version is active on every serving node"

embeds() {
  troupe embed --addr "$api1" --model "$model" --timeout-ms 10000 "compose-up check" |
    python3 -c 'import json,sys; v=json.loads(sys.stdin.readline()); sys.exit(0 if len(v) == 384 else 1)'
}
wait_for "an Embed through node1 ($api1)" embeds
say "cluster up: Embed answers on 127.0.0.1:$TROUPE_COMPOSE_API1, :$TROUPE_COMPOSE_API2, :$TROUPE_COMPOSE_API3 (client: $bin)"
troupe cluster status --addr "$api1"
say "host-side clients: $(cat "$certs_host/env")"
