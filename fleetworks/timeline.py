"""``fleetworks timeline KEY``: everything the results database knows of one
key or entity, in time order.

What matches ``KEY``: outcome rows whose idempotency key is ``KEY``, starts
with ``KEY|`` (a reprice ``sku-42|<tick>``, a continuation ``<key>|wait:<id>``)
or whose entity is ``KEY``; their guard events (duplicates skipped, lock
contention, failed attempts, stale refusals, republished by the reaper,
replays); the events their runs emitted and the waits they stored; and every
state version written for ``KEY`` or for those rows' entities. Each entry
has its time, what happened, the agent and key, the worker and the fencing
token where known.

Limits: an outcome row keeps the latest claim only (its attempt count says
how many there were; each failed attempt is a guard event), and a delivery
that never reached the guard (a message lost before a worker took it) is not
in the database at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_, select

from fleetworks.db import transaction
from fleetworks.models import AGENT_STATE_HISTORY, EVENTS, GUARD_EVENTS, OUTCOMES, WAITS


@dataclass(frozen=True, slots=True)
class Entry:
    at: str | None
    what: str
    agent: str | None
    key: str | None
    worker: str | None = None
    token: int | None = None
    detail: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(at: datetime | None) -> str | None:
    if at is None:
        return None
    return (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).isoformat()


def timeline(url: str, key: str, limit: int = 1000) -> list[Entry]:
    """Every entry for ``key``, oldest first (at most ``limit`` rows per source)."""
    o, g, h = OUTCOMES.c, GUARD_EVENTS.c, AGENT_STATE_HISTORY.c
    entries: list[Entry] = []
    matches = or_(o.idempotency_key == key, o.idempotency_key.like(f"{key}|%"), o.entity_key == key)
    with transaction(url) as conn:
        rows = conn.execute(select(OUTCOMES).where(matches).limit(limit)).all()
        keys = {key, *(r.idempotency_key for r in rows)}
        entities = {key, *(r.entity_key for r in rows)}
        for r in rows:
            entries.append(Entry(_iso(r.started_at), f"claimed (attempt {r.attempts})",
                                 r.agent, r.idempotency_key, r.worker, r.fencing_token,
                                 f"task {r.task_id}"))  # fmt: skip
            if r.finished_at is not None or r.status != "claimed":
                detail = r.error or (str(r.result) if r.result is not None else None)
                entries.append(Entry(_iso(r.finished_at), r.status, r.agent, r.idempotency_key,
                                     r.worker, r.fencing_token, detail))  # fmt: skip
        for e in conn.execute(
            select(GUARD_EVENTS).where(g.idempotency_key.in_(keys)).order_by(g.id).limit(limit)
        ):
            entries.append(Entry(_iso(e.at), e.kind, e.agent, e.idempotency_key, e.worker,
                                 None, e.detail))  # fmt: skip
        for ev in conn.execute(
            select(EVENTS).where(EVENTS.c.source_key.in_(keys)).order_by(EVENTS.c.position)
        ):
            entries.append(Entry(_iso(ev.created_at), f"emitted {ev.topic}", ev.source_agent,
                                 ev.source_key, None, None, f"event {ev.event_id}"))  # fmt: skip
        for w in conn.execute(select(WAITS).where(WAITS.c.key.in_(keys)).order_by(WAITS.c.id)):
            entries.append(Entry(_iso(w.created_at), f"waiting for {w.topic}", w.agent, w.key,
                                 None, None, f"wait {w.id}, match {w.match}, until "
                                 f"{_iso(w.deadline)}"))  # fmt: skip
            if w.resolved_at is not None:
                how = f"by event {w.event_id}" if w.event_id else "by its deadline"
                entries.append(Entry(_iso(w.resolved_at), f"wait {w.state}", w.agent, w.key,
                                     None, None, f"wait {w.id} {how}"))  # fmt: skip
        for v in conn.execute(
            select(AGENT_STATE_HISTORY)
            .where(h.entity_key.in_(entities))
            .order_by(h.id)
            .limit(limit)
        ):
            entries.append(Entry(_iso(v.written_at), f"state v{v.version}", v.agent,
                                 v.entity_key, v.writer, v.fencing_token,
                                 str(v.state)))  # fmt: skip
    return sorted(entries, key=lambda e: e.at or "")
