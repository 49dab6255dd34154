#!/usr/bin/env bash
# Build the repository's Dockerfile and check the container really works.
#
#   sudo deploy/smoke_image.sh            # from anywhere; run by hand, not in CI
#
# Checks, one PASS/FAIL line each (exit status 1 if any fails):
#   healthy   the image's HEALTHCHECK turns the container healthy (docker inspect)
#   uid       the server (PID 1) runs as uid 10001
#   save      `ps-admin save` (docker exec) writes a checkpoint into a fresh named volume
#             mounted at /data, and the files are still in the volume after the container
#   sigterm   `docker stop -t 30` (SIGTERM) drains: the server logs its shutdown and
#             the container exits with code 0 before the timeout
#   reflect   gRPC server reflection lists the services under v1 and v1alpha
#
# Engine: uses the running Docker engine; if none answers, starts
# `dockerd --storage-driver=vfs` (needs root) and stops it again on exit. BuildKit is
# needed (RUN --mount): `docker buildx build --load` when buildx is installed, else a
# Docker client older than 23, whose `docker build` has BuildKit built in
# (DOCKER_BUILDKIT=1), e.g. Debian bookworm's docker.io at /usr/bin/docker.
#
# Base image: with no registry at hand, PYTHON_IMAGE defaults to a local stand-in for
# python:3.11-slim, made once and then reused: a debootstrapped Debian bookworm
# (python3 is 3.11 there) with a venv at /usr/local, so `python` and `pip` are on PATH
# and pip installs to /usr/local as in the official image. Needs debootstrap and root.
# With a registry: PYTHON_IMAGE=python:3.11-slim deploy/smoke_image.sh
#
# Environment (all optional):
#   PYTHON_IMAGE    base image for both stages (default: the local base below)
#   BASE_TAG        tag of the local base image (default monolith-ps-base:bookworm-py311)
#   REBUILD_BASE=1  make the local base again even if it exists
#   DEBIAN_MIRROR   for debootstrap (default http://deb.debian.org/debian)
#   IMAGE           tag of the built image (default monolith-ps:smoke)
#   BUILD_NETWORK   docker build --network (default: host if a container on the default
#                   network cannot reach PyPI, else the default network)
#   DOCKER          docker client to use (default: see "Engine" above)
#   DOCKERD_FLAGS   flags for a dockerd this script starts (default --storage-driver=vfs)
#   HEALTH_TIMEOUT  seconds to wait for "healthy" (default 120)
#   KEEP_IMAGE=0    remove the built image on exit (default: keep it)
#   BUILD_FLAGS     more docker build flags, e.g. --no-cache to time a cold build

set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_TAG=${BASE_TAG:-monolith-ps-base:bookworm-py311}
PYTHON_IMAGE=${PYTHON_IMAGE:-$BASE_TAG}
IMAGE=${IMAGE:-monolith-ps:smoke}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKERD_FLAGS=${DOCKERD_FLAGS:---storage-driver=vfs}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-120}
KEEP_IMAGE=${KEEP_IMAGE:-1}
UID_EXPECTED=10001
RUN_ID="ps-smoke-$$"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ps-smoke.XXXXXX")
DOCKERD_PID=""
CONTAINER=""
VOLUME=""
FAILURES=0
T_START=$(date +%s)

say() { printf '[smoke] %s\n' "$*"; }
die() { printf '[smoke] ERROR: %s\n' "$*" >&2; exit 2; }
pass() { printf 'PASS %-8s %s\n' "$1" "$2"; }
fail() { printf 'FAIL %-8s %s\n' "$1" "$2"; FAILURES=$((FAILURES + 1)); }
now() { date +%s; }

