# The coordinator: Flower's SuperLink with fedpriv installed (its ServerApp runs in the
# SuperExec the SuperLink starts). Build from the repository root:
#   docker build -f deploy/superlink.Dockerfile -t fedpriv/superlink:0.1.0 .
FROM flwr/superlink:1.41.0

USER root
WORKDIR /opt/fedpriv
COPY pyproject.toml README.md ./
COPY fedpriv ./fedpriv
# CPU PyTorch first (the coordinator never trains), then fedpriv itself
RUN python -m pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
 && python -m pip install --no-cache-dir /opt/fedpriv
USER app

ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1
# Fleet, Control and Runtime APIs share one HTTPS port in Flower 1.41
EXPOSE 9092
ENTRYPOINT ["flower-superlink"]
CMD ["--ssl-ca-certfile", "/certs/ca.crt", \
     "--ssl-certfile", "/certs/superlink.crt", \
     "--ssl-keyfile", "/certs/superlink.key", \
     "--enable-supernode-auth", \
     "--host", "0.0.0.0", "--port", "9092", \
     "--database", "/state/superlink.db", \
     "--disable-runtime-dependency-installation"]
