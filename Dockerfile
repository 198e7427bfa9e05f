# syntax=docker/dockerfile:1
# Multi-stage: build wheels (llama.cpp compiles here) in a full image, run on a slim one.
# Mirrors the Makefile: same pip flags, same CMAKE_ARGS, same gunicorn.conf.py.

FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY config ./config
# Portable llama.cpp: a -march=native build crashes (general protection fault) on other CPUs.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF"
# "+cpu" pins the CPU build: a bare torch==2.13.0 would let pip take PyPI's multi-GB CUDA wheel.
# The project's own torch==2.13.0 pin accepts it (PEP 440 ignores the local label).
RUN pip install --upgrade pip setuptools wheel \
    && pip wheel --wheel-dir /wheels --extra-index-url https://download.pytorch.org/whl/cpu \
       "torch==2.13.0+cpu" . \
    && rm -rf /root/.cache/pip

FROM python:3.11-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels flask-ai-gateway && rm -rf /wheels
WORKDIR /srv
COPY --chown=gateway:gateway wsgi.py gunicorn.conf.py gunicorn_worker.py ./
COPY --chown=gateway:gateway migrations ./migrations
COPY --chown=gateway:gateway config ./config
RUN mkdir -p /srv/instance && chown gateway:gateway /srv/instance
USER gateway
ENV APP_ENV=production \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    BIND=0.0.0.0:8000 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus \
    INSTANCE_PATH=/srv/instance \
    MIGRATIONS_DIR=/srv/migrations \
    FLASK_APP=wsgi
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
# Migrations and the default artifacts are idempotent; the entrypoint runs them, then gunicorn.
# The batch worker is the same image with another command (deploy/compose.yaml's `worker`):
#   docker run ... flask-ai-gateway python -m app.inference.batches.worker
CMD ["sh", "-c", "flask db upgrade && flask models build-defaults --if-missing && exec gunicorn -c gunicorn.conf.py"]
