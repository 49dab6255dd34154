# monolith-ps shard image: one parameter-server shard per container.
#
#   docker build -t monolith-ps:0.1.0 .
#   docker run --rm -p 127.0.0.1:50051:50051 -v ps-data:/data monolith-ps:0.1.0 \
#       --host=0.0.0.0 --port=50051 --data_root=/data --shard_index=0 --num_shards=1
#
# Needs BuildKit (the default builder since Docker 23) for RUN --mount.
# Ports: 50051 gRPC (ParameterServer + grpc.health.v1.Health), 9100 Prometheus /metrics.
# Checkpoints: mount a volume at /data; it must be writable by uid 10001.
# See deploy/README.md for compose and Kubernetes. deploy/smoke_image.sh builds this file
# and checks the container (health, uid, a save into a volume, SIGTERM), by hand.

# Any image providing what python:3.11-slim does: python and pip on PATH installing to
# /usr/local, groupadd/useradd (deploy/smoke_image.sh makes such a stand-in locally).
ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: the project's wheel and every locked dependency as wheels -----------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Exact, hash-checked versions from the lock files (scripts/lock.sh refreshes them).
COPY requirements/runtime.txt requirements/build.txt ./requirements/
RUN pip install --require-hashes -r requirements/build.txt \
    && pip wheel --require-hashes --wheel-dir /wheels -r requirements/runtime.txt
# Generated protos are checked in, so no protoc step is needed here.
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY ps_server ./ps_server
COPY ps_client ./ps_client
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# --- runtime: slim Python, the installed wheels, a non-root user -------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PS_HEALTHCHECK_ADDRESS=127.0.0.1:50051
# /data is created owned by the user, so a fresh named volume mounted there inherits it.
RUN groupadd --system --gid 10001 ps \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin ps \
    && mkdir /data \
    && chown 10001:10001 /data
# Install from the builder's wheels only (no index); bind-mounted so they add no layer.
# The lock decides every version; the project itself adds no dependency of its own.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,from=builder,source=/src/requirements,target=/requirements \
    pip install --no-index --find-links=/wheels --require-hashes -r /requirements/runtime.txt \
    && pip install --no-index --find-links=/wheels --no-deps monolith-ps \
    && command -v ps-server > /dev/null \
    && python -c "import ps_server.healthcheck"

# Numeric so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /data
EXPOSE 50051 9100
# The server drains on SIGTERM (health NOT_SERVING, then in-flight calls get
# --grace_seconds); give `docker stop` more than that: `docker stop -t 30`.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "ps_server.healthcheck"]
ENTRYPOINT ["ps-server"]
CMD ["--host=0.0.0.0", "--port=50051", "--data_root=/data"]
