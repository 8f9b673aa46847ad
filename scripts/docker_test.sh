#!/usr/bin/env bash
# make docker-test: the real container check, not part of `make test` or CI (it builds a multi-GB image).
#
# Builds the image from ./Dockerfile, starts it with the inference port published on 127.0.0.1 only, waits
# for the HEALTHCHECK to pass, reads the token from key_file.json inside the container, POSTs a JPEG to
# /predictions/fruit and checks the JSON; checks every process runs as uid 10001, that only 8080 is
# published and that the management API (8081) cannot be reached from outside the container; stops it
# (timed), then does the same with a model store mounted read-only over the baked one. Every wait is bounded;
# the containers are removed on any exit, so the script can be run again as it is.
#
# Settings (environment):
#   CONTAINER_ENGINE  podman (default when installed) or docker
#   IMAGE             tag to build and test (default localhost/fruitserve:test)
#   DOCKER_TEST_NAME  container name (default fruitserve-test; the mounted run adds -mounted)
#   HOST_PORT         host port for the inference API (default 8080, or a free one when 8080 is taken)
#   SKIP_BUILD=1      test an image already built under IMAGE
#   ENGINE_OPTS       extra options for `build` and `run` (default for podman: see podman_opts below)
#   HEALTH_TIMEOUT    seconds to wait for healthy (default 240); BUILD_TIMEOUT (default 3600)
#   WARM_REQUESTS     requests timed after the first one (default 10)
#   SCRATCH           work directory (default /tmp/fruitserve-docker-test): build log, request image, store
set -euo pipefail

cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-localhost/fruitserve:test}
NAME=${DOCKER_TEST_NAME:-fruitserve-test}
SCRATCH=${SCRATCH:-/tmp/fruitserve-docker-test}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-240}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-3600}
CURL=(curl --silent --show-error --max-time 30)
SUMMARY=()

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

# The engine: CONTAINER_ENGINE if set; else the first of podman and docker that answers `info` (a docker client
# without a daemon does not: choosing it would fail later with a misleading message); else, on a Debian machine
# where we are root, podman installed from the distribution's packages (it needs no daemon). Set-up is this
# script's job too, so that also brings what the local base image needs.
HOST_PACKAGES=(podman runc fuse-overlayfs uidmap slirp4netns debootstrap curl)
answers() { command -v "$1" >/dev/null 2>&1 && timeout 60 "$1" info >/dev/null 2>&1; }
if [ -n "${CONTAINER_ENGINE:-}" ]; then
    ENGINE=$CONTAINER_ENGINE
elif answers podman; then
    ENGINE=podman
elif answers docker; then
    ENGINE=docker
else
    ENGINE=podman
    if command -v docker >/dev/null 2>&1; then
        say "docker is installed but no daemon answers (docker info failed): using podman, which needs none"
    fi
