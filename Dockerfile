# syntax=docker/dockerfile:1
# Multi-stage: build the virtualenv from the runtime lock (the pins of the `make` lock,
# without the test toolchain: no pytest, moto, mypy, SeaweedFS...), run as non-root.
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN python -m venv /opt/venv
COPY requirements-runtime.lock pyproject.toml README.md ./
RUN /opt/venv/bin/pip install --require-hashes -r requirements-runtime.lock
COPY core ./core
COPY worker ./worker
COPY tasks ./tasks
COPY storage_backends ./storage_backends
COPY db ./db
COPY api ./api
RUN /opt/venv/bin/pip install --no-deps .

FROM python:3.11-slim-bookworm AS runtime
RUN groupadd --system --gid 10001 ocore \
    && useradd --system --uid 10001 --gid ocore --home-dir /var/lib/ocore --create-home ocore
COPY --from=build /opt/venv /opt/venv
# PROMETHEUS_MULTIPROC_DIR is not set here: only the worker needs it (docker-compose.yml);
# `ocore-storage worker` creates and empties it at every start.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OCORE_DATA_DIR=/var/lib/ocore
USER 10001:10001
WORKDIR /var/lib/ocore
EXPOSE 8080 9808
# the default command is the worker: its /healthz (broker and database reachable) on the
# metrics port; the api service overrides it with the API's own /healthz
HEALTHCHECK --interval=30s --timeout=5s CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:9808/healthz', timeout=4)"]
ENTRYPOINT ["ocore-storage"]
CMD ["worker"]
