"""Which polling agents run when.

Each entry is a Celery beat entry; intervals come from settings so an
operator changes them with ``FLEET_*`` variables, not code. A tick expires
after one interval: a tick that could not start in time is dropped, since
the next one polls the same source again.
"""

from __future__ import annotations

from typing import Any

from fleetworks import constants as c
from fleetworks.agent import REAP_TASK
from fleetworks.settings import Settings


def schedule(settings: Settings) -> dict[str, Any]:
    interval = settings.mentions_poll_interval_s
    return {
        "poll-mentions": {
            "task": "mentions.poll",
            "schedule": interval,
            "kwargs": {"limit": settings.mentions_per_poll},
            "options": {"expires": interval},
        },
        "reap-orphaned-claims": {
            "task": REAP_TASK,
            "schedule": c.REAP_INTERVAL_S,
            "options": {"expires": c.REAP_INTERVAL_S},
        },
    }
