# Roundtable's one image: the session, agent, monitor and simulator services (pick with the command:
# roundtable-session, roundtable-agents, roundtable-monitor, roundtable-simulator).
# Build: docker build -t roundtable:0.1.0 .   The Kubernetes manifests (deploy/k8s) run it as UID 10001
# with a read-only root filesystem. Pin the base image by digest in your registry for reproducible builds.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtualenv holding the project and its pinned dependencies (wheels only, no compiler)
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ONLY_BINARY=:all:
RUN python -m venv /opt/roundtable
WORKDIR /src
COPY pyproject.toml ./
COPY services ./services
COPY clients/python ./clients/python
# setuptools builds the project and the client SDK the `roundtable` CLI is built on (pure-Python wheels);
# every dependency comes as a wheel.
RUN /opt/roundtable/bin/pip install --no-binary=roundtable,roundtable-client ./clients/python . \
    && /opt/roundtable/bin/pip uninstall --yes pip setuptools

# --- run: the interpreter, the virtualenv, an unprivileged user; no pip, no compiler
FROM ${PYTHON_IMAGE} AS run
ENV PATH=/opt/roundtable/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
    && groupadd --system --gid 10001 roundtable \
    && useradd --system --uid 10001 --gid roundtable --home-dir /app --shell /usr/sbin/nologin roundtable \
    && mkdir -p /app/var /app/logs \
    && chown -R roundtable:roundtable /app
COPY --from=build /opt/roundtable /opt/roundtable
WORKDIR /app
USER 10001:10001
# gRPC: session 50051, agents 50052, monitor 50053; Prometheus: 9101-9103; simulator (HTTP) 50060.
EXPOSE 50051 50052 50053 9101 9102 9103 50060
# SIGTERM: health NOT_SERVING, drain for --shutdown-grace-seconds, then stop (the console scripts handle it).
CMD ["roundtable-session"]