fi
if [ "$ENGINE" = podman ] && ! command -v podman >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing ${HOST_PACKAGES[*]} (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${HOST_PACKAGES[@]}"
fi
command -v "$ENGINE" >/dev/null || fail "$ENGINE is not installed (apt-get install ${HOST_PACKAGES[*]})"
answers "$ENGINE" || fail "$ENGINE does not answer '$ENGINE info' (for docker: is the daemon running?)"
say "container engine: $ENGINE"
command -v curl >/dev/null || fail "curl is not installed"
mkdir -p "$SCRATCH"

# Podman on this kind of machine (rootful, cgroup v1/v2 hybrid, no systemd, a sandbox that refuses to raise
# rlimits): crun refuses the hybrid cgroup layout, so use runc when it is installed; podman's default
# nofile/nproc limits (1048576) are above what the sandbox lets a process set, so ask for lower ones.
# `--format docker` keeps the HEALTHCHECK (the OCI image format has no field for it).
podman_opts() {
    local opts=(--ulimit nofile=16384:16384 --ulimit nproc=8192:8192)
    command -v runc >/dev/null && opts+=(--runtime runc)
    echo "${opts[*]}"
}
if [ -z "${ENGINE_OPTS+set}" ]; then
    if [ "$ENGINE" = podman ]; then ENGINE_OPTS=$(podman_opts); else ENGINE_OPTS=; fi
fi
read -r -a OPTS <<<"$ENGINE_OPTS"

containers=("$NAME" "$NAME-mounted")
cleanup() {
    local status=$?
    for c in "${containers[@]}"; do
        "$ENGINE" rm -f -t 5 "$c" >/dev/null 2>&1 || "$ENGINE" rm -f "$c" >/dev/null 2>&1 || true
    done
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
for c in "${containers[@]}"; do "$ENGINE" rm -f "$c" >/dev/null 2>&1 || true; done  # left by an earlier run

# --- the archive baked into the image ---------------------------------------------------------------
if [ ! -f model_store/fruit.mar ]; then
    say "model_store/fruit.mar is missing: packaging one"
    make -s venv
    run=$(ls -1dt runs/*/ 2>/dev/null | while read -r d; do [ -f "$d/model.pt" ] && echo "${d%/}" && break; done || true)
    if [ -z "$run" ]; then
        # no training run here: one epoch on a small synthetic set, enough to serve (not to be accurate)
        rm -rf "$SCRATCH/demo" "$SCRATCH/runs"
        .venv/bin/fruit-train make-demo-data "$SCRATCH/demo" --train-per-class 12 --test-per-class 2
        .venv/bin/fruit-train train --data "$SCRATCH/demo" --epochs 1 --no-progress \
            --output-dir "$SCRATCH/runs" --run-name tiny
        run=$SCRATCH/runs/tiny
    fi
    .venv/bin/fruit-archive "$run"
fi
[ -f model_store/fruit.mar ] || fail "no model_store/fruit.mar"

# --- base image --------------------------------------------------------------------------------------
base=$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile | head -1)
[ -n "$base" ] || fail "no ARG PYTHON_IMAGE in the Dockerfile"
if ! "$ENGINE" image inspect "$base" >/dev/null 2>&1; then
    # No registry here: a local Debian bookworm base with its own Python 3.11 under the FROM name.
    say "base image $base is missing: making a local one (docker/base/make-base.sh)"
    case $base in */*) full=$base ;; *) full=docker.io/library/$base ;; esac
    CONTAINER_ENGINE=$ENGINE nice -n 10 bash docker/base/make-base.sh "$full"
fi

# --- build ---------------------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    build=(build -t "$IMAGE")
    if [ "$ENGINE" = podman ]; then
        build+=(--format docker "${OPTS[@]}")
        # pip inside the build trusts what the host trusts (a TLS-intercepting proxy's CA, for one)
        if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
            build+=(-v /etc/ssl/certs:/run/host-certs:ro --build-arg PIP_CERT=/run/host-certs/ca-certificates.crt)
        fi
    fi
    say "building $IMAGE with $ENGINE (log: $SCRATCH/build.log)"
    start=$(now)
    if ! nice -n 10 timeout "$BUILD_TIMEOUT" "$ENGINE" "${build[@]}" . >"$SCRATCH/build.log" 2>&1; then
        tail -40 "$SCRATCH/build.log"
        fail "build failed (full log: $SCRATCH/build.log)"
    fi
    SUMMARY+=("build: $(since "$start") s")
fi
size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")
SUMMARY+=("image size: $size bytes ($(python3 -c "print(f'{$size / 1e9:.2f}')") GB)")
healthcheck=$("$ENGINE" image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")
case $healthcheck in *fruit-healthcheck*) ;; *) fail "the image has no HEALTHCHECK (podman: build with --format docker)" ;; esac

# --- helpers for a running container -------------------------------------------------------------------
if [ -z "${HOST_PORT:-}" ]; then
    HOST_PORT=$(python3 -c '
import socket
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port)); return s.getsockname()[1]
        except OSError:
            return None
print(free(8080) or free(0))')
fi

running() { [ "$("$ENGINE" inspect --format '{{.State.Running}}' "$1" 2>/dev/null)" = true ]; }

