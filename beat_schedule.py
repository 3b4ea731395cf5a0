"""Which polling agents run when.

Each entry is a Celery beat entry; intervals come from settings so an
operator changes them with ``FLEET_*`` variables, not code. The fleet's
scheduler (:mod:`fleetworks.beat`) may run in several beats at once and
sends each slot once; ``options["misfire"]`` says what happens to slots no
beat could send in time (``coalesce``, ``catch_up`` or ``skip``, see
:mod:`fleetworks.ticks`). A polling agent receives its tick as its payload
and is deduplicated by the tick id.
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
            "kwargs": {"payload": {"limit": settings.mentions_per_poll}},
            # One catch-up window after an outage: windows overlap, and the
            # next tick reads the source again anyway.
            "options": {"misfire": "coalesce"},
        },
        "poll-prices": {
            "task": "pricing.poll",
            "schedule": settings.pricing_interval_s,
            "kwargs": {"payload": {"products": settings.pricing_products}},
            # A missed cycle is repriced once, on the latest market: pricing
            # an old market after the fact would only be undone next tick.
            "options": {"misfire": "coalesce"},
        },
        "reap-orphaned-claims": {
            "task": REAP_TASK,
            "schedule": c.REAP_INTERVAL_S,
            # The reaper looks at the present: a missed run has nothing to do.
            "options": {"misfire": "skip", "expires": c.REAP_INTERVAL_S},
        },
    }
