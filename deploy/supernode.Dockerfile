# A hospital: Flower's SuperNode with fedpriv installed, next to the hospital's data.
# Build from the repository root:
#   docker build -f deploy/supernode.Dockerfile -t fedpriv/supernode:0.1.0 .
# For a CUDA site, replace the CPU index URL with the CUDA one of your driver.
FROM flwr/supernode:1.41.0

USER root
WORKDIR /opt/fedpriv
COPY pyproject.toml README.md ./
COPY fedpriv ./fedpriv
RUN python -m pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
 && python -m pip install --no-cache-dir /opt/fedpriv
USER app

ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1
# /data: the hospital's records (read-only); /state: its privacy ledger (persistent, backed up);
# /keys: its SuperNode key and the CA certificate; /secrets: the CKKS secret context
VOLUME ["/data", "/state"]
EXPOSE 9094
ENTRYPOINT ["flower-supernode"]
