"""Schedule slots, tick ids and misfire policies: pure functions of time.

A *slot* is a moment a schedule entry is due: for an interval of ``n``
seconds the multiples of ``n`` since the Unix epoch (so every beat computes
the same slots without talking to the others), for a crontab the moments
it matches. A *tick* is one slot of one entry; its id, ``<entry>@<slot in
UTC>``, is the same whichever beat sends it, and is the idempotency key of
the tick's task, so a tick sent twice runs once.

The scheduler remembers, per entry, the time up to which every slot has
been handled. When it looks again, the slots after that time and not after
now are *due*; more than one due slot means some were missed (no beat was
leading, or the leader stalled). The entry's misfire policy says what runs:

- ``coalesce`` (the default): one run, for the latest due slot;
- ``catch_up``: one run per due slot, oldest first, at most
  ``CATCH_UP_MAX_SLOTS`` (older ones are dropped and counted);
- ``skip``: only a slot that is on time (due for less than
  ``MISFIRE_GRACE_S``, or half its period if shorter) runs; missed ones
  do not.

An entry seen for the first time starts at its next slot.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from celery.schedules import crontab
from celery.schedules import schedule as interval_schedule
from pydantic import BaseModel, ConfigDict, Field

from fleetworks import constants as c


class Misfire(StrEnum):
    COALESCE = "coalesce"
    CATCH_UP = "catch_up"
    SKIP = "skip"


class Tick(BaseModel):
    """The payload a scheduled agent receives: which tick it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tick: str = Field(min_length=1, max_length=c.MAX_KEY_CHARS)
    slot: datetime
    entry: str = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do for one entry now."""

    run: list[datetime]
    #: Every slot up to this time is handled once ``run`` is sent.
    handled_to: datetime
    #: Due slots not run (missed under ``skip``/``coalesce``, or over the
    #: ``catch_up`` cap).
    dropped: int
    #: The entry's first slot after ``handled_to``: when to look again.
    next_slot: datetime


class UnsupportedSchedule(ValueError):
    """A schedule type fleetworks cannot enumerate slots of."""


def check(name: str, schedule: Any) -> None:
    """Raise :class:`UnsupportedSchedule` naming ``name`` unless its schedule is
    an interval or a crontab."""
    if isinstance(schedule, crontab):
        return
    if isinstance(schedule, interval_schedule) and type(schedule) is interval_schedule:
        if schedule.run_every.total_seconds() <= 0:
            raise UnsupportedSchedule(f"beat entry {name!r}: interval must be positive")
        return
    raise UnsupportedSchedule(
        f"beat entry {name!r}: schedule {schedule!r} is neither an interval nor a crontab; "
        "the highly available scheduler enumerates slots of those two only"
    )


def misfire_of(name: str, value: Any) -> Misfire:
    """The policy named ``value`` (None: coalesce), or a ValueError naming the entry."""
    if value is None:
        return Misfire.COALESCE
    try:
        return Misfire(value)
    except ValueError:
        allowed = ", ".join(m.value for m in Misfire)
        raise ValueError(
            f"beat entry {name!r}: misfire must be one of {allowed}, not {value!r}"
        ) from None


def next_slot(schedule: Any, after: datetime) -> datetime:
    """The entry's first slot strictly after ``after``."""
    if isinstance(schedule, crontab):
        last, delta, _ = schedule.remaining_delta(after.astimezone(UTC))
        found: datetime = (last + delta).astimezone(UTC)
        return found if found > after else next_slot(schedule, after + timedelta(seconds=1))
    period = schedule.run_every.total_seconds()
    k = math.floor(after.timestamp() / period) + 1
    return datetime.fromtimestamp(k * period, UTC)


def _interval_due(
    period: float, after: datetime, now: datetime, keep: int
) -> tuple[list[datetime], int]:
    first = math.floor(after.timestamp() / period) + 1
    last = math.floor(now.timestamp() / period)
    count = max(0, last - first + 1)
    kept = range(max(first, last - keep + 1), last + 1)
    return [datetime.fromtimestamp(k * period, UTC) for k in kept], count


def due_slots(
    schedule: Any, after: datetime, now: datetime, keep: int
) -> tuple[list[datetime], int]:
    """The latest ``keep`` slots in ``(after, now]``, oldest first, and how many there were."""
    if not isinstance(schedule, crontab):
        return _interval_due(schedule.run_every.total_seconds(), after, now, keep)
    latest: deque[datetime] = deque(maxlen=keep)
    count, slot = 0, next_slot(schedule, after)
    while slot <= now:
        latest.append(slot)
        count += 1
        slot = next_slot(schedule, slot)
    return list(latest), count


def on_time(schedule: Any, slot: datetime, now: datetime) -> bool:
    """Whether ``slot`` is due for less than the misfire grace (``skip`` runs it)."""
    period = (next_slot(schedule, slot) - slot).total_seconds()
    return (now - slot).total_seconds() <= min(c.MISFIRE_GRACE_S, period / 2)


def plan(schedule: Any, policy: Misfire, handled_to: datetime | None, now: datetime) -> Plan:
    """What runs now for an entry whose slots up to ``handled_to`` are handled."""
    if handled_to is None:
        return Plan([], now, 0, next_slot(schedule, now))
    keep = c.CATCH_UP_MAX_SLOTS if policy is Misfire.CATCH_UP else 1
    slots, count = due_slots(schedule, handled_to, now, keep)
    if not slots:
        return Plan([], handled_to, 0, next_slot(schedule, handled_to))
    latest = slots[-1]
    if policy is Misfire.SKIP and not on_time(schedule, latest, now):
        slots = []
    return Plan(slots, latest, count - len(slots), next_slot(schedule, latest))


def slot_text(slot: datetime) -> str:
    """A slot in UTC, to the millisecond: ``2026-11-22T10:00:10.000Z``."""
    return slot.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def tick_id(entry: str, slot: datetime) -> str:
    """The deterministic id of ``entry``'s tick at ``slot``."""
    return f"{entry}@{slot_text(slot)}"
