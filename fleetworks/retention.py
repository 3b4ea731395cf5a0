"""Outcome retention: settled rows older than ``FLEET_OUTCOMES_KEEP_DAYS`` go.

An outcome row is the record that a key ran; while it exists, the key runs
at most once. Pruning it ends that promise for that key: a message for it
delivered after the row is gone (a producer re-sending a week-old key) runs
again. So nothing is pruned unless ``FLEET_OUTCOMES_KEEP_DAYS`` is set, and
then only rows that can no longer matter to the fleet itself:

- ``succeeded`` and ``rejected`` rows whose run finished (and started) before
  the cutoff: terminal, and far older than any redelivery, republish or
  retry the fleet makes (the longest is the broker's visibility timeout);
- the guard's events of the same age (stale writes, duplicates, reaps).

Never pruned: ``claimed`` (a run in flight, or one the reaper is to recover),
``failed`` (a retry is due) and ``dead`` (kept until an operator replays or
deletes it), whatever their age.

Rows go in batches of :data:`BATCH` (one short transaction each, so a prune
never holds locks the guard waits on for long), selected through the
``(status, started_at)`` index. The job runs as the task ``fleet.prune`` on
the fleet's beat every :data:`EVERY_S` when retention is set, and by hand as
``fleetworks db prune``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Select, delete, select

from fleetworks.db import transaction
from fleetworks.models import GUARD_EVENTS, OUTCOMES, Status

if TYPE_CHECKING:
    from fleetworks.agent import Fleet

#: Name of the pruning task, scheduled by beat when retention is set.
PRUNE_TASK = "fleet.prune"
#: Seconds between two prunes on beat.
EVERY_S = 3600.0
#: Rows deleted per transaction.
BATCH = 5000
#: What a prune may delete: settled for good.
PRUNABLE = (Status.SUCCEEDED, Status.REJECTED)


@dataclass(frozen=True)
class Pruned:
    """What one prune deleted, and the cutoff it used."""

    outcomes: int
    guard_events: int
    before: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcomes": self.outcomes,
            "guard_events": self.guard_events,
            "before": self.before.isoformat(),
        }


def prune(url: str, keep_days: float, *, now: datetime | None = None, batch: int = BATCH) -> Pruned:
    """Delete settled outcome rows and guard events older than ``keep_days``."""
    if keep_days <= 0:
        raise ValueError(f"keep_days must be positive, got {keep_days}")
    before = (now or datetime.now(UTC)) - timedelta(days=keep_days)
    old_events = select(GUARD_EVENTS.c.id).where(GUARD_EVENTS.c.at < before).limit(batch)
    outcomes = _in_batches(url, OUTCOMES, old_outcomes(before, batch), batch)
    events = _in_batches(url, GUARD_EVENTS, old_events, batch)
    return Pruned(outcomes, events, before)


def old_outcomes(before: datetime, batch: int) -> Select[tuple[int]]:
    """Ids of up to ``batch`` prunable rows that started and finished before ``before``."""
    o = OUTCOMES.c
    return (
        select(o.id)
        .where(o.status.in_([s.value for s in PRUNABLE]), o.started_at < before)
        .where(o.finished_at < before)
        .limit(batch)
    )


def _in_batches(url: str, table: Any, ids: Any, batch: int) -> int:
    total = 0
    while True:
        with transaction(url) as conn:
            chosen = list(conn.execute(ids).scalars())
            if chosen:
                conn.execute(delete(table).where(table.c.id.in_(chosen)))
        total += len(chosen)
        if len(chosen) < batch:
            return total


def register(fleet: Fleet) -> None:
    """Register the pruning task on the fleet's app."""

    # shared=False: as for agents (fleetworks.agent), bound to this fleet only.
    @fleet.app.task(name=PRUNE_TASK, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def prune_task() -> dict[str, Any]:
        """Delete settled outcomes older than FLEET_OUTCOMES_KEEP_DAYS."""
        keep = fleet.settings.outcomes_keep_days
        if keep is None:
            return {"outcomes": 0, "guard_events": 0, "before": None}
        return prune(fleet.settings.database, keep).as_dict()


def schedule_entry(queue: str) -> dict[str, Any]:
    """The beat entry that prunes, on the control queue beside ``queue``."""
    from fleetworks.reaper import control_queue

    return {
        "task": PRUNE_TASK,
        "schedule": EVERY_S,
        # Nothing is lost by a missed prune: the next one deletes what it left.
        "options": {"misfire": "skip", "expires": EVERY_S, "queue": control_queue(queue)},
    }
