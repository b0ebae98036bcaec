#!/usr/bin/env bash
# Build the two images of the site kit: fedpriv/superlink and fedpriv/supernode.
#
#   deploy/build-images.sh            build (or reuse) both images with Podman
#   deploy/build-images.sh --force    rebuild even when images of this source exist
#
# Where no container registry is reachable, the base image is built here from Debian's
# packages (debootstrap minbase + python3), so the whole build needs only the Debian mirror
# and the Python package index. Settings (environment):
#   BASE_IMAGE      use this base instead (e.g. docker.io/library/python:3.11-slim-bookworm)
#   DEBIAN_MIRROR   mirror for debootstrap (default http://deb.debian.org/debian)
#   TORCH           the PyTorch requirement (default torch==2.13.0)
#   TORCH_WHEEL     a PyTorch wheel file to install (default: `pip download $TORCH` here,
#                   which finds a CPU wheel where pip is set up with one)
#   IMAGE_TAG       the images' tag (default: fedpriv's version, 0.1.0)
#   APP_UID         the fixed UID/GID the containers run as (default 10001)
#   KIT_REQUIRE=1   fail (exit 1) instead of skipping when no container runtime works
#
# Without a working Podman (or debootstrap, when no BASE_IMAGE is given) it prints
# "SKIP: <reason>" and exits 0, so CI can call it on any machine.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
IMAGE_TAG="${IMAGE_TAG:-0.1.0}"
APP_UID="${APP_UID:-10001}"
TORCH="${TORCH:-torch==2.13.0}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
LOCAL_BASE="localhost/fedpriv-base:bookworm"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

skip() {
    echo "SKIP: $*" >&2
    if [ "${KIT_REQUIRE:-0}" = "1" ]; then exit 1; fi
    exit 0
}

# Options every podman run/build needs on some hosts (see deploy/README.md): explicit
# ulimits (the defaults inherited from a container host may be refused) and runc where
# crun cannot handle the host's cgroups.
KIT_PODMAN_OPTS="${KIT_PODMAN_OPTS:---ulimit nofile=20000:20000 --ulimit nproc=32768:32768}"
if [ -z "${KIT_RUNTIME:-}" ] && command -v runc >/dev/null 2>&1; then KIT_RUNTIME=runc; fi
PODMAN=(podman)
[ -n "${KIT_RUNTIME:-}" ] && PODMAN=(podman --runtime "$KIT_RUNTIME")
read -r -a PODMAN_OPTS <<<"$KIT_PODMAN_OPTS"

command -v podman >/dev/null 2>&1 || skip "podman is not installed (apt-get install podman buildah)"
podman info >/dev/null 2>&1 || skip "podman is installed but does not work here: $(podman info 2>&1 | tail -1)"

work="$(mktemp -d "${TMPDIR:-/var/tmp}/fedpriv-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# ---- the base image ---------------------------------------------------------------------
if [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE="$LOCAL_BASE"
    if ! podman image exists "$LOCAL_BASE"; then
        command -v debootstrap >/dev/null 2>&1 \
            || skip "no BASE_IMAGE given and debootstrap is not installed to build $LOCAL_BASE"
        [ "$(id -u)" = 0 ] || skip "debootstrap needs root to build $LOCAL_BASE (or give BASE_IMAGE)"
        echo "building $LOCAL_BASE from $DEBIAN_MIRROR (debootstrap minbase + python3)"
        start=$(date +%s)
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$work/rootfs" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1 \
            || { tail -20 "$work/debootstrap.log" >&2; echo "error: debootstrap failed" >&2; exit 1; }
        rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
        tar -C "$work/rootfs" --numeric-owner -c . \
            | podman import --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
        rm -rf "$work/rootfs"
        echo "base image built in $(($(date +%s) - start)) s"
    fi
fi

# can a container start at all? (crun refuses hosts with hybrid cgroups; runc works there)
if ! probe=$("${PODMAN[@]}" run --rm "${PODMAN_OPTS[@]}" "$BASE_IMAGE" true 2>&1); then
    hint=""
    case "$probe" in
        *"hybrid mode not supported"*) hint=" (crun cannot use this host's cgroups: apt-get install runc, or set KIT_RUNTIME)" ;;
    esac
    skip "containers do not start here: $(printf '%s' "$probe" | tail -1)$hint"
