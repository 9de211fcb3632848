# Person re-identification service.
#
#   docker build -t reid-service .                     # CPU (default)
#   docker build -t reid-service:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# The CUDA wheels of torch carry their own CUDA runtime, so the slim base serves a GPU
# too (run with the NVIDIA container toolkit: --gpus all). BASE_IMAGE can be swapped for
# another Python 3.11 image if your platform needs one.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --user-group reid \
    && mkdir -p /data /checkpoints \
    && chown reid:reid /data /checkpoints

WORKDIR /app

# torch first, from the chosen wheel index: the project pins the same version, so the
# `pip install .` below keeps it instead of pulling the default (CUDA) build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY models ./models
COPY training ./training
COPY service ./service
COPY scripts ./scripts
RUN pip install . && rm -rf build *.egg-info

USER reid

ENV REID_HOST=0.0.0.0 \
    REID_PORT=8000 \
    REID_DATA_DIR=/data \
    REID_DEVICE=auto
VOLUME ["/data", "/checkpoints"]
EXPOSE 8000

# Liveness only; /readyz says when the model and gallery are loaded. The first start
# without a checkpoint builds the demo model, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REID_PORT', '8000'), timeout=4)"]

CMD ["bash", "scripts/start.sh"]
