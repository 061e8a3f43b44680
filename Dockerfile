# syntax=docker/dockerfile:1.7
# gmtrouter service image: multi-stage, uv-based, non-root, CPU torch by default.
#
#   docker build -t gmtrouter .                                   # CPU torch (default)
#   docker build --build-arg TORCH_BACKEND=cu128 -t gmtrouter:cu128 .   # CUDA 12.8 torch
#   docker build --build-arg TORCH_BACKEND=pypi  -t gmtrouter:pypi .    # uv.lock as is
#
# TORCH_BACKEND: "cpu" (default; PyTorch's CPU wheel, no CUDA libraries), a CUDA flavour
# that uv knows ("cu126", "cu128", "cu130", ...; from the PyTorch index), or "pypi" (the
# exact wheels of uv.lock; on Linux x86_64 PyPI's torch is a CUDA build). Every other
# package is installed at the version uv.lock pins. GPU images need the NVIDIA driver and
# container toolkit on the host (docker run --gpus all) and config embedding.device: cuda.
#
# Paths inside the container (mount them; the root filesystem may be read-only):
#   /etc/gmtrouter/config.yaml   configuration file (server/config.py schema)
#   /models/                     trained checkpoint, e.g. /models/gmtrouter.pt, referenced
#                                by decision.algorithm.gmtrouter.model_path
#   /var/lib/gmtrouter/          embedded SQLite store (writable; a volume)
#   /tmp                         scratch (writable)
# Ports: 50051 gRPC (gmtrouter.v1.RouterService, grpc.health.v1), 9090 metrics.
#
# NOTE: no Docker engine runs on the project's machines; this file is linted with hadolint
# (tools/helm-check.sh does not build it). See docs/go-and-kubernetes.md.

ARG PYTHON_VERSION=3.11
ARG UV_VERSION=0.13.8

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS builder
ARG TORCH_BACKEND=cpu
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    VIRTUAL_ENV=/opt/venv
WORKDIR /src

# Dependencies first (cached while only the source changes).
COPY pyproject.toml uv.lock README.md ./
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN --mount=type=cache,target=/root/.cache/uv \
    uv venv /opt/venv \
 && uv export --frozen --no-dev --no-emit-project --no-hashes -o /tmp/requirements.txt \
 && if [ "$TORCH_BACKEND" = "pypi" ]; then \
      uv pip install --python /opt/venv/bin/python -r /tmp/requirements.txt; \
    else \
      grep -Ev '^(nvidia-|cuda-|triton==)' /tmp/requirements.txt > /tmp/requirements-notorch-libs.txt \
      && uv pip install --python /opt/venv/bin/python --torch-backend "$TORCH_BACKEND" \
           -r /tmp/requirements-notorch-libs.txt; \
    fi

# Then the project itself (no dependency changes).
COPY server ./server
COPY graphstore ./graphstore
COPY model ./model
COPY protos ./protos
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python --no-deps . \
 && /opt/venv/bin/python -c "import torch, server.app; print('torch', torch.__version__)"

# Export the text encoder's ONNX graph now (embedding.backend: onnx), so that a container
# with a read-only root filesystem does not export at start-up.
ENV GMTROUTER_ONNX_DIR=/opt/gmtrouter/onnx
RUN /opt/venv/bin/python -c "from model.text_encoder import TextEncoder as T; e = T(); e.warm_up(); assert e.active_backend == 'onnx', 'ONNX export failed'"

# ---------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ARG TORCH_BACKEND=cpu
LABEL org.opencontainers.image.title="gmtrouter" \
      org.opencontainers.image.description="Personalized LLM routing service (gRPC)" \
      org.opencontainers.image.source="https://github.com/gmtrouter/gmtrouter" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.gmtrouter.torch-backend="${TORCH_BACKEND}"

RUN groupadd --system --gid 10001 gmtrouter \
 && useradd --system --uid 10001 --gid gmtrouter --home-dir /tmp --shell /usr/sbin/nologin gmtrouter \
 && mkdir -p /etc/gmtrouter /models /var/lib/gmtrouter \
 && chown gmtrouter:gmtrouter /var/lib/gmtrouter

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/gmtrouter/onnx /opt/gmtrouter/onnx

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    GMTROUTER_ONNX_DIR=/opt/gmtrouter/onnx

USER 10001:10001
WORKDIR /var/lib/gmtrouter
VOLUME ["/var/lib/gmtrouter"]
EXPOSE 50051 9090

# grpc.health.v1 Check of the service (Kubernetes uses its own grpc probes instead).
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import grpc,sys;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;r=g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(service='gmtrouter.v1.RouterService'),timeout=2);sys.exit(r.status!=1)"]

ENTRYPOINT ["gmtrouter"]
# Without a mounted config: listen on all interfaces, embedded store on the volume.
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--store", "sqlite:////var/lib/gmtrouter/gmtrouter.db"]
