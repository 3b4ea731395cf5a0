"""fleetworks: run fleets of agents on Celery, each effect once per idempotency key."""

from __future__ import annotations

__version__ = "0.1.0"
