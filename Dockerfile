FROM python:3.11-slim

# The runtime is installed as the package fleetworks; this repository's fleet
# (config/, agents/, tasks/, beat_schedule.py) is found on PYTHONPATH.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app

COPY pyproject.toml README.md ./
COPY fleetworks/ fleetworks/
COPY config/ config/
COPY agents/ agents/
COPY tasks/ tasks/
COPY beat_schedule.py ./

RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 fleet

# Embedded data (logs, local state) goes somewhere the non-root user can write.
ENV FLEET_HOME=/home/fleet/.fleet
USER fleet

CMD ["celery", "-A", "config", "worker", "--loglevel", "INFO"]