wait_healthy() {  # container; prints seconds from `run` to the first passing HEALTHCHECK
    local container=$1 started=$2 deadline=$(($(date +%s) + HEALTH_TIMEOUT))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        running "$container" || { "$ENGINE" logs "$container" 2>&1 | tail -30; fail "$container exited"; }
        if [ "$ENGINE" = podman ]; then
            # podman runs HEALTHCHECKs from systemd timers; without systemd, run the image's check on demand
            if "$ENGINE" healthcheck run "$container" >/dev/null 2>&1; then since "$started"; return 0; fi
        elif [ "$("$ENGINE" inspect --format '{{.State.Health.Status}}' "$container")" = healthy ]; then
            since "$started"; return 0
        fi
        sleep 1
    done
    "$ENGINE" logs "$container" 2>&1 | tail -30
    fail "$container not healthy within ${HEALTH_TIMEOUT}s"
}

request_image=$SCRATCH/request.jpg
make_request_image() {  # a real Fruits-360 test photo when the data is here, else a JPEG drawn by the image's Pillow
    local photo
    photo=$(find ../shared/data/fruits-360/Test -name '*.jpg' -print -quit 2>/dev/null || true)
    if [ -n "$photo" ]; then
        cp "$photo" "$request_image"
    else
        "$ENGINE" exec "$NAME" python -c '
import io, sys
from PIL import Image, ImageDraw
image = Image.new("RGB", (100, 100), "white")
ImageDraw.Draw(image).ellipse((15, 15, 85, 85), fill=(200, 30, 40))
buffer = io.BytesIO(); image.save(buffer, "JPEG", quality=90); sys.stdout.buffer.write(buffer.getvalue())' >"$request_image"
    fi
    file "$request_image" 2>/dev/null | grep -q JPEG || python3 -c 'import sys; assert open(sys.argv[1], "rb").read(3) == b"\xff\xd8\xff"' "$request_image"
}

