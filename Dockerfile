# syntax=docker/dockerfile:1
#
# T-REX Serve: the gRPC solve service with its ONNX models, no PyTorch.
#
#   docker build -t trex-serve:0.1.0-cuda .
#   docker build --build-arg BASE_IMAGE=ubuntu:24.04 -t trex-serve:0.1.0-cpu .
#   docker run --gpus all -p 50051:50051 -p 8000:8000 trex-serve:0.1.0-cuda
#
# The build context must hold models/onnx (trex-export writes it); .dockerignore lets in
# only what the stages below copy.

# onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9 (deploy/docker/constraints.txt pins
# it): change the two together. A CPU-only image takes plain ubuntu:24.04; the same
# onnxruntime-gpu wheel then runs on its CPU provider, and the image is several GB smaller.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04


# --- Python on the base image, shared by both stages ------------------------------------
# The venv made in the builder is copied as is into the final stage, so both must have the
# same interpreter at the same path: Ubuntu 24.04's python3 (3.12).
FROM ${BASE_IMAGE} AS python
# an ARG, not ENV: apt's setting for the build only, not for the running server
ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Ubuntu's security updates change the patch versions under us; pinning them would only
# make the build fail once the pinned version leaves the archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*


# --- builder: the wheel (gRPC stubs generated here) and a venv with serving deps only ----
FROM python AS builder
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY deploy/docker/constraints.txt deploy/docker/build-requirements.txt /src/deploy/docker/

# Build tools in a venv of their own (never copied on), pinned by the constraints so the
# generated stubs match the protobuf installed below.
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir \
        -r deploy/docker/build-requirements.txt -c deploy/docker/constraints.txt

# Only the serving packages go into the wheel: setuptools' package find also lists
# training*, export* and analysis*, but they are not copied into /src, so the wheel holds
# service/ and protos/ alone and the image no training code. README.md is optional (the
# glob): pyproject.toml names it as the long description.
COPY pyproject.toml setup.py README.md* /src/
COPY protos/ /src/protos/
COPY service/ /src/service/
# --no-build-isolation: the pinned tools above, instead of whatever PyPI has today
RUN /opt/build/bin/pip wheel --no-cache-dir --no-build-isolation --no-deps \
        --wheel-dir /dist /src

# The serving venv: the wheel and its [project] dependencies, none of the extras (torch
# lives in the train extra). Pinned by the same constraints.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir \
        -c deploy/docker/constraints.txt /dist/trex_serve-*.whl \
    && /opt/venv/bin/pip check


# --- the serving image ------------------------------------------------------------------
FROM python AS serve
# A fixed numeric uid, so that Kubernetes' runAsNonRoot can verify it without a passwd
# lookup (deploy/k8s sets the same ids).
RUN groupadd --system --gid 10001 trex \
    && useradd --system --uid 10001 --gid trex --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin trex

# The venv holds the trex-serve wheel (service/ and the generated stubs) and its deps.
COPY --from=builder /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /app/healthcheck.py
# Owned by root and not writable by the server: the models are part of the image.
COPY models/onnx/ /app/models/onnx/

ENV PATH=/opt/venv/bin:$PATH \
    TREX_HOST=0.0.0.0 \
    TREX_PORT=50051 \
    TREX_METRICS_PORT=8000 \
    TREX_MODEL_DIR=/app/models/onnx
WORKDIR /app
USER 10001:10001

# gRPC (trex.v1.Solver, grpc.health.v1, reflection) and Prometheus /metrics
EXPOSE 50051 8000

# The model loads and warms up behind NOT_SERVING; start-period covers that on a cold GPU.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]

# Exec form: trex-serve is PID 1 and receives SIGTERM itself, drains calls in flight for
# --grace-period-s (env TREX_GRACE_PERIOD_S) and exits 0. Give `docker stop -t` or the
# orchestrator's grace period a few seconds more than that.
ENTRYPOINT ["trex-serve"]
