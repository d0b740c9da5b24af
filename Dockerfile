# syntax=docker/dockerfile:1
# The D3 service's container images: one file, one target per role (deploy/k8s runs them).
#
#   docker build --target api       -t d3/api:TAG .        Flask API and the worker tier (same code)
#   docker build --target inference -t d3/inference:TAG .  Triton inference tier, CUDA runtime
#   docker build --target web       -t d3/web:TAG .        React front end (web/dist) on nginx
#
# Final images run as an unprivileged user, hold no compiler, pip cache or weights: the weights
# live in a volume that an init container fills (`d3 fetch-weights --if-missing`, DEPLOYMENT.md).
# Base images are pinned by tag (the same Python minor as the tested venv); pin them by digest
# (FROM image@sha256:...) where your registry policy asks for it.

# Extra wheel index for pip (e.g. PyTorch's CPU-only wheels for the api target, which never
# runs the model on a GPU when D3_INFERENCE_URL points at the inference tier). Empty: PyPI only.
ARG PIP_EXTRA_INDEX_URL=""

# ---- build stage of the API/worker virtualenv ---------------------------------------------------
FROM python:3.11.11-slim-bookworm AS python-build
ARG PIP_EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY pyproject.toml README.md ./
COPY api ./api
RUN pip install --no-cache-dir --no-deps . && rm -rf /src

# ---- api: the Flask API (gunicorn) and the worker tier (`d3 worker`) -----------------------------
FROM python:3.11.11-slim-bookworm AS api
RUN groupadd --system --gid 10001 d3 \
    && useradd --system --uid 10001 --gid d3 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin d3
COPY --from=python-build /opt/venv /opt/venv
WORKDIR /app
COPY gunicorn_config.py ./
# The root filesystem is read-only in the cluster: everything the process writes goes to the
# volumes mounted at these paths (deploy/k8s/base).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    INSTANCE_DIR=/var/lib/d3 \
    D3_CACHE_DIR=/var/cache/d3 \
    GUNICORN_ACCESS_LOG=- \
    GUNICORN_ERROR_LOG=- \
    BIND=0.0.0.0:6000
USER 10001:10001
EXPOSE 6000
CMD ["gunicorn", "-c", "gunicorn_config.py", "api.app:app"]

# ---- build stage of the inference virtualenv (CUDA build of torch, Triton's Python binding) ------
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS inference-build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Distribution packages follow the pinned base image's release; their versions are not pinned
# here (hadolint DL3008 is ignored on purpose: see .hadolint.yaml).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY pyproject.toml README.md ./
COPY api ./api
RUN pip install --no-cache-dir --no-deps . && rm -rf /src

# ---- inference: `d3 serve-inference` (Triton HTTP 8000, gRPC 8001, metrics 8002) -----------------
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS inference
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 d3 \
    && useradd --system --uid 10001 --gid d3 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin d3
COPY --from=inference-build /opt/venv /opt/venv
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    D3_CACHE_DIR=/var/cache/d3
USER 10001:10001
EXPOSE 8000 8001 8002
CMD ["d3", "serve-inference", "--host", "0.0.0.0", "--http-port", "8000", "--grpc-port", "8001", "--metrics-port", "8002"]

# ---- build stage of the front end ------------------------------------------------------------------
FROM node:22.12.0-bookworm-slim AS web-build
WORKDIR /src/web
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY web ./
RUN npm run build

# ---- web: the static files on nginx (unprivileged image: user 101, port 8080) -----------------------
FROM nginxinc/nginx-unprivileged:1.27.3-alpine AS web
COPY --from=web-build /src/web/dist /usr/share/nginx/html
USER 101:101
EXPOSE 8080
CMD ["nginx", "-g", "daemon off;"]