check_container() {  # container label
    local container=$1 label=$2 token status answer
    token=$("$ENGINE" exec "$container" python -c \
        'import json; print(json.load(open("/home/model-server/key_file.json"))["inference"]["key"])')
    [ -n "$token" ] || fail "no inference key in key_file.json"

    status=$("${CURL[@]}" -o /dev/null -w '%{http_code}' -T "$request_image" "http://127.0.0.1:$HOST_PORT/predictions/fruit")
    [ "$status" != 200 ] || fail "a request without the token was answered 200"
    echo "without the token: HTTP $status"

    # the first request pays for TorchScript's profiling runs; then WARM_REQUESTS more, one at a time
    local times=()
    for ((i = 0; i <= ${WARM_REQUESTS:-10}; i++)); do
        answer=$("${CURL[@]}" -o "$SCRATCH/answer.json" -w '%{http_code} %{time_total}' \
            -H "Authorization: Bearer $token" -T "$request_image" "http://127.0.0.1:$HOST_PORT/predictions/fruit")
        [ "${answer%% *}" = 200 ] || { cat "$SCRATCH/answer.json"; fail "POST /predictions/fruit: HTTP ${answer%% *}"; }
        times+=("${answer#* }")
    done
    SUMMARY+=("$label: $(python3 -c '
import statistics, sys
first, *warm = (float(t) * 1000 for t in sys.argv[1:])
print(f"first request {first:.0f} ms" + (f", then median {statistics.median(warm):.1f} ms, max {max(warm):.1f} ms over {len(warm)}" if warm else ""))
' "${times[@]}")")
    python3 - "$SCRATCH/answer.json" <<'EOF'
import json, sys
answer = json.load(open(sys.argv[1]))
assert isinstance(answer.get("label"), str) and answer["label"], answer
assert 0.0 <= answer["confidence"] <= 1.0, answer
assert isinstance(answer["top_k"], list) and answer["top_k"] and answer["top_k"][0]["label"] == answer["label"], answer
print(f"prediction: {answer['label']} ({answer['confidence']:.3f}), model_version {answer.get('model_version')}, "
      f"precision {answer.get('precision')}")
EOF

    # every process in the container (tini, the launcher, Java, the worker) as the unprivileged user
    uids=$("$ENGINE" exec "$container" sh -c 'for s in /proc/[0-9]*/status; do awk "/^Uid:/ {print \$2}" "$s"; done 2>/dev/null | sort -u')
    [ "$uids" = 10001 ] || fail "processes run as uid(s) $(echo "$uids" | tr '\n' ' '), not only 10001"
    echo "all processes run as uid 10001"

    # only the inference port is published, and management listens on the container's loopback only:
    # from the host it is unreachable even at the container's own address, where 8080 answers
    ports=$("$ENGINE" port "$container")
    [ "$(echo "$ports" | grep -c .)" = 1 ] && echo "$ports" | grep -q "^8080/tcp -> 127.0.0.1:$HOST_PORT$" \
        || fail "published ports: $ports"
    "$ENGINE" exec "$container" python -c '
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen("http://127.0.0.1:8081/models", timeout=5)
except urllib.error.HTTPError:
    pass  # an HTTP answer (400 without the API key): management is up, on loopback
except OSError as exc:
    sys.exit(f"management API: {exc}")' \
        || fail "management API is not up inside the container"
    ip=$("$ENGINE" inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' "$container" | awk '{print $1}')
    if [ -n "$ip" ] && "${CURL[@]}" --max-time 5 -o /dev/null "http://$ip:8080/ping" 2>/dev/null; then
        if "${CURL[@]}" --max-time 5 -o /dev/null "http://$ip:8081/models" 2>/dev/null; then
            fail "management API answers at $ip:8081 from the host"
        fi
        echo "8081 unreachable at the container address $ip (8080 there answers)"
    else
        echo "container address not reachable from the host: checked the published ports only"
    fi
}

stop_container() {  # container label
    local start code
    start=$(now)
    "$ENGINE" stop -t 30 "$1" >/dev/null 2>&1
    SUMMARY+=("$2: stop $(since "$start") s")
    code=$("$ENGINE" inspect --format '{{.State.ExitCode}}' "$1")
    echo "stopped, exit code $code"
    "$ENGINE" rm -f "$1" >/dev/null 2>&1 || true
}

# --- the image as built: the baked fruit.mar ----------------------------------------------------------------
say "running $IMAGE as $NAME on 127.0.0.1:$HOST_PORT"
start=$(now)
"$ENGINE" run -d --name "$NAME" "${OPTS[@]}" -p "127.0.0.1:$HOST_PORT:8080" "$IMAGE" >"$SCRATCH/run.log" 2>&1 \
    || { cat "$SCRATCH/run.log"; fail "run failed"; }
healthy=$(wait_healthy "$NAME" "$start")
echo "healthy after $healthy s"
SUMMARY+=("baked: start to healthy $healthy s")
make_request_image
check_container "$NAME" baked
stop_container "$NAME" baked

# --- a model store mounted read-only over the baked one -----------------------------------------------------
say "running $IMAGE with a model store mounted over the baked one"
store=$SCRATCH/model-store
rm -rf "$store" && mkdir -p "$store"
cp model_store/fruit.mar "$store/fruit.mar"
chmod 755 "$store" && chmod 644 "$store/fruit.mar"
start=$(now)
"$ENGINE" run -d --name "$NAME-mounted" "${OPTS[@]}" -p "127.0.0.1:$HOST_PORT:8080" \
    -v "$store:/home/model-server/model-store:ro" "$IMAGE" >"$SCRATCH/run.log" 2>&1 \
    || { cat "$SCRATCH/run.log"; fail "run failed"; }
healthy=$(wait_healthy "$NAME-mounted" "$start")
echo "healthy after $healthy s"
SUMMARY+=("mounted: start to healthy $healthy s")
"$ENGINE" exec "$NAME-mounted" grep -q ' /home/model-server/model-store .*\bro\b' /proc/mounts \
    || fail "the model store is not mounted read-only"
check_container "$NAME-mounted" mounted
stop_container "$NAME-mounted" mounted

say "docker-test passed ($ENGINE $("$ENGINE" --version | awk '{print $NF}'), $IMAGE)"
printf '  %s\n' "${SUMMARY[@]}"
