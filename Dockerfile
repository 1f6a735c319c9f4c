# stripe-sidecar container image: build with `docker build -t stripe-sidecar .`
# Runs as a non-root user, on a read-only root filesystem if you like: the only writable path is
# the state volume (/var/lib/stripe-sidecar), where the outbox keeps its SQLite store (opened
# only when an operation has `fallback: queue`). Configured by environment variables (see
# README "Running it for real"); a config file is optional: mount it and point
# STRIPE_SIDECAR_CONFIG at it, e.g. /etc/stripe-sidecar/sidecar.yaml.
# tests/test_image.py lints this file with hadolint and runs what the image runs.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- builder: the wheel and its dependencies, installed into a venv the final stage copies --
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
RUN pip wheel --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --no-index --find-links /wheels /wheels/stripe_sidecar-*.whl

# -- the image: Python, the venv, nothing to compile with --
FROM ${PYTHON_IMAGE}
RUN useradd --system --no-log-init --uid 10001 --user-group --home-dir /nonexistent \
        --shell /usr/sbin/nologin sidecar \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/stripe-sidecar
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STRIPE_SIDECAR_LISTEN=0.0.0.0:8080 \
    STRIPE_SIDECAR_STATE_DIR=/var/lib/stripe-sidecar
USER 10001:10001
WORKDIR /var/lib/stripe-sidecar
VOLUME ["/var/lib/stripe-sidecar"]
EXPOSE 8080
# No curl in the image: Python asks /health on the port STRIPE_SIDECAR_LISTEN names.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('STRIPE_SIDECAR_LISTEN', '127.0.0.1:8080').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2)"]
ENTRYPOINT ["stripe-sidecar"]
CMD ["serve"]
