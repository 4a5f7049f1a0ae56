# One image for every role of crypto-data-redis; the command picks the role:
#   docker run IMAGE ingest market | ingest user | project | replay | status | simulate
#
# Build stage: a virtualenv with the project and its runtime dependencies at the exact versions
# of requirements.lock. The lock is used as constraints (`-c`) rather than installed whole
# (`-r`) because it also pins the development tools (pytest, ruff, mypy), which would double
# the image for nothing.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY requirements.lock pyproject.toml ./
COPY pipeline ./pipeline
COPY projections ./projections
# The project and its runtime dependencies, each at the version pinned by the lock file
# (pip refuses any other); the lock's development tools are not dependencies, so not installed.
RUN /opt/venv/bin/pip install -c requirements.lock . \
 && /opt/venv/bin/pip check

# Runtime stage: the slim base, the virtualenv, an entrypoint, a non-root user.
FROM python:3.11-slim
LABEL org.opencontainers.image.title="crypto-data-redis" \
      org.opencontainers.image.description="Binance USD-M websockets -> Redis Streams -> views"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIPELINE_LOG_FORMAT=json \
    PIPELINE_METRICS_PORT=9100
RUN groupadd --system --gid 10001 pipeline \
 && useradd --system --uid 10001 --gid pipeline --no-create-home --shell /usr/sbin/nologin pipeline
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/pipeline-entrypoint.sh /usr/local/bin/pipeline-entrypoint
USER pipeline:pipeline
EXPOSE 9100
# /healthz answers 200 while the command is healthy (pipeline.metrics.serve)
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['PIPELINE_METRICS_PORT'], timeout=4)"]
# The entrypoint builds REDIS_URL from REDIS_USER + REDIS_PASSWORD_FILE, then runs `pipeline`.
ENTRYPOINT ["pipeline-entrypoint", "pipeline"]
CMD ["--help"]
