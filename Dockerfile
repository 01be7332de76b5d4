# autonomy: API, Celery worker, beat and Flower all run from this one image
# (compose.yaml picks the command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

COPY pyproject.toml README.md LICENSE MANIFEST.in constraints.txt ./
COPY beat_schedule.py autonomy_launcher.py ./
COPY app ./app
COPY tasks ./tasks
# the runtime dependencies only (no `embedded` extra: compose gives REDIS_URL), at the
# versions CI tested (constraints.txt)
RUN pip install -c constraints.txt . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin autonomy \
    && mkdir -p /app/.autonomy \
    && chown autonomy:autonomy /app/.autonomy

USER autonomy

EXPOSE 8000 5555
# the API's readiness (database at the schema head, Redis reachable); compose gives the
# worker, beat and Flower services probes of their own
HEALTHCHECK --interval=15s --timeout=10s --start-period=20s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=5)"]
CMD ["autonomy", "serve", "--host", "0.0.0.0"]
