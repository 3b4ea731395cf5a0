"""Read-only questions asked of the results database by the CLI and runs.

"Which of these tasks have settled?" is answered from the durable record
alone: a task id has settled when it is the task id of a terminal outcome
row, or of a guard event that ends a delivery (a skipped duplicate or a
skip on lock contention).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from sqlalchemy import Connection, distinct, func, select

from fleetworks.db import transaction
from fleetworks.models import GUARD_EVENTS, OUTCOMES, EventKind, Status

_o = OUTCOMES
_e = GUARD_EVENTS

#: Outcome states that end a delivery (``failed`` rows are final only once
#: their task stopped retrying, which the caller judges from the broker).
SETTLED_STATUSES = (Status.SUCCEEDED, Status.REJECTED, Status.FAILED)
#: Guard events that end a delivery without an outcome row of its own.
SETTLING_EVENTS = (EventKind.SKIPPED_DUPLICATE, EventKind.SKIPPED_LOCKED)
_CHUNK = 500


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def settled_tasks(conn: Connection, task_ids: Sequence[str]) -> dict[str, str]:
    """``task id -> how it settled`` for those of ``task_ids`` that have."""
    settled: dict[str, str] = {}
    for chunk in _chunks(task_ids):
        rows = conn.execute(
            select(_o.c.task_id, _o.c.status).where(
                _o.c.task_id.in_(chunk) & _o.c.status.in_(SETTLED_STATUSES)
            )
        )
        settled.update({r.task_id: r.status for r in rows})
        events = conn.execute(
            select(_e.c.task_id, _e.c.kind).where(
                _e.c.task_id.in_(chunk) & _e.c.kind.in_(SETTLING_EVENTS)
            )
        )
        for r in events:
            settled.setdefault(r.task_id, r.kind)
    return settled


def event_counts(conn: Connection, task_ids: Sequence[str]) -> dict[str, int]:
    """How many guard events of each kind the given tasks produced."""
    counts: dict[str, int] = {}
    for chunk in _chunks(task_ids):
        rows = conn.execute(
            select(_e.c.kind, func.count()).where(_e.c.task_id.in_(chunk)).group_by(_e.c.kind)
        )
        for kind, n in rows:
            counts[kind] = counts.get(kind, 0) + int(n)
    return counts


def distinct_tasks_with_event(conn: Connection, kind: EventKind, task_ids: Sequence[str]) -> int:
    total = 0
    for chunk in _chunks(task_ids):
        total += int(
            conn.execute(
                select(func.count(distinct(_e.c.task_id))).where(
                    (_e.c.kind == kind) & _e.c.task_id.in_(chunk)
                )
            ).scalar_one()
        )
    return total


def list_outcomes(
    url: str, *, agent: str | None, status: str | None, limit: int
) -> list[dict[str, Any]]:
    query = select(OUTCOMES).order_by(_o.c.id.desc()).limit(limit)
    if agent:
        query = query.where(_o.c.agent == agent)
    if status:
        query = query.where(_o.c.status == status)
    with transaction(url) as conn:
        rows = conn.execute(query).mappings().all()
    return [_jsonable(dict(r)) for r in rows]


def in_flight(
    client: redis.Redis, url: str, *, agent: str | None, limit: int, now: float
) -> list[dict[str, Any]]:
    """The runs in flight, longest running first, from the records their
    leases keep in Redis (:mod:`fleetworks.inflight`), each with its key's
    outcome row status: none for a key's first delivery (its row is written
    with its outcome), ``claimed`` or ``failed`` for a later one. A record
    outlives a holder that died until the reaper takes it (within a lease)."""
    from fleetworks import inflight

    records = [r for r in inflight.all_records(client) if agent is None or r.agent == agent]
    records = records[:limit]
    statuses: dict[str, str] = {}
    with transaction(url) as conn:
        for chunk in _chunks([r.key for r in records]):
            query = select(_o.c.idempotency_key, _o.c.status).where(_o.c.idempotency_key.in_(chunk))
            statuses.update({str(k): str(v) for k, v in conn.execute(query)})
    return [
        {
            "idempotency_key": r.key,
            "agent": r.agent,
            "entity": r.entity,
            "task_id": r.task_id,
            "worker": r.worker,
            "queue": r.queue,
            "since": datetime.fromtimestamp(r.at, UTC).isoformat(),
            "running_s": round(max(0.0, now - r.at), 3),
            "row": statuses.get(r.key),
        }
        for r in records
    ]


def status_counts(url: str, agent: str | None = None) -> dict[str, int]:
    query = select(_o.c.status, func.count()).group_by(_o.c.status)
    if agent:
        query = query.where(_o.c.agent == agent)
    with transaction(url) as conn:
        return {status: int(n) for status, n in conn.execute(query)}


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
