"""The chaos run's scheduled probe: ``probe.tick`` every second, each slot once.

The rig's beats run the fleet's app with one more entry, :data:`ENTRY`
(:mod:`fleetworks.proving.chaos_app`), with misfire ``catch_up``: every slot
from the first the leader sends to the last it records as handled must run,
and run once, whichever beat leads and whatever the faults do to it. The
tick id (``chaos-tick@<slot>``) is the probe's idempotency key, and each run
writes a row to ``probe_effect_log``, which has no UNIQUE key, so a slot that
ran twice shows as two rows. A tick sent again (by a leader cut off after
sending it, or a resend after Redis lost the handled-to time) is skipped by
the guard as a duplicate: those are counted apart, as ``late_ticks_skipped``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from fleetworks.beat import slots_key
from fleetworks.db import transaction
from fleetworks.models import GUARD_EVENTS, OUTCOMES, PROBE_EFFECT_LOG, TERMINAL, EventKind
from fleetworks.proving import probe
from fleetworks.ticks import slot_text, tick_id

#: The entry's name (the prefix of its tick ids) and its period.
ENTRY = "chaos-tick"
PERIOD_S = 1.0
PERIOD = timedelta(seconds=PERIOD_S)


def entry() -> dict[str, Any]:
    """The beat entry of the chaos run's tick."""
    return {"task": probe.TICK, "schedule": PERIOD_S, "options": {"misfire": "catch_up"}}


def reset(client: redis.Redis, app_name: str) -> None:
    """Forget the entry's handled-to time (an earlier run's), so the first
    leader of this run starts at its next slot instead of catching up."""
    client.hdel(slots_key(app_name), ENTRY)


def handled_to(client: redis.Redis, app_name: str) -> datetime | None:
    """The last slot the leaders recorded as sent, or None before the first."""
    raw = client.hget(slots_key(app_name), ENTRY)
    if raw is None:
        return None
    at = int(raw) / 1000
    return datetime.fromtimestamp(math.floor(at / PERIOD_S) * PERIOD_S, UTC)


def between(after: datetime, until: datetime) -> list[str]:
    """Tick ids of the slots in ``(after, until]``."""
    first = math.floor(after.timestamp() / PERIOD_S) + 1
    last = math.floor(until.timestamp() / PERIOD_S)
    at = [datetime.fromtimestamp(k * PERIOD_S, UTC) for k in range(first, last + 1)]
    return [tick_id(ENTRY, slot) for slot in at]


def slot_of(key: str) -> datetime:
    return datetime.fromisoformat(key.split("@", 1)[1].replace("Z", "+00:00"))


@dataclass
class Slots:
    """How the run's slots ran."""

    #: Slots that ran (distinct tick ids with an effect).
    run: int = 0
    #: Slots whose effect committed more than once (must be 0).
    run_twice: int = 0
    #: Slots from the first that ran to the last recorded as sent that never ran.
    missed: int = 0
    #: Ticks sent again and skipped by the guard as duplicates.
    late_ticks_skipped: int = 0
    #: Tick id -> when its run finished.
    finished: dict[str, datetime] = field(default_factory=dict)
    #: Tick id -> when a beat sent it (its message's publish time), for the
    #: recovery of a beat partition: the new leader's part ends there; the run
    #: then waits for a free process like any tick.
    sent: dict[str, datetime] = field(default_factory=dict)
    #: Tick ids claimed and not finished.
    open: int = 0

    def as_report(self) -> dict[str, int]:
        return {
            "run": self.run,
            "run_twice": self.run_twice,
            "missed": self.missed,
            "late_ticks_skipped": self.late_ticks_skipped,
        }


def count(url: str, since: datetime, last: datetime | None) -> Slots:
    """The slots after ``since`` as the database has them, ``last`` being the
    last slot recorded as sent."""
    low = f"{ENTRY}@{slot_text(since)}"
    high = f"{ENTRY}@\uffff"
    log, o, e = PROBE_EFFECT_LOG.c, OUTCOMES.c, GUARD_EVENTS.c
    with transaction(url) as conn:
        runs: dict[str, int] = dict(
            conn.execute(
                select(log.effect_key, func.count())
                .where((log.effect_key >= low) & (log.effect_key < high))
                .group_by(log.effect_key)
            ).all()
        )
        outcomes = conn.execute(
            select(o.idempotency_key, o.status, o.finished_at, o.queued_at).where(
                (o.agent == probe.TICK) & (o.idempotency_key >= low) & (o.idempotency_key < high)
            )
        ).all()
        skipped = conn.execute(
            select(func.count()).where(
                (e.agent == probe.TICK)
                & (e.kind == EventKind.SKIPPED_DUPLICATE)
                & (e.idempotency_key >= low)
                & (e.idempotency_key < high)
            )
        ).scalar_one()
    slots = Slots(
        run=len(runs),
        run_twice=len([n for n in runs.values() if n > 1]),
        late_ticks_skipped=int(skipped),
        finished={
            r.idempotency_key: _utc(r.finished_at)
            for r in outcomes
            if r.status in TERMINAL and r.finished_at is not None
        },
        sent={r.idempotency_key: _utc(r.queued_at) for r in outcomes if r.queued_at is not None},
        open=len([r for r in outcomes if r.status not in TERMINAL]),
    )
    if runs and last is not None:
        expected = between(min(slot_of(k) for k in runs) - PERIOD, last)
        slots.missed = len(set(expected) - set(runs))
    return slots


def settle(
    url: str, client: redis.Redis, app_name: str, since: datetime, timeout_s: float = 30.0
) -> Slots:
    """Once the beats are stopped: wait until every slot recorded as sent has
    run (or ``timeout_s``), then count."""
    last = handled_to(client, app_name)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            slots = count(url, since, last)
            if (slots.missed == 0 and slots.open == 0) or time.monotonic() > deadline:
                return slots
        except DBAPIError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def _utc(at: datetime) -> datetime:
    """SQLite returns naive datetimes; fleetworks stores UTC."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
