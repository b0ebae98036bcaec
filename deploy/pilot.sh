#!/usr/bin/env bash
# The compose pilot on one host: a SuperLink and three hospitals in containers (compose.yaml).
#
#   deploy/pilot.sh prepare   certificates, CKKS keys and demo records under deploy/pilot/
#                             (never overwritten), then each container's copies of the files
#                             it reads, owned by APP_UID (10001) and mode 0400
#   deploy/pilot.sh up        start the SuperLink, register the three hospitals' keys, start
#                             the hospitals, wait until all three are online
#   deploy/pilot.sh run       a run of ROUNDS (2) rounds with TLS, node authentication, DP
#                             (epsilon 3) and CKKS; waits for it and checks its rounds
#   deploy/pilot.sh down      stop and remove the containers (the volumes, with the ledgers,
#                             are kept; `down -v` deletes them too: only for a throw-away pilot)
#   deploy/pilot.sh logs      the containers' last log lines
#   deploy/pilot.sh all       prepare, up, run, and print the seconds from `up` to the end
#                             of the run
#
# Needs: podman, podman-compose (COMPOSE), the images (deploy/build-images.sh) and Flower's
# `flwr` CLI for registering and submitting (FLWR; the researcher's side, outside the
# containers). Settings: PILOT_DIR (deploy/pilot), SUPERLINK_PORT (9092 on 127.0.0.1),
# PROJECT (the compose project name), ROUNDS (2), RUN_NAME. The certificates, keys and demo
# data are made inside the superlink image, so the host needs no fedpriv install.
set -euo pipefail

DEPLOY="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$DEPLOY")"
PILOT="$(mkdir -p "${PILOT_DIR:-$DEPLOY/pilot}" && cd "${PILOT_DIR:-$DEPLOY/pilot}" && pwd)"
export PILOT_DIR="$PILOT"
PORT="${SUPERLINK_PORT:-9092}"
export SUPERLINK_PORT="$PORT"
APP_UID="${APP_UID:-10001}"
IMAGE_TAG="${IMAGE_TAG:-0.1.0}"
COMPOSE="${COMPOSE:-podman-compose}"
FLWR="${FLWR:-flwr}"
ROUNDS="${ROUNDS:-2}"
RUN_NAME="${RUN_NAME:-pilot-$(date +%Y%m%d-%H%M%S)}"
HOSPITALS=(hospital-1 hospital-2 hospital-3)
KIT_PODMAN_OPTS="${KIT_PODMAN_OPTS:---ulimit nofile=20000:20000 --ulimit nproc=32768:32768}"
read -r -a PODMAN_OPTS <<<"$KIT_PODMAN_OPTS"
if [ -z "${KIT_RUNTIME:-}" ] && command -v runc >/dev/null 2>&1; then KIT_RUNTIME=runc; fi
PODMAN=(podman)
COMPOSE_ARGS=(-f "$DEPLOY/compose.yaml")
# PROJECT: the compose project (containers, network and volumes are named after it)
[ -n "${PROJECT:-}" ] && COMPOSE_ARGS+=(-p "$PROJECT")
if [ -n "${KIT_RUNTIME:-}" ]; then
    PODMAN=(podman --runtime "$KIT_RUNTIME")
    COMPOSE_ARGS=(--podman-args "--runtime $KIT_RUNTIME" "${COMPOSE_ARGS[@]}")
fi
export FLWR_HOME="$PILOT/flwr-home"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

say() { echo "[pilot $(date +%H:%M:%S)] $*"; }
die() { echo "error: $*" >&2; exit 1; }

in_image() {  # run a command in the superlink image as root, with the pilot directory at /pilot
    "${PODMAN[@]}" run --rm -i "${PODMAN_OPTS[@]}" --user 0 --network none --no-healthcheck \
        -v "$PILOT:/pilot" --entrypoint "$1" "fedpriv/superlink:$IMAGE_TAG" "${@:2}"
}

give_to_app() {  # owner APP_UID, directories 0500, files 0400 (rootless podman: in its namespace)
    local chown=(chown)
    [ "$(id -u)" = 0 ] || chown=(podman unshare chown)
    "${chown[@]}" -R "$APP_UID:$APP_UID" "$@"
    find "$@" -type d -exec chmod 0500 {} +
    find "$@" -type f -exec chmod 0400 {} +
}

