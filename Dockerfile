# syntax=docker/dockerfile:1
# Serving image for jaxreco: TensorFlow + FastAPI/uvicorn, no JAX.
#
#   docker build -t jaxreco-serve:0.1.0 .                                  # model mounted at run time
#   docker run --rm -p 127.0.0.1:8501:8501 -v "$PWD/models/ml1m:/models/jaxreco:ro" jaxreco-serve:0.1.0
#   docker build --build-arg MODEL_SOURCE=baked --build-arg MODEL_DIR=models/ml1m \
#       -t jaxreco-serve:ml1m .                                             # model baked in
#
# MODEL_DIR is a model directory in the build context holding <version>/ subdirectories
# (what jaxreco-export writes). See docs/serving.md.

ARG PYTHON_VERSION=3.11
ARG MODEL_SOURCE=mounted

# ---------------------------------------------------------------- build: a venv with the serve deps
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY jaxreco/serve/requirements.txt /src/requirements-serve.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r /src/requirements-serve.txt
COPY pyproject.toml README* /src/
COPY jaxreco /src/jaxreco
# The wheel maps conf/ onto the package jaxreco.conf (pyproject.toml), so the build needs it.
COPY conf /src/conf
# --no-deps: the package's own dependencies are the training stack (jax, flax, ...).
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /src \
    && if /opt/venv/bin/python -c "import jax" 2>/dev/null; then echo "jax leaked into the serving image" >&2; exit 1; fi \
    && /opt/venv/bin/python -c "import jaxreco.serve.app"

# ---------------------------------------------------------------- runtime
FROM python:${PYTHON_VERSION}-slim AS runtime
RUN groupadd --system --gid 10001 jaxreco \
    && useradd --system --uid 10001 --gid jaxreco --no-create-home --shell /usr/sbin/nologin jaxreco \
    && mkdir -p /models \
    && chown jaxreco:jaxreco /models
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    HOME=/tmp \
    JAXRECO_SERVE_HOST=0.0.0.0 \
    JAXRECO_SERVE_PORT=8501 \
    JAXRECO_SERVE_MODEL_NAME=jaxreco \
    JAXRECO_SERVE_MODEL_DIR=/models/jaxreco
EXPOSE 8501
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "jaxreco.serve.healthcheck", "/readyz"]
USER 10001:10001
ENTRYPOINT ["python", "-m", "jaxreco.serve"]

# ---------------------------------------------------------------- model: mounted (default) or baked
FROM runtime AS model-mounted

FROM runtime AS model-baked
ARG MODEL_DIR=models
COPY --chown=10001:10001 ${MODEL_DIR} /models/jaxreco

# A stage of this file, chosen by MODEL_SOURCE (not an image from a registry, so no tag).
# hadolint ignore=DL3006
FROM model-${MODEL_SOURCE}
