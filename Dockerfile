# syntax=docker/dockerfile:1
# didomi-braze-gateway with PostgreSQL support. The config is not baked in: mount gateway.toml
# (and the mappings folder it names) at /etc/gateway, and pass secrets in the environment.
#   docker build -t didomi-braze-gateway .
#   docker run -v "$PWD/gateway.toml:/etc/gateway/gateway.toml:ro" -v "$PWD/mappings:/etc/gateway/mappings:ro" \
#     -e BRAZE_API_KEY -e DIDOMI_CLIENT_SECRET -e PGPASSWORD -p 8080:8080 didomi-braze-gateway

# Pin by digest in production builds: --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the wheel is built from (see .dockerignore), so an edit to the tests or deploy/
# does not invalidate this layer.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# A venv rather than the system site-packages: the runtime stage copies one self-contained tree
# and leaves the source, pip's build environment and setuptools behind. pip compiles the .pyc
# files here, since the read-only root filesystem at run time cannot take them.
RUN python -m venv /opt/gateway \
    && /opt/gateway/bin/pip install '.[postgresql]'

FROM ${PYTHON_IMAGE}
# No .pyc writes: the root filesystem is read-only in Kubernetes. Unbuffered: every log line
# reaches `docker logs` / `kubectl logs` at once, also the last ones before a SIGKILL.
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A numeric, unprivileged user: Kubernetes' runAsNonRoot can only verify a numeric USER.
# /var/lib/gateway is the one writable place, for a SQLite spool if PostgreSQL is not used.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway \
        --no-create-home --shell /usr/sbin/nologin gateway \
    && install -d -o gateway -g gateway -m 0750 /var/lib/gateway \
    && install -d -m 0755 /etc/gateway
COPY --from=build /opt/gateway /opt/gateway
USER 10001:10001
WORKDIR /var/lib/gateway
# [server] port of gateway.toml; host must be 0.0.0.0 in a container, or nothing outside it connects.
EXPOSE 8080
# Liveness only (/healthz): /readyz is 503 while the spool is full, and an orchestrator that
# restarts "unhealthy" containers (Swarm) would then kill the replica that is waiting for Braze.
# The port is [server] port; change it here if the config does. Kubernetes ignores this and
# uses the probes of deploy/kubernetes/gateway.yaml.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["gateway"]
CMD ["run", "--config", "/etc/gateway/gateway.toml"]
