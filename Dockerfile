# The production image: slim official Python, dependencies in their own layer, a non-root user.
# CI builds this on a locally made stand-in for the base image (scripts/test-container).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent app

WORKDIR /app
COPY alembic.ini *.py ./
COPY migrations ./migrations
COPY scripts/container-start ./scripts/container-start

USER 10001:10001
# No proxy header is trusted unless FORWARDED_ALLOW_IPS names the load balancer (docs/deploy.md).
ENV HOST=0.0.0.0 PORT=8000 LOG_FORMAT=json
EXPOSE 8000

# Liveness only (no database): the image has no curl, so ask Python.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['PORT'], timeout=2)"]

CMD ["/app/scripts/container-start"]
