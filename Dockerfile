# autonomy: API, Celery worker, beat and Flower all run from this one image
# (compose.yaml picks the command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

COPY pyproject.toml README.md ./
COPY beat_schedule.py ./
COPY app ./app
COPY tasks ./tasks
RUN pip install . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin autonomy \
    && mkdir -p /app/.autonomy \
    && chown autonomy:autonomy /app/.autonomy

USER autonomy

EXPOSE 8000 5555
CMD ["autonomy", "serve", "--host", "0.0.0.0"]