cleanup() {
    local rc=$?
    if [[ -n $CONTAINER ]]; then "${DOCKER[@]}" rm -f "$CONTAINER" > /dev/null 2>&1; fi
    if [[ -n $VOLUME ]]; then "${DOCKER[@]}" volume rm -f "$VOLUME" > /dev/null 2>&1; fi
    if [[ $KEEP_IMAGE == 0 ]]; then "${DOCKER[@]}" rmi -f "$IMAGE" > /dev/null 2>&1; fi
    if [[ -n $DOCKERD_PID ]]; then
        say "stopping the dockerd this script started (pid $DOCKERD_PID)"
        kill -TERM "$DOCKERD_PID" 2> /dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2> /dev/null || break; sleep 0.5; done
        if kill -0 "$DOCKERD_PID" 2> /dev/null; then
            say "dockerd did not stop within 30 s; killing it"
            kill -KILL "$DOCKERD_PID" 2> /dev/null
        fi
        wait "$DOCKERD_PID" 2> /dev/null
    fi
    if ((rc == 0)); then rm -rf "$WORK"; else say "logs kept in $WORK"; fi
    say "total $(($(now) - T_START)) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ docker client
# A client that can build with BuildKit: buildx if present, else a pre-23 client.
pick_client() {
    local candidates=()
    if [[ -n ${DOCKER:-} ]]; then candidates=("$DOCKER"); else
        candidates=(docker /usr/bin/docker /usr/local/bin/docker); fi
    local c major
    for c in "${candidates[@]}"; do
        command -v "$c" > /dev/null 2>&1 || continue
        if "$c" buildx version > /dev/null 2>&1; then
            DOCKER=("$c"); BUILD=("$c" buildx build --load); return 0
        fi
        major=$("$c" version --format '{{.Client.Version}}' 2> /dev/null | cut -d. -f1)
        if [[ $major =~ ^[0-9]+$ ]] && ((major < 23)); then
            DOCKER=("$c"); BUILD=(env DOCKER_BUILDKIT=1 "$c" build); return 0
        fi
    done
    die "no docker client that builds with BuildKit: install buildx, or Debian's docker.io"
}
pick_client
say "client: ${DOCKER[*]} (build: ${BUILD[*]})"

# ------------------------------------------------------------------ engine
if "${DOCKER[@]}" info > /dev/null 2>&1; then
    say "using the running Docker engine"
else
    command -v dockerd > /dev/null || die "no Docker engine answers and dockerd is not installed (apt-get install docker.io)"
    [[ $(id -u) == 0 ]] || die "no Docker engine answers; starting dockerd needs root"
    say "no engine answers: starting dockerd $DOCKERD_FLAGS (log: $WORK/dockerd.log)"
    # shellcheck disable=SC2086  # DOCKERD_FLAGS is a list of flags
    dockerd $DOCKERD_FLAGS --pidfile="$WORK/dockerd.pid" > "$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do
        "${DOCKER[@]}" info > /dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2> /dev/null || { tail -20 "$WORK/dockerd.log"; DOCKERD_PID=""; die "dockerd exited"; }
        sleep 1
    done
    "${DOCKER[@]}" info > /dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; die "dockerd did not answer within 60 s"; }
fi
say "engine: $("${DOCKER[@]}" version --format 'Docker {{.Server.Version}}' 2> /dev/null), storage $("${DOCKER[@]}" info --format '{{.Driver}}' 2> /dev/null)"