prepare() {
    mkdir -p "$PILOT"
    if [ ! -e "$PILOT/certs/ca.crt" ]; then
        say "certificates (CA, SuperLink for superlink/localhost/127.0.0.1, three SuperNode keys)"
        in_image fedpriv certs init --out /pilot/certs --host superlink --host localhost \
            --host 127.0.0.1 "${HOSPITALS[@]/#/--hospital=}"
    fi
    if [ ! -e "$PILOT/he/secret.ctx" ]; then
        say "CKKS keys"
        in_image fedpriv keys init --out /pilot/he
    fi
    if [ ! -e "$PILOT/data/${HOSPITALS[0]}/records.csv" ]; then
        say "demo records: scikit-learn's breast-cancer table split across the hospitals"
        in_image python3 - "${HOSPITALS[@]}" <<'EOF'
import csv, os, sys
from sklearn.datasets import load_breast_cancer

data = load_breast_cancer()
sites = sys.argv[1:]
for k, site in enumerate(sites):
    os.makedirs(f"/pilot/data/{site}", exist_ok=True)
    with open(f"/pilot/data/{site}/records.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"f{i}" for i in range(data.data.shape[1])] + ["label"])
        for row, label in zip(data.data[k :: len(sites)], data.target[k :: len(sites)]):
            writer.writerow([*row.tolist(), int(label)])
EOF
    fi
    say "per-container copies owned by $APP_UID (mode 0400) under $PILOT/mounts"
    rm -rf "$PILOT/mounts"
    mkdir -p "$PILOT/mounts/superlink/tls" "$PILOT/mounts/superlink/he"
    cp "$PILOT/certs/ca.crt" "$PILOT/certs/superlink.crt" "$PILOT/certs/superlink.key" \
        "$PILOT/mounts/superlink/tls/"
    cp "$PILOT/he/public.ctx" "$PILOT/mounts/superlink/he/"
    for site in "${HOSPITALS[@]}"; do
        mkdir -p "$PILOT/mounts/$site/keys" "$PILOT/mounts/$site/he" "$PILOT/mounts/$site/data"
        cp "$PILOT/certs/ca.crt" "$PILOT/mounts/$site/keys/ca.crt"
        cp "$PILOT/certs/supernodes/$site" "$PILOT/mounts/$site/keys/supernode.key"
        cp "$PILOT/he/secret.ctx" "$PILOT/mounts/$site/he/"
        cp "$PILOT/data/$site/records.csv" "$PILOT/mounts/$site/data/"
    done
    give_to_app "$PILOT/mounts"
    # the run directories: written by the ServerApp (10001), read by the researcher here
    mkdir -p "$PILOT/runs"
    if [ "$(id -u)" = 0 ]; then chown "$APP_UID:$APP_UID" "$PILOT/runs"; else podman unshare chown "$APP_UID:$APP_UID" "$PILOT/runs"; fi
    chmod 0750 "$PILOT/runs"
}

compose() { "$COMPOSE" "${COMPOSE_ARGS[@]}" "$@"; }

flwr_config() {
    mkdir -p "$FLWR_HOME"
    cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "pilot"

[superlink.pilot]
address = "127.0.0.1:$PORT"
root-certificates = "$PILOT/certs/ca.crt"
EOF
}

wait_port() {
    local deadline=$((SECONDS + $2))
    until python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || die "nothing listens on 127.0.0.1:$1 after $2 s"
        sleep 1
    done
}

online() {
    "$FLWR" supernode list pilot --format json 2>/dev/null | python3 -c \
        "import json,sys; print(sum(str(n.get('status','')).lower()=='online' for n in json.load(sys.stdin).get('nodes',[])))" \
        2>/dev/null || echo 0
}

up() {
    [ -d "$PILOT/mounts" ] || die "run '$0 prepare' first"
    flwr_config
    say "starting the SuperLink"
    compose up -d superlink
    wait_port "$PORT" 120
    for site in "${HOSPITALS[@]}"; do
        # registering again is refused harmlessly: the SuperLink's database keeps the keys
        "$FLWR" supernode register "$PILOT/certs/supernodes/$site.pub" pilot --format json \
            | python3 -c "import json,sys; r=json.load(sys.stdin); print('registered $site:', r.get('node-id', r.get('error-message', r)))"
    done
    say "starting the hospitals"
    compose up -d "${HOSPITALS[@]}"
    local deadline=$((SECONDS + 180))
    until [ "$(online)" -ge "${#HOSPITALS[@]}" ]; do
        [ $SECONDS -lt $deadline ] || { compose logs --tail 20 >&2 || true; die "the hospitals are not online after 180 s"; }
        sleep 2
    done
    say "${#HOSPITALS[@]} hospitals online"
}

run() {
    flwr_config
    say "submitting $RUN_NAME: $ROUNDS rounds, DP (epsilon 3), CKKS, TLS, node authentication"
    local reply run_id status
    reply="$(cd "$ROOT" && "$FLWR" run . pilot --format json --run-config \
        "deployment=true hospitals=${#HOSPITALS[@]} rounds=$ROUNDS epsilon=3.0 he=true keys=\"/he\" out=\"/runs\" run-name=\"$RUN_NAME\"")"
    run_id="$(python3 -c "import json,sys; r=json.loads(sys.argv[1]); assert r.get('success'), r; print(r['run-id'])" "$reply")" \
        || die "flwr run was refused: $reply"
    local deadline=$((SECONDS + ${RUN_TIMEOUT:-900}))
    while :; do
        status="$("$FLWR" ls pilot --run-id "$run_id" --format json 2>/dev/null | python3 -c \
            "import json,sys
try: print(json.load(sys.stdin)['runs'][0]['status'])
except Exception: print('unknown (the SuperLink did not answer)')")"
        case "$status" in finished:*) break ;; esac
        [ $SECONDS -lt $deadline ] || die "run $run_id still '$status' after ${RUN_TIMEOUT:-900} s"
        sleep 2
    done
    [ "$status" = "finished:completed" ] || { compose logs --tail 40 superlink >&2 || true; die "run $run_id ended $status"; }
    local rounds
    rounds="$(python3 -c "import json,sys; print(len(open(sys.argv[1]).read().splitlines()))" "$PILOT/runs/$RUN_NAME/metrics.jsonl")"
    [ "$rounds" = "$ROUNDS" ] || die "the run directory holds $rounds rounds, not $ROUNDS"
    say "run $run_id finished: $ROUNDS rounds in $PILOT/runs/$RUN_NAME"
}

down() { compose down "$@"; }

case "${1:-}" in
    prepare) prepare ;;
    up) up ;;
    run) run ;;
    down) down "${@:2}" ;;
    logs) compose logs --tail "${TAIL:-60}" ;;
    all)
        prepare
        start=$(date +%s.%N)
        up
        run
        python3 -c "import sys, time; print(f'up to the end of {sys.argv[2]} rounds: {time.time() - float(sys.argv[1]):.1f} s')" \
            "$start" "$ROUNDS"
        ;;
    *) die "usage: $0 prepare|up|run|down [-v]|logs|all" ;;
esac
