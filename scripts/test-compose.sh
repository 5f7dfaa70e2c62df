#!/usr/bin/env bash
# test-compose.sh -- the docker-compose cluster end to end, as scripts/test.sh runs it:
#   compose-up (static build, image, 3 nodes, init, push, activate, first Embed);
#   an Embed through each node's published port (384 numbers);
#   `restart node2`, wait until it is healthy and serving again, Embed through it;
#   with TROUPE_JEPSEN_BIN: a 30 s troupe-jepsen run on the containers (docker kill, pause,
#   network disconnect; Embed traffic), then every node serving again;
#   the members are service names (node1:7701...), every node sees the others up, and a
#   CLI inside a container reaches node1:7700 by name;
#   `down` (volumes kept), `up` in an order that gives the nodes other IPs: the cluster
#   finds itself by name and resumes from its volumes with nothing re-pushed (leader, the version still active, every node ready, Embeds answer), and
#   compose-up on the resumed cluster changes nothing;
#   `down -v`, and the test's image is removed.
# Without a reachable Docker engine it prints SKIPPED and exits 0.
#
# It runs as its own compose project on its own network and ports, so a developer's cluster
# (project troupe, 10.177.0.0/24, ports 7700-7722) keeps running beside it.
# env: TROUPE_COMPOSE_KEEP=1  leave the test cluster up after a failure, to look at it
#      TROUPE_MODEL_DIR, TROUPE_STATIC_TARGET_DIR, CARGO_TARGET_DIR: as for compose-up.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

if ! docker info >/dev/null 2>&1; then
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  echo "!!! SKIPPED: compose test: no Docker engine (docker info fails) !!!"
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  exit 0
fi

export TROUPE_COMPOSE_PROJECT=troupe-compose-test
export TROUPE_IMAGE=troupe:compose-test
export TROUPE_COMPOSE_NET=10.177.1
export TROUPE_COMPOSE_API1=17700 TROUPE_COMPOSE_API2=17710 TROUPE_COMPOSE_API3=17720
export TROUPE_COMPOSE_METRICS1=17702 TROUPE_COMPOSE_METRICS2=17712 TROUPE_COMPOSE_METRICS3=17722
export TROUPE_COMPOSE_TIMEOUT=${TROUPE_COMPOSE_TIMEOUT:-300}
timeout_s=$TROUPE_COMPOSE_TIMEOUT
model=all-MiniLM-L6-v2
started=$SECONDS

say() { printf '[test-compose %4ss] %s\n' "$((SECONDS - started))" "$*"; }
fail() { printf '[test-compose] FAILED: %s\n' "$*" >&2; exit 1; }

if docker compose version >/dev/null 2>&1; then compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then compose=(docker-compose)
else fail "neither 'docker compose' nor 'docker-compose' is installed"; fi
dc() { "${compose[@]}" -p "$TROUPE_COMPOSE_PROJECT" -f "$repo/docker-compose.yml" "$@"; }

for port in 17700 17702 17710 17712 17720 17722; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    fail "127.0.0.1:$port is in use; the compose test publishes its nodes there"
  fi
done

cleanup() {
  local rc=$?
  if ((rc != 0)); then
    echo "---- compose test failed (rc $rc): container state and last logs" >&2
    dc ps >&2 || true
    dc logs --tail 40 >&2 || true
    if [[ ${TROUPE_COMPOSE_KEEP:-0} == 1 ]]; then
      echo "TROUPE_COMPOSE_KEEP=1: leaving project $TROUPE_COMPOSE_PROJECT up; remove it with" >&2
      echo "  ${compose[*]} -p $TROUPE_COMPOSE_PROJECT down -v && docker image rm $TROUPE_IMAGE" >&2
      exit "$rc"
    fi
  fi
  dc down -v --remove-orphans >/dev/null 2>&1 || true
  # The image is the test's own tag: rebuilt from the cached static binary in seconds,
  # so nothing of the test stays in the engine. troupe:local (compose-up's default) is
  # never touched.
  docker image rm "$TROUPE_IMAGE" >/dev/null 2>&1 || true
  exit "$rc"
}
trap cleanup EXIT

# Leftovers of an interrupted run would make the first phase a resume.
dc down -v --remove-orphans >/dev/null 2>&1 || true

# Polls `"$@"` every half second until it succeeds; fails naming WHAT after the timeout.
wait_for() {
  local what=$1; shift
  local deadline=$((SECONDS + timeout_s))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "last attempt at '$what':" >&2
      "$@" >&2 || true
      fail "timed out after ${timeout_s}s waiting for $what"
    fi
    sleep 0.5
  done
}

say "compose-up (build, start, init, push, activate, first Embed)"
bash scripts/compose-up.sh
up_s=$((SECONDS - started))

