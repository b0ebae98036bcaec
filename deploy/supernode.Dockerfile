# A hospital: Flower's SuperNode with fedpriv installed, next to the hospital's data. Build it
# with deploy/build-images.sh (deploy/README.md, "Building"). The SuperNode only connects
# out to the SuperLink: it publishes no port (its Runtime API listens on 127.0.0.1 inside
# the container, for the ClientApp processes it starts).
#
# BASE_IMAGE: any Debian-like image with python3 (3.11+), python3-venv and useradd.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
# checkov:skip=CKV_DOCKER_7: FROM names the build argument BASE_IMAGE, whose default is a versioned tag

FROM ${BASE_IMAGE} AS build
# TORCH: the PyTorch requirement installed first. build-images.sh stages the CPU wheel under
# wheels/; a site with GPUs passes e.g. --build-arg TORCH=torch==2.13.0 with its CUDA index
# in pip/pip.conf.
ARG TORCH="torch==2.13.0"
COPY pip/ /opt/build/pip/
COPY wheels/ /opt/build/wheels/
# fedpriv's dependencies (requirements.txt: pyproject's, staged by build-images.sh) in a layer
# of their own, so that a change to fedpriv's source rebuilds in seconds
COPY requirements.txt /opt/build/
ENV PIP_CONFIG_FILE=/opt/build/pip/pip.conf \
    PIP_FIND_LINKS=/opt/build/wheels \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/fedpriv \
 && /opt/fedpriv/bin/pip install --no-cache-dir "${TORCH}" \
 && /opt/fedpriv/bin/pip install --no-cache-dir -r /opt/build/requirements.txt
COPY src/ /opt/build/src/
RUN /opt/fedpriv/bin/pip install --no-cache-dir --no-deps /opt/build/src

FROM ${BASE_IMAGE}
# APP_UID: the fixed user and group the SuperNode runs as; the hospital's key files and
# ledger volume belong to it (deploy/README.md, "Files, owners and modes").
ARG APP_UID=10001
RUN groupadd --gid "${APP_UID}" app \
 && useradd --uid "${APP_UID}" --gid app --no-create-home --home-dir /state \
        --shell /usr/sbin/nologin app \
 && install -d -o app -g app -m 0700 /state
COPY --from=build /opt/fedpriv /opt/fedpriv
# starts the site's warm worker beside the SuperNode, then runs flower-supernode with the
# container's arguments (deploy/README.md, "A warm worker from the start")
COPY supernode-entrypoint.sh /usr/local/bin/fedpriv-supernode
ENV PATH=/opt/fedpriv/bin:$PATH \
    HOME=/tmp \
    FLWR_HOME=/tmp/flwr \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1
USER ${APP_UID}:${APP_UID}
WORKDIR /state
# /data: the hospital's records (mount read-only); /state: its privacy ledger and the
# ledger's key (persistent: back it up, never delete it); /keys: its SuperNode key and the
# CA certificate; /secrets: the CKKS secret context (both read-only)
VOLUME ["/state"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 9094), 3)"]
ENTRYPOINT ["fedpriv-supernode"]
