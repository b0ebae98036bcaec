# The coordinator: Flower's SuperLink with fedpriv installed (the ServerApp runs in the
# SuperExec process the SuperLink starts). Build it with deploy/build-images.sh, which stages
# the build context (fedpriv's source, pip settings, optional wheels) and, where no registry
# is reachable, builds the base image from Debian packages (deploy/README.md, "Building").
#
# BASE_IMAGE: any Debian-like image with python3 (3.11+), python3-venv and useradd.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
# checkov:skip=CKV_DOCKER_7: FROM names the build argument BASE_IMAGE, whose default is a versioned tag

FROM ${BASE_IMAGE} AS build
# TORCH: the PyTorch requirement installed first. The coordinator never trains, so a CPU
# build: build-images.sh stages the CPU wheel under wheels/ (or give pip a CPU index in
# pip/pip.conf); without either, pip would pick a multi-GB CUDA build.
ARG TORCH="torch==2.13.0"
# pip/: pip.conf and the CA bundle the build reaches the package index with (may be empty)
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
# APP_UID: the fixed user and group the server runs as. Its key files are given to this
# UID on the host (mode 0400/0600 kept): see deploy/README.md, "Files, owners and modes".
ARG APP_UID=10001
RUN groupadd --gid "${APP_UID}" app \
 && useradd --uid "${APP_UID}" --gid app --no-create-home --home-dir /state \
        --shell /usr/sbin/nologin app \
 && install -d -o app -g app -m 0700 /state
# (the lines so far are the supernode image's own: the two images share these layers)
COPY --from=build /opt/fedpriv /opt/fedpriv
RUN install -d -o app -g app -m 0700 /runs
# Everything written at run time goes to /state (SuperLink database), /runs (run
# directories) or /tmp: the root filesystem can be mounted read-only.
ENV PATH=/opt/fedpriv/bin:$PATH \
    HOME=/tmp \
    FLWR_HOME=/tmp/flwr \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
USER ${APP_UID}:${APP_UID}
WORKDIR /state
VOLUME ["/state", "/runs"]
# Fleet, Control and Runtime APIs share one HTTPS port in Flower 1.41
EXPOSE 9092
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 9092), 3)"]
ENTRYPOINT ["flower-superlink"]
CMD ["--ssl-ca-certfile", "/certs/ca.crt", \
     "--ssl-certfile", "/certs/superlink.crt", \
     "--ssl-keyfile", "/certs/superlink.key", \
     "--enable-supernode-auth", \
     "--host", "0.0.0.0", "--port", "9092", \
     "--database", "/state/superlink.db", \
     "--disable-runtime-dependency-installation"]
