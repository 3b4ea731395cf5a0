"""The IoT fleet: devices in regions, their telemetry, and the device side
that takes setpoint commands.

A simulated fleet stands in for thermostats spread over regions. Each device
reports a temperature (its telemetry, readable by region) and holds a
setpoint. A region's controller (``tasks/iot.py``, one leader per region)
reads the region's telemetry and sends setpoint commands to the devices
furthest from the target.

The device side (:func:`send_setpoint`) is where the fence stands: every
command carries its sender's term, and the device takes it only if no higher
term has landed for the region (:func:`fleetworks.leadership.accept_in`, in
the same transaction as the setpoint write). Every attempt is recorded in
``device_commands``, accepted or refused, so a run can check afterwards that
no command of a deposed leader was ever taken.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, func, insert, select, update

from fleetworks.db import transaction
from fleetworks.leadership import accept_in
from tasks.schema import DEVICE_COMMANDS, DEVICES

#: The temperature every controller steers its devices to.
TARGET: float = 21.0
#: Setpoints stay within these bounds.
SETPOINT_MIN, SETPOINT_MAX = 16.0, 26.0
_NAMES = ("eu", "us", "ap", "sa", "af", "me", "oc")
#: Controller groups are ``region:<name>``.
GROUP_PREFIX = "region:"


def region_names(count: int) -> list[str]:
    """The first ``count`` region names: eu, us, ap, sa, af, me, oc, then r8, r9..."""
    if count < 1:
        raise ValueError(f"regions must be at least 1, not {count!r}")
    return [_NAMES[i] if i < len(_NAMES) else f"r{i + 1}" for i in range(count)]


def region_groups(count: int) -> list[str]:
    return [GROUP_PREFIX + name for name in region_names(count)]


def seed_devices(url: str, devices: int, regions: int, seed: int = 5) -> None:
    """Replace the fleet with ``devices`` devices spread round-robin over ``regions``."""
    if devices < 0:
        raise ValueError(f"devices must not be negative, not {devices!r}")
    names = region_names(regions)
    rng = random.Random(seed)
    at = datetime.now(UTC)
    rows = [
        {
            "device_id": f"dev-{i:06d}",
            "region": names[i % len(names)],
            "setpoint": TARGET,
            "temperature": round(rng.uniform(14.0, 28.0), 2),
            "last_term": 0,
            "updated_at": at,
        }
        for i in range(devices)
    ]
    with transaction(url) as conn:
        conn.execute(delete(DEVICES))
        for start in range(0, len(rows), 500):
            conn.execute(insert(DEVICES), rows[start : start + 500])


@dataclass(frozen=True, slots=True)
class Reading:
    device_id: str
    temperature: float
    setpoint: float


def telemetry(url: str, region: str, furthest: int) -> list[Reading]:
    """The ``furthest`` devices of ``region`` whose temperature is furthest from target."""
    d = DEVICES.c
    off = func.abs(d.temperature - TARGET)
    with transaction(url) as conn:
        rows = conn.execute(
            select(d.device_id, d.temperature, d.setpoint)
            .where(d.region == region)
            .order_by(off.desc(), d.device_id)
            .limit(furthest)
        ).all()
    return [Reading(str(r[0]), float(r[1]), float(r[2])) for r in rows]


def plan(readings: Sequence[Reading]) -> list[tuple[str, float]]:
    """A setpoint per device that pulls its temperature back to the target."""
    out = []
    for r in readings:
        wanted = TARGET + (TARGET - r.temperature) * 0.5
        out.append((r.device_id, round(min(SETPOINT_MAX, max(SETPOINT_MIN, wanted)), 2)))
    return out


def send_setpoint(
    url: str, group: str, term: int, *, sender: str, device_id: str, setpoint: float
) -> bool:
    """The device side of one command: taken only if ``term`` is the highest
    the region has seen (the fence and the setpoint commit together); recorded
    either way. Returns whether the device took it."""
    d = DEVICES.c
    region = group.removeprefix(GROUP_PREFIX)
    at = datetime.now(UTC)
    with transaction(url) as conn:
        accepted = accept_in(conn, group, term)
        if accepted:
            temperature = conn.execute(
                select(d.temperature).where(d.device_id == device_id)
            ).scalar()
            if temperature is not None:
                # The device moves toward its new setpoint, with some noise.
                moved = temperature + (setpoint - temperature) * 0.6 + random.gauss(0, 1.5)
                conn.execute(
                    update(DEVICES)
                    .where(d.device_id == device_id)
                    .values(setpoint=setpoint, temperature=round(moved, 2), last_term=term,
                            updated_at=at)
                )  # fmt: skip
        conn.execute(
            insert(DEVICE_COMMANDS).values(
                device_id=device_id, region=region, term=term, setpoint=setpoint,
                accepted=accepted, sender=sender, created_at=at,
            )
        )  # fmt: skip
    return accepted


__all__ = [
    "GROUP_PREFIX",
    "TARGET",
    "Reading",
    "plan",
    "region_groups",
    "region_names",
    "seed_devices",
    "send_setpoint",
    "telemetry",
]