if [[ -n ${TROUPE_STATIC_TARGET_DIR:-} ]]; then static_target=$TROUPE_STATIC_TARGET_DIR
elif [[ -n ${CARGO_TARGET_DIR:-} ]]; then static_target=$(dirname "$CARGO_TARGET_DIR")/static-target
else static_target=$repo/target/static; fi
host_triple=$(rustc -vV | sed -n 's/^host: //p')
bin=$static_target/$host_triple/release/troupe
[[ -x $bin ]] || fail "compose-up left no client binary at $bin"
troupe() { "$bin" "$@"; }
api() { local v="TROUPE_COMPOSE_API$1"; echo "127.0.0.1:${!v}"; }
# The cluster runs mTLS: host-side calls use the admin certificate compose-up copied out.
# shellcheck disable=SC1090
source "$static_target/compose-certs/$TROUPE_COMPOSE_PROJECT/env"
[[ -f $TROUPE_CA ]] || fail "compose-up left no CA for host clients at $TROUPE_CA"
plain=$(env -u TROUPE_CA -u TROUPE_CERT -u TROUPE_KEY "$bin" cluster status --addr "$(api 1)" 2>&1) && fail "a plaintext client was served: $plain"
grep -q UNAUTHENTICATED <<<"$plain" || fail "a plaintext client was not told to use TLS: $plain"
# TLS without a credential is refused; the minted admin token alone is enough.
anon=$(env -u TROUPE_CERT -u TROUPE_KEY -u TROUPE_TOKEN_FILE "$bin" cluster status --addr "$(api 1)" 2>&1) && fail "a client without a credential was served: $anon"
grep -q UNAUTHENTICATED <<<"$anon" || fail "a client without a credential was not told why: $anon"
env -u TROUPE_CERT -u TROUPE_KEY "$bin" cluster status --addr "$(api 1)" >/dev/null || fail "the admin token from compose-up was refused"
say "API: no credential is UNAUTHENTICATED, the admin token is let in"

# One Embed through node N's published port must give one vector of 384 finite numbers.
embed_384() {
  troupe embed --addr "$(api "$1")" --model "$model" --timeout-ms 20000 "embedded through node $1" |
    python3 -c '
import json, math, sys
lines = sys.stdin.read().splitlines()
assert len(lines) == 1, f"{len(lines)} lines"
v = json.loads(lines[0])
assert len(v) == 384 and all(math.isfinite(x) for x in v), f"{len(v)} values"
norm = math.sqrt(sum(x * x for x in v))
assert abs(norm - 1) < 1e-3, f"norm {norm}"'
}
check_embeds() {
  local n
  for n in 1 2 3; do
    embed_384 "$n" || fail "Embed through node $n ($(api "$n")) did not give a 384-dim unit vector"
  done
  say "Embed through each node's port: 384-dim unit vectors"
}

