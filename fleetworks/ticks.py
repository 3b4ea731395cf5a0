"""Schedule slots, tick ids and misfire policies: pure functions of time.

A *slot* is a moment a schedule entry is due: for an interval of ``n``
seconds the multiples of ``n`` since the Unix epoch (so every beat computes
the same slots without talking to the others), for a crontab the minutes
it matches, in UTC (a day matches when its month, day of month *and* day of
week are all listed, as in Celery; Sunday is 0). Slots are computed from the
moment given, never from the clock, so the same arguments give the same
slots on any day. A *tick* is one slot of one entry; its id, ``<entry>@<slot
in UTC>``, is the same whichever beat sends it, and is the idempotency key
of the tick's task, so a tick sent twice runs once.

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

An entry seen for the first time starts at its next slot. A crontab that
matches no day (such as the 30th of February) is unsupported.
"""

from __future__ import annotations

import calendar
import math
from bisect import bisect_left
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
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
        try:
            next_slot(schedule, datetime(2000, 1, 1, tzinfo=UTC))
        except UnsupportedSchedule as exc:
            raise UnsupportedSchedule(f"beat entry {name!r}: {exc}") from None
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


#: The Gregorian calendar repeats, weekdays included, every 400 years: a
#: crontab that matches no day in that many days after a moment never does
#: (one that matches at all does so at least 13 times a cycle, but a
#: February 29 on a given weekday can be 40 years apart, so a bound of a few
#: years would reject valid crontabs).
_CYCLE = timedelta(days=146_097)
#: The last day the search for a crontab's next day may reach (datetime
#: cannot go past year 9999).
_LAST_DAY = date(9999, 1, 1)


@dataclass(frozen=True, slots=True)
class _Cron:
    """A crontab's expanded fields, in UTC; hours and minutes sorted."""

    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days_of_month: frozenset[int]
    months: frozenset[int]
    days_of_week: frozenset[int]  # Sunday is 0, as in Celery

    @classmethod
    def of(cls, schedule: crontab) -> _Cron:
        return cls(
            tuple(sorted(schedule.minute)),
            tuple(sorted(schedule.hour)),
            frozenset(schedule.day_of_month),
            frozenset(schedule.month_of_year),
            frozenset(schedule.day_of_week),
        )

    def day_matches(self, day: date) -> bool:
        """Whether the crontab runs on ``day``: month, day of month and day of
        week must all match (Celery's rule, not cron's either-day rule)."""
        return (
            day.month in self.months
            and day.day in self.days_of_month
            and day.isoweekday() % 7 in self.days_of_week
        )

    def next_day(self, day: date) -> date:
        """The first day after ``day`` in a listed month on a listed day of
        the month, or the first of the next month if that month has none."""
        following = day + timedelta(days=1)
        if following.month in self.months:
            length = calendar.monthrange(following.year, following.month)[1]
            for dom in sorted(self.days_of_month):
                if following.day <= dom <= length:
                    return following.replace(day=dom)
        if following.month == 12:
            return date(following.year + 1, 1, 1)
        return date(following.year, following.month + 1, 1)

    def first_time(self, hour: int, minute: int) -> tuple[int, int] | None:
        """The first (hour, minute) of a matching day at or after ``hour:minute``."""
        for h in self.hours[bisect_left(self.hours, hour) :]:
            i = bisect_left(self.minutes, minute) if h == hour else 0
            if i < len(self.minutes):
                return h, self.minutes[i]
        return None

    def slots_on(self, day: date, after: datetime, now: datetime) -> list[datetime]:
        """The matches on ``day`` in ``(after, now]``, oldest first."""
        if not self.day_matches(day):
            return []
        midnight = datetime.combine(day, time(), UTC)
        slots = (midnight + timedelta(hours=h, minutes=m) for h in self.hours for m in self.minutes)
        return [s for s in slots if after < s <= now]


def _cron_next(schedule: crontab, after: datetime) -> datetime:
    """The first minute strictly after ``after`` that ``schedule`` matches.

    Days that cannot match are skipped a month or a listed day at a time, so
    even a crontab due once in years is found in a few thousand steps.
    """
    cron = _Cron.of(schedule)
    start = after.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
    day, hour, minute = start.date(), start.hour, start.minute
    horizon = day + _CYCLE if day < _LAST_DAY - _CYCLE else _LAST_DAY
    while day < horizon:
        found = cron.first_time(hour, minute) if cron.day_matches(day) else None
        if found is not None:
            return datetime.combine(day, time(*found), UTC)
        day, hour, minute = cron.next_day(day), 0, 0
    raise UnsupportedSchedule(
        f"{schedule!r} matches no minute in the 400 years after {slot_text(after)}: "
        "no listed month has a listed day of the month on a listed day of the week"
    )


def next_slot(schedule: Any, after: datetime) -> datetime:
    """The entry's first slot strictly after ``after``, a function of ``after``
    alone (never of the clock).

    Raises :class:`UnsupportedSchedule` (a ValueError) naming a crontab that
    matches no minute at all.
    """
    if isinstance(schedule, crontab):
        return _cron_next(schedule, after)
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


def _cron_due(
    schedule: crontab, after: datetime, now: datetime, keep: int
) -> tuple[list[datetime], int]:
    """Like :func:`due_slots`, a day at a time: whole days inside the window
    are counted, not enumerated, and only the last days are listed."""
    cron = _Cron.of(schedule)
    after, now = after.astimezone(UTC), now.astimezone(UTC)
    if now <= after:
        return [], 0
    first, last = after.date(), now.date()
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    per_day = len(cron.hours) * len(cron.minutes)
    count = sum(
        len(cron.slots_on(d, after, now)) if d in (first, last) else per_day
        for d in days
        if cron.day_matches(d)
    )
    latest: list[datetime] = []
    for d in reversed(days):
        if len(latest) >= keep:
            break
        latest[:0] = cron.slots_on(d, after, now)
    return latest[max(0, len(latest) - keep) :], count


def due_slots(
    schedule: Any, after: datetime, now: datetime, keep: int
) -> tuple[list[datetime], int]:
    """The latest ``keep`` slots in ``(after, now]``, oldest first, and how many there were."""
    if isinstance(schedule, crontab):
        return _cron_due(schedule, after, now, keep)
    return _interval_due(schedule.run_every.total_seconds(), after, now, keep)


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
