# DCU image: one image for every role (`dcu gateway`, `dcu persist`, `dcu worker <stage>`,
# `dcu timer`, or `dcu serve` for all in one process). See docs/deployment.md.

# --- build: install DCU and its dependencies (no dev/test extras) into /opt/venv --------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so a source change reuses this layer.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt
COPY . .
RUN /opt/venv/bin/pip install --no-deps . \
    && /opt/venv/bin/dcu --help >/dev/null

# --- runtime -----------------------------------------------------------------------------
FROM python:3.11-slim
# DCU_SERVER_HOST: listen beyond loopback inside the container; publish the port only on
# 127.0.0.1 or a private network, behind a reverse proxy (docs/deployment.md).
# DCU_AUTH_ENABLED: POST endpoints need a bearer token; `dcu serve`/`dcu gateway` refuse to
# start until DCU_AUTH_TOKENS gives some (JSON name -> token, see docs/security.md).
# Everything DCU writes lives under /var/lib/dcu: mount a volume there. The work and gzip
# directories must be on a volume shared by the download, compress and upload roles.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DCU_SERVER_HOST=0.0.0.0 \
    DCU_AUTH_ENABLED=true \
    DCU_SERVER_PORT=8090 \
    DCU_STORAGE_WORK_PATH=/var/lib/dcu/work \
    DCU_STORAGE_GZIP_PATH=/var/lib/dcu/gzip \
    DCU_DATABASE_PATH=/var/lib/dcu/dcu.db \
    DCU_NATS_DATA_DIR=/var/lib/dcu/nats \
    DCU_MINIO_LOCAL_PATH=/var/lib/dcu/objects
RUN groupadd --system --gid 10001 dcu \
    && useradd --system --uid 10001 --gid dcu --home-dir /var/lib/dcu --no-create-home \
        --shell /usr/sbin/nologin dcu \
    && install -d -o dcu -g dcu -m 0750 /var/lib/dcu
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Picked up as the default config (cwd/configs/config.yaml); DCU_* variables override it.
COPY configs/config.yaml configs/config.yaml
EXPOSE 8090
# Only the HTTP roles (gateway, serve) answer; compose disables it for the others.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('DCU_SERVER_PORT', '8090') + '/api/dcu/health', timeout=4)"]
USER 10001:10001
ENTRYPOINT ["dcu"]
CMD ["serve"]
