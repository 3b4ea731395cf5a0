"""Wiring of one fleet: settings from ``FLEET_*`` and the Celery app."""

from __future__ import annotations

from config.celery import app, fleet

__all__ = ["app", "fleet"]