# Node N's container passes its healthcheck (troupe answers on its API port).
healthy() {
  local id
  id=$(dc ps -q "node$1")
  [[ -n $id && $(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id") == healthy ]]
}
# Node N serves inference (its actor tree has a loaded, warm model and Raft has a leader).
serving() {
  troupe cluster actors --addr "$(api "$1")" --json |
    python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["serving"] else 1)'
}
has_leader() {
  troupe cluster status --addr "$(api 1)" --json |
    python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["leader"] else 1)'
}
# The active version of the model, as node 1 lists it (linearizable).
active_version() {
  troupe models list --addr "$(api 1)" --json |
    python3 -c 'import json,sys; m=[v for v in json.load(sys.stdin) if v["name"]==sys.argv[1] and v["state"]=="active"]; print(m[0]["version"] if len(m)==1 else ""); sys.exit(0 if len(m)==1 else 1)' "$model"
}
# Every node reports the version ready through Raft.
ready_everywhere() {
  troupe models list --addr "$(api 1)" --json |
    python3 -c 'import json,sys; m=[v for v in json.load(sys.stdin) if v["name"]==sys.argv[1] and v["version"]==sys.argv[2]][0]; r={n["node_id"] for n in m["nodes"] if n["state"]=="ready"}; sys.exit(0 if r=={1,2,3} else 1)' "$model" "$1"
}

# The members are service names, and each node reaches the others by them. Asked inside
# node1's container, where the names resolve (cluster status dials every member's API).
names_and_peers_up() {
  dc exec -T node1 /troupe cluster status --addr 127.0.0.1:7700 --json | python3 -c '
import json, sys
status = json.load(sys.stdin)
nodes = {n["id"]: n for n in status["nodes"]}
assert set(nodes) == {1, 2, 3}, nodes.keys()
for id, node in nodes.items():
    assert node["peer_addr"] == f"node{id}:7701", node["peer_addr"]
    assert node["api_addr"] == f"node{id}:7700", node["api_addr"]
    states = {p["node_id"]: p["state"] for p in node["peers"]}
    assert all(states.get(o) == "up" for o in nodes if o != id), (id, states)'
}
# Node N's address on the compose network.
ip_of() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$(dc ps -q "node$1")"; }

check_embeds
version=$(active_version) || fail "no single active version of $model after compose-up"
say "active: $model@$version"
wait_for "members named node1..node3, each seeing the others up" names_and_peers_up
# A name resolved inside the image (static glibc, no NSS modules): node2's CLI reaches node1.
dc exec -T node2 /troupe embed --addr node1:7700 --model "$model" --timeout-ms 20000 "by name" |
  python3 -c 'import json,sys; sys.exit(0 if len(json.loads(sys.stdin.readline())) == 384 else 1)' ||
  fail "node2 could not embed through node1:7700 by name"
say "members by service name; peers up; node2 embeds through node1:7700 by name"

say "restart node2"
before=$(docker inspect -f '{{.State.StartedAt}}' "$(dc ps -q node2)")
dc restart node2
after=$(docker inspect -f '{{.State.StartedAt}}' "$(dc ps -q node2)")
[[ $before != "$after" ]] || fail "node2 was not restarted (StartedAt $before)"
wait_for "node2 healthy after its restart" healthy 2
wait_for "node2 serving after its restart" serving 2
embed_384 2 || fail "Embed through node2 after its restart"
say "node2 is back: healthy, serving, Embed answers through it"

# The fault tier on the containers: docker kill, docker pause and docker network disconnect
# on a seeded schedule, register clients checked for linearizability and lost writes, and
# Embed traffic beside them. scripts/test.sh passes the runner; scripts/faults.sh --compose
# runs long ones.
if [[ -n ${TROUPE_JEPSEN_BIN:-} ]]; then
  secs=${TROUPE_COMPOSE_JEPSEN_SECS:-30}
  say "fault tier: troupe-jepsen --cluster compose for ${secs}s, with Embed traffic"
  "$TROUPE_JEPSEN_BIN" --cluster compose --project "$TROUPE_COMPOSE_PROJECT" \
    --addrs "$(api 1),$(api 2),$(api 3)" --time "$secs" --embed-model "$model" ||
    fail "troupe-jepsen on the compose cluster (its seed and schedule are printed above)"
  for n in 1 2 3; do wait_for "node$n serving after the faults" serving "$n"; done
  check_embeds
fi

say "down (volumes kept), then up in the reverse order of the IPs, so the nodes' IPs change"
declare -A ip_before
for n in 1 2 3; do ip_before[$n]=$(ip_of "$n"); done
order=$(for n in 1 2 3; do echo "${ip_before[$n]} $n"; done | sort -t . -k 4,4nr | awk '{print $2}')
dc down
[[ -z $(dc ps -q) ]] || fail "containers left after down"
for n in $order; do dc up -d --no-deps "node$n"; done
moved=""
for n in 1 2 3; do
  ip=$(ip_of "$n")
  [[ $ip != "${ip_before[$n]}" ]] && moved+=" node$n ${ip_before[$n]}->$ip"
done
[[ -n $moved ]] || fail "no node's IP changed on up (before: ${ip_before[*]}); the name test proves nothing"
say "new IPs:$moved"
for n in 1 2 3; do wait_for "node$n healthy after up" healthy "$n"; done
wait_for "a Raft leader after up" has_leader
wait_for "peers up by name after the IPs changed" names_and_peers_up
resumed=$(active_version) || fail "after down/up no version of $model is active: the state did not resume"
[[ $resumed == "$version" ]] || fail "after down/up $model@$resumed is active, expected $version"
wait_for "every node ready with $model@$version after up" ready_everywhere "$version"
for n in 1 2 3; do wait_for "node$n serving after up" serving "$n"; done
check_embeds
say "resumed from the volumes: $model@$version active and ready on nodes 1-3, nothing pushed"

say "compose-up again on the running cluster (must change nothing)"
out=$(TROUPE_COMPOSE_BUILD=0 bash scripts/compose-up.sh 2>&1) || { echo "$out" >&2; fail "compose-up on a running cluster"; }
grep -q 'cluster init: already initialized' <<<"$out" || { echo "$out" >&2; fail "second compose-up initialised the cluster again"; }
grep -q "unchanged: $model version $version" <<<"$out" || { echo "$out" >&2; fail "second compose-up pushed changed files"; }
[[ $(active_version) == "$version" ]] || fail "second compose-up changed the active version"
check_embeds

say "passed (compose-up ${up_s}s, whole test $((SECONDS - started))s); removing the test project, its volumes and image"
