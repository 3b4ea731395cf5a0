"""The Celery app: ``celery -A config worker|beat|flower`` finds it here."""

from __future__ import annotations

from beat_schedule import schedule
from config.settings import settings
from fleetworks.agent import Fleet
from fleetworks.app import create_app

app = create_app(settings, schedule(settings))
fleet = Fleet(app, settings)

__all__ = ["app", "fleet"]
