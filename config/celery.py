"""The Celery app: ``celery -A config worker|beat|flower`` finds it here."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.registry import Collector

from beat_schedule import schedule
from config.settings import settings
from fleetworks import create_app, fleet_of, metrics
from fleetworks.settings import Settings

#: This deployment's task modules: one per agent.
TASK_MODULES = [
    "tasks.mentions",
    "tasks.pricing",
    "tasks.support",
    "tasks.uploads",
    "tasks.iot",
    "fleetworks.proving.probe",
]

app = create_app(
    settings,
    schedule(),
    modules=TASK_MODULES,
    # The deployment's own tables (tasks/schema.py), on their own Alembic branch.
    migrations=str(Path(__file__).with_name("migrations")),
)
fleet = fleet_of(app)


def _pricing_figures(settings: Settings) -> Collector:
    """The pricing agent's business figures, served with the fleet's own /metrics
    (imported when /metrics starts: the task modules import this package)."""
    from tasks.pricing_metrics import PricingCollector

    return PricingCollector(settings)


metrics.add_collector(_pricing_figures)

__all__ = ["app", "fleet"]
