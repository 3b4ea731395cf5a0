"""The reaper: republishes claims whose holder is gone, within seconds.

Celery on Redis recovers a dead worker's unacknowledged messages only after
the visibility timeout (an hour by default, and kombu sweeps every ~100 s).
fleetworks keeps that as the backstop and adds a faster path: a claim row
that is still ``claimed`` after a full lease, while no lease on its entity is
held in Redis, has lost its holder (a live holder renews its lease, and
writes its outcome before releasing it). The reaper publishes the stored
payload again, with the same task id, to the same queue. The new delivery
takes over the claim with a higher fencing token; the broker's own late
redelivery of the original message then finds the key done and is counted as
a duplicate, never run twice. A ``failed`` claim whose retry is long overdue
(its retry message died with a worker) is republished the same way.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import Celery

from fleetworks import claims
from fleetworks import constants as c
from fleetworks.db import transaction
from fleetworks.locks import EntityLocks
from fleetworks.models import EventKind


def reap(app: Celery, database_url: str, locks: EntityLocks) -> list[str]:
    """Republish orphaned claims; returns the idempotency keys republished."""
    at = claims.now()
    with transaction(database_url) as conn:
        rows = claims.reapable(
            conn,
            claimed_before=at - timedelta(seconds=c.LEASE_TTL_MAX_S),
            failed_before=at - timedelta(seconds=c.RETRY_BACKOFF_MAX_S + c.VISIBILITY_SLACK_S),
            reaped_before=at - timedelta(seconds=c.REPUBLISH_AFTER_S),
            limit=c.REAP_BATCH,
        )
    orphans = [row for row in rows if locks.holder(row.entity_key) is None]
    for row in orphans:
        _republish(app, row)
        with transaction(database_url) as conn:
            claims.mark_reaped(conn, row.id)
            claims.record_event(
                conn,
                EventKind.REPUBLISHED,
                agent=row.agent,
                idempotency_key=row.idempotency_key,
                task_id=row.task_id,
                worker="reaper",
                detail=f"{row.status} since {row.started_at}; holder {row.worker} gone",
            )
    return [row.idempotency_key for row in orphans]


def _republish(app: Celery, row: Any) -> None:
    options: dict[str, Any] = {"task_id": row.task_id} if row.task_id else {}
    if row.queue:
        options["queue"] = row.queue
    app.send_task(row.agent, kwargs={"payload": row.payload, "key": row.idempotency_key}, **options)


def replay(app: Celery, database_url: str, outcome_id: int) -> Any:
    """Run a ``dead`` outcome again on purpose: a fresh delivery budget, same key.

    Returns the row as it was when it died.
    """
    with transaction(database_url) as conn:
        row = claims.revive(conn, outcome_id)
        claims.record_event(
            conn,
            EventKind.REPLAYED,
            agent=row.agent,
            idempotency_key=row.idempotency_key,
            task_id=row.task_id,
            worker="replay",
            detail=f"replayed after {row.attempts} attempts; last error: {row.error}",
        )
    _republish(app, row)
    return row
