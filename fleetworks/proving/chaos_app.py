"""The app the chaos rig's beats run: the fleet's own (``FLEET_APP``) with one
more entry, the probe tick of :mod:`fleetworks.proving.slots`, so the run can
count how often each slot ran. Everything else (the reaper's entry, the
app's own schedule, its name, which names the beat leader's lease) is the
fleet app's.
"""

from __future__ import annotations

from fleetworks.app import load_app
from fleetworks.proving import probe, slots
from fleetworks.settings import get_settings

app = load_app(get_settings().app)
app.conf.beat_schedule = {**(app.conf.beat_schedule or {}), slots.ENTRY: slots.entry()}

__all__ = ["app", "probe"]
