"""Which polling agents run when.

Each entry is a Celery beat entry; intervals come from the agents' settings
(``FLEET_MENTIONS_*``, ``FLEET_PRICING_*``) so an operator changes them with
environment variables, not code. The fleet's scheduler (:mod:`fleetworks.beat`)
may run in several beats at once and sends each slot once;
``options["misfire"]`` says what happens to slots no beat could send in time
(``coalesce``, ``catch_up`` or ``skip``, see :mod:`fleetworks.ticks`). A
polling agent receives its tick as its payload and is deduplicated by the
tick id. The reaper's entry is added by the runtime to every fleet's
schedule (:func:`fleetworks.init_app`).
"""

from __future__ import annotations

from typing import Any

from config.settings import mentions, pricing


def schedule() -> dict[str, Any]:
    return {
        "poll-mentions": {
            "task": "mentions.poll",
            "schedule": mentions.poll_interval_s,
            "kwargs": {"payload": {"limit": mentions.per_poll}},
            # One catch-up window after an outage: windows overlap, and the
            # next tick reads the source again anyway.
            "options": {"misfire": "coalesce"},
        },
        "poll-prices": {
            "task": "pricing.poll",
            "schedule": pricing.interval_s,
            "kwargs": {"payload": {"products": pricing.products}},
            # A missed cycle is repriced once, on the latest market: pricing
            # an old market after the fact would only be undone next tick.
            "options": {"misfire": "coalesce"},
        },
    }