fi

# ---- the build context: fedpriv's source, pip settings, the PyTorch wheel -----------------
context="$work/context"
mkdir -p "$context/src" "$context/pip" "$context/wheels"
cp "$ROOT/pyproject.toml" "$ROOT/README.md" "$context/src/"
tar -C "$ROOT" --exclude='__pycache__' --exclude='*.pyc' -c fedpriv | tar -C "$context/src" -x
install -m 0755 "$ROOT/deploy/supernode-entrypoint.sh" "$context/supernode-entrypoint.sh"
# pyproject's dependencies, for the image's dependency layer
python3 - "$ROOT/pyproject.toml" >"$context/requirements.txt" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as handle:
    print("\n".join(tomllib.load(handle)["project"]["dependencies"]))
EOF
source_id="$(cd "$context" && find src requirements.txt supernode-entrypoint.sh -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"

# pip inside the build reaches the package index the way this host does: its CA bundle,
# index URL and constraints (a file:// index on this disk cannot be seen from the build)
pip_get() { python3 -m pip config get "$1" 2>/dev/null || true; }
ca="${PIP_CERT:-$(pip_get global.cert)}"
[ -n "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
{
    echo "[global]"
    if [ -f "$ca" ]; then cp "$ca" "$context/pip/ca-bundle.crt"; echo "cert = /opt/build/pip/ca-bundle.crt"; fi
    index="${PIP_INDEX_URL:-$(pip_get global.index-url)}"
    case "$index" in http*) echo "index-url = $index" ;; esac
    constraint="${PIP_CONSTRAINT:-$(pip_get global.constraint)}"
    if [ -n "$constraint" ] && [ -f "$constraint" ]; then
        cp "$constraint" "$context/pip/constraints.txt"; echo "constraint = /opt/build/pip/constraints.txt"
    fi
} >"$context/pip/pip.conf"

if [ -n "${TORCH_WHEEL:-}" ]; then
    cp "$TORCH_WHEEL" "$context/wheels/"
else
    python3 -m pip download -q "$TORCH" --no-deps --only-binary=:all: -d "$context/wheels" \
        || { echo "error: could not get a wheel for $TORCH (set TORCH_WHEEL)" >&2; exit 1; }
fi
wheel="$(ls "$context/wheels")"
case "$wheel" in *+cpu*) ;; *) echo "warning: $wheel is not a CPU build: the images will be large" >&2 ;; esac
TORCH_REQ="$TORCH"
# install the staged wheel itself, whatever local version label it carries
[ -n "$wheel" ] && TORCH_REQ="/opt/build/wheels/$wheel"

# ---- the images ---------------------------------------------------------------------------
for role in superlink supernode; do
    image="fedpriv/$role:$IMAGE_TAG"
    # what the image is built from: the staged source, its Dockerfile and the build arguments
    build_id="$(printf '%s %s %s %s %s' "$source_id" "$(sha256sum <"$ROOT/deploy/$role.Dockerfile")" \
        "$BASE_IMAGE" "$wheel" "$APP_UID" | sha256sum | cut -c1-16)"
    if [ "$FORCE" = 0 ] && podman image exists "$image" \
        && [ "$(podman image inspect --format '{{ index .Labels "org.fedpriv.build" }}' "$image")" = "$build_id" ]; then
        echo "$image is up to date (build $build_id)"
        continue
    fi
    echo "building $image on $BASE_IMAGE"
    start=$(date +%s)
    "${PODMAN[@]}" build --format docker --layers "${PODMAN_OPTS[@]}" \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH=$TORCH_REQ" \
        --build-arg "APP_UID=$APP_UID" \
        --label "org.fedpriv.build=$build_id" --label "org.fedpriv.base=$BASE_IMAGE" \
        -f "$ROOT/deploy/$role.Dockerfile" -t "$image" "$context"
    echo "$image built in $(($(date +%s) - start)) s"
done
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^(localhost/)?fedpriv' || true
