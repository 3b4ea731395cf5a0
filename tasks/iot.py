"""The regional controller of the IoT fleet: one leader per region steers its devices.

Declared for ``FLEET_IOT_REGIONS`` regions (groups ``region:eu``,
``region:us``, ``region:ap``, ...); ``fleetworks controllers`` runs it, each
region's cycle in that region's leader only. A cycle reads the region's
telemetry and sends a setpoint to each of the ``FLEET_IOT_PER_CYCLE``
devices furthest from target, paced by ``FLEET_IOT_SEND_GAP_S`` as a device
gateway would be. The cycle checks that it leads once, when it starts; the
commands it sends carry its term, and the device side
(:func:`agents.iot.send_setpoint`) refuses any whose term is stale, so a
leader stopped mid-cycle that wakes after its lease cannot steer a device.
"""

from __future__ import annotations

import time

from agents import iot
from config.settings import iot as settings
from fleetworks import ControllerContext, shared_controller

CONTROLLER = "iot.regions"


@shared_controller(
    groups=iot.region_groups(settings.regions), every_s=settings.every_s, name=CONTROLLER
)
def steer(ctx: ControllerContext) -> None:
    """One cycle of a region's leader: telemetry in, setpoint commands out."""
    if not ctx.still_leading():
        return
    region = ctx.group.removeprefix(iot.GROUP_PREFIX)
    readings = iot.telemetry(ctx.db_url, region, settings.per_cycle)
    for device_id, setpoint in iot.plan(readings):
        iot.send_setpoint(
            ctx.db_url, ctx.group, ctx.term, sender=ctx.replica, device_id=device_id,
            setpoint=setpoint,
        )  # fmt: skip
        if settings.send_gap_s:
            time.sleep(settings.send_gap_s)