# ------------------------------------------------------------------ local base image
# A stand-in for python:3.11-slim: what the Dockerfile expects of it is `python` and
# `pip` on PATH installing into /usr/local, groupadd/useradd, and CA certificates.
make_base() {
    command -v debootstrap > /dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    [[ $(id -u) == 0 ]] || die "making the base image with debootstrap needs root"
    local root="$WORK/rootfs" t0
    t0=$(now)
    say "making $BASE_TAG: debootstrap bookworm from $DEBIAN_MIRROR (log: $WORK/debootstrap.log)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "$DEBIAN_MIRROR" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
    # Extra CAs this host trusts (e.g. a TLS-intercepting egress proxy) are trusted in
    # the base too, so pip inside the build reaches PyPI through the same network.
    local extra=(/usr/local/share/ca-certificates/*.crt)
    if [[ -e ${extra[0]} ]]; then
        say "base trusts this host's extra CAs: ${extra[*]}"
        cp "${extra[@]}" "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >> "$WORK/debootstrap.log" 2>&1
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$root/etc/pip.conf"
    fi
    # Debian marks its python3 externally managed; a venv at /usr/local gives `python`
    # and `pip` in /usr/local/bin, installing to /usr/local like the official image.
    chroot "$root" /usr/bin/python3 -m venv /usr/local || die "python3 -m venv /usr/local failed"
    chroot "$root" /usr/local/bin/pip --version > /dev/null || die "pip does not run in the base"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" --numeric-owner -c . | "${DOCKER[@]}" import \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$BASE_TAG" > /dev/null || die "docker import failed"
    rm -rf "$root"
    say "made $BASE_TAG in $(($(now) - t0)) s"
}
if [[ $PYTHON_IMAGE == "$BASE_TAG" ]]; then
    if [[ ${REBUILD_BASE:-0} == 1 ]] || ! "${DOCKER[@]}" image inspect "$BASE_TAG" > /dev/null 2>&1; then
        make_base
    else
        say "reusing $BASE_TAG (REBUILD_BASE=1 makes it again)"
    fi
    # One container (each costs a full copy of the image on vfs): what the Dockerfile
    # needs of the base, and whether the default network reaches PyPI.
    probe=$("${DOCKER[@]}" run --rm "$BASE_TAG" sh -c '
        python --version && pip --version && command -v useradd groupadd && echo tools-ok
        python -c "import urllib.request as u; u.urlopen(\"https://pypi.org/simple/pip/\", timeout=20)" \
            && echo pypi-ok' 2>&1)
    [[ $probe == *tools-ok* ]] || { echo "$probe"; die "$BASE_TAG lacks python, pip, useradd or groupadd"; }
    if [[ -z ${BUILD_NETWORK:-} && $probe != *pypi-ok* ]]; then
        say "a container on the default network cannot reach PyPI: building with --network=host"
        BUILD_NETWORK=host
    fi
fi

# ------------------------------------------------------------------ build
BUILD_NETWORK=${BUILD_NETWORK:-default}
say "building $IMAGE from $REPO/Dockerfile (PYTHON_IMAGE=$PYTHON_IMAGE, network $BUILD_NETWORK; log: $WORK/build.log)"
t0=$(now)
# shellcheck disable=SC2086  # BUILD_FLAGS is a list of flags
if ! "${BUILD[@]}" ${BUILD_FLAGS:-} --network="$BUILD_NETWORK" --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" \
    -t "$IMAGE" "$REPO" > "$WORK/build.log" 2>&1; then
    tail -40 "$WORK/build.log"
    fail build "docker build failed (PYTHON_IMAGE=$PYTHON_IMAGE)"
    exit 1
fi
pass build "$IMAGE built in $(($(now) - t0)) s"

# ------------------------------------------------------------------ run
VOLUME="$RUN_ID-data"
CONTAINER="$RUN_ID"
"${DOCKER[@]}" volume create "$VOLUME" > /dev/null || die "cannot create volume $VOLUME"
"${DOCKER[@]}" run -d --name "$CONTAINER" -v "$VOLUME:/data" "$IMAGE" \
    --host=0.0.0.0 --port=50051 --data_root=/data --shard_index=0 --num_shards=1 \
    > /dev/null || die "docker run failed"
t0=$(now)

# (a) healthy through the image's own HEALTHCHECK
status=""
while (($(now) - t0 < HEALTH_TIMEOUT)); do
    status=$("${DOCKER[@]}" inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$CONTAINER" 2> /dev/null)
    running=$("${DOCKER[@]}" inspect -f '{{.State.Running}}' "$CONTAINER" 2> /dev/null)
    [[ $status == healthy || $status == none || $running != true ]] && break
    sleep 2
done
if [[ $status == healthy ]]; then
    pass healthy "HEALTHCHECK reports healthy after $(($(now) - t0)) s"
else
    fail healthy "health status '$status' after $(($(now) - t0)) s (running: $running)"
    "${DOCKER[@]}" inspect -f '{{json .State.Health}}' "$CONTAINER" 2> /dev/null | head -c 2000; echo
    "${DOCKER[@]}" logs --tail 30 "$CONTAINER" 2>&1
fi

# (b) the server process runs as uid 10001
uids=$("${DOCKER[@]}" exec "$CONTAINER" sh -c 'grep "^Uid:" /proc/1/status' 2> /dev/null | awk '{print $2, $3, $4, $5}')
if [[ $uids == "$UID_EXPECTED $UID_EXPECTED $UID_EXPECTED $UID_EXPECTED" ]]; then
    pass uid "PID 1 ($("${DOCKER[@]}" exec "$CONTAINER" cat /proc/1/comm 2> /dev/null)) runs as uid $UID_EXPECTED (real, effective, saved, fs)"
else
    fail uid "PID 1 uids are '$uids', expected $UID_EXPECTED"
fi

# (e) server reflection answers under v1 (what grpcurl asks first) and v1alpha
reflected=$("${DOCKER[@]}" exec "$CONTAINER" python -c '
import grpc
from grpc_reflection.v1alpha import reflection_pb2 as r
with grpc.insecure_channel("127.0.0.1:50051") as ch:
    for v in ("v1", "v1alpha"):
        call = ch.stream_stream(f"/grpc.reflection.{v}.ServerReflection/ServerReflectionInfo",
                                request_serializer=r.ServerReflectionRequest.SerializeToString,
                                response_deserializer=r.ServerReflectionResponse.FromString)
        (resp,) = call(iter([r.ServerReflectionRequest(list_services="")]), timeout=10)
        print(v, *sorted(s.name for s in resp.list_services_response.service))
' 2>&1)
want=(monolith_ps.ParameterServer monolith_ps.ParameterServerAdmin grpc.health.v1.Health)
reflect_ok=1
for v in v1 v1alpha; do
    line=$(grep "^$v " <<< "$reflected")
    for name in "${want[@]}"; do [[ " $line " == *" $name "* ]] || reflect_ok=0; done
done
if ((reflect_ok)); then
    pass reflect "v1 and v1alpha both list ${want[*]}"
else
    fail reflect "reflection answered: $reflected"
fi

# (c) ps-admin save into the fresh named volume, with one table to save
save_ok=1
"${DOCKER[@]}" exec "$CONTAINER" python -c '
from ps_client import PsClient
from ps_server.engine import configs
with PsClient(["127.0.0.1:50051"], timeout=30) as c:
    c.create_table(configs.table_config(4), name="smoke")
' > "$WORK/table.log" 2>&1 || { save_ok=0; cat "$WORK/table.log"; }
"${DOCKER[@]}" exec "$CONTAINER" ps-admin --addresses=127.0.0.1:50051 \
    save --model_dir=/data/model --global_step=1 > "$WORK/save.log" 2>&1 \
    || { save_ok=0; cat "$WORK/save.log"; }

# (d) SIGTERM drains; exit code 0 within docker stop's 30 s
t1=$(now)
"${DOCKER[@]}" stop -t 30 "$CONTAINER" > /dev/null
stop_s=$(($(now) - t1))
exit_code=$("${DOCKER[@]}" inspect -f '{{.State.ExitCode}}' "$CONTAINER")
logs=$("${DOCKER[@]}" logs "$CONTAINER" 2>&1)
if [[ $exit_code == 0 ]] && grep -q 'shutting down: health NOT_SERVING' <<< "$logs" \
    && grep -q 'stopped' <<< "$logs"; then
    pass sigterm "docker stop -t 30: drained and exited 0 in $stop_s s"
else
    fail sigterm "exit code $exit_code after $stop_s s; last log lines:"
    tail -10 <<< "$logs"
fi

# (c, continued) the checkpoint is in the volume, seen from a new container
files=$("${DOCKER[@]}" run --rm -v "$VOLUME:/data:ro" --entrypoint sh "$IMAGE" \
    -c 'cd /data/model && find . -type f | sort' 2> /dev/null)
missing=()
for want in ./checkpoint ./model.ckpt-1.assets/manifest.json; do
    grep -qxF "$want" <<< "$files" || missing+=("$want")
done
grep -q '^\./model\.ckpt-1\.assets/smoke_0-' <<< "$files" || missing+=("./model.ckpt-1.assets/smoke_0-*")
if ((save_ok)) && ((${#missing[@]} == 0)); then
    pass save "ps-admin save wrote $(wc -l <<< "$files") files to volume $VOLUME: $(tr '\n' ' ' <<< "$files")"
else
    fail save "missing in volume $VOLUME: ${missing[*]:-} (found: $(tr '\n' ' ' <<< "$files"))"
fi

if ((FAILURES)); then
    say "$FAILURES check(s) FAILED"
    exit 1
fi
say "all checks passed"
