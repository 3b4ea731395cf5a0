"""The Celery app the beat tests run beat with: a schedule of its own.

One entry, ``probe.tick`` every second with misfire ``catch_up``, so every
slot must run, each once, and nothing else (no fan-out) lands on the test's
queue. Its broker, Redis, database and queue come from ``FLEET_*`` as for
any fleet app; the test workers (the reference app) run ``probe.tick``.
"""

from __future__ import annotations

from fleetworks import create_app
from fleetworks.proving import probe

#: The schedule's one entry, its period and the app's name (it names the
#: beat's leader lease and handled-slots keys in Redis).
ENTRY = "tick"
PERIOD_S = 1.0
NAME = "beattest"

app = create_app(
    beat_schedule={
        ENTRY: {"task": probe.TICK, "schedule": PERIOD_S, "options": {"misfire": "catch_up"}}
    },
    name=NAME,
    modules=[probe.MODULE],
)
