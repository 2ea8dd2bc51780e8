# syntax=docker/dockerfile:1
# Two images from one file (docs/service.md):
#   api     docker build --target api -t coremerge-api .       the base install; no torch
#   worker  docker build --target worker -t coremerge-worker . .[worker], CUDA torch; merges
# The CUDA wheel of torch carries its own CUDA runtime: the host needs only the NVIDIA driver
# and the container toolkit. On a host without a GPU the same worker image runs on the CPU.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 coremerge \
 && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin coremerge
WORKDIR /app

# ---------------------------------------------------------------------------------------------
FROM base AS api
# The base install (pyproject.toml's dependencies: client, API, queue, S3) and not the
# `worker` extra, so torch, peft and transformers stay out of this image; the build checks.
COPY pyproject.toml README.md ./
COPY jobs ./jobs
COPY service ./service
COPY worker ./worker
RUN pip install . \
 && python -c "import sys, service.app; assert 'torch' not in sys.modules" \
 && if python -c "import torch" 2>/dev/null; then exit 1; fi
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# 0.0.0.0 inside the container, so this needs COREMERGE_TENANTS_FILE (a mounted tenants
# file, as deploy/ does): without one, `serve` refuses a non-loopback address rather than run
# an open API. docker-compose.yml passes --allow-open-non-loopback for its loopback-only stack.
CMD ["coremerge", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
FROM base AS worker
# Pick the CUDA build that matches the hosts' drivers (see https://pytorch.org/get-started/).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md ./
COPY jobs ./jobs
COPY service ./service
COPY worker ./worker
# The project itself with its `worker` extra (hadolint reads ".[worker]" as an unpinned package).
# hadolint ignore=DL3013
RUN pip install ".[worker]"
USER 10001:10001
# Inputs are downloaded and outputs staged here; mount a volume with room for one job.
ENV COREMERGE_WORK_DIR=/tmp
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["coremerge", "worker", "--healthcheck"]
# RQ's forking worker: the parent never initialises CUDA, each job runs in a fresh child.
CMD ["coremerge", "worker"]
