"""The reaper: republishes claims whose holder is gone, within seconds.

Celery on Redis recovers a dead worker's unacknowledged messages only after
the visibility timeout (an hour by default, and kombu sweeps every ~100 s).
fleetworks keeps that as the backstop and adds a faster path: a claim row
that is still ``claimed`` after a full lease, while no lease on its entity is
held in Redis, has lost its holder (a live holder renews its lease, and
writes its outcome before releasing it). The reaper publishes the stored
payload again, with the same task id, on the queue's control queue (which
every fleet worker of the queue consumes, so it does not wait behind the
backlog while the old holder might come back). The new delivery
takes over the claim with a higher fencing token; the broker's own late
redelivery of the original message then finds the key done and is counted as
a duplicate, never run twice. A ``failed`` claim whose retry is long overdue
(its retry message died with a worker) is republished the same way.

:func:`restore_stranded` covers messages a lost worker held before any
claim existed. The reaper runs as the task ``fleet.reap``, every
``REAP_INTERVAL_S`` on the fleet's beat (see :func:`schedule_entry`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery import Celery
from pydantic import ValidationError

from fleetworks import claims, kombu_redis, message, stats
from fleetworks.ledger import REAP_BATCH, Ledger
from fleetworks.locks import EntityLocks
from fleetworks.models import Status
from fleetworks.timing import REAP_INTERVAL_S, Timings

if TYPE_CHECKING:
    from fleetworks.agent import Fleet
    from fleetworks.context import AgentSpec

log = logging.getLogger(__name__)

#: Name of the runtime's reaper task, scheduled by beat.
REAP_TASK = "fleet.reap"


def register(fleet: Fleet) -> None:
    """Register the reaper task on the fleet's app."""

    @fleet.app.task(name=REAP_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
    def reap_task() -> dict[str, Any]:
        """Republish claims whose holder is gone; restore stranded messages."""
        keys = reap(fleet.app, fleet.ledger, fleet.locks, fleet.timings)
        restored = restore_stranded(
            fleet.app, fleet.agents, fleet.ledger, fleet.locks, fleet.timings
        )
        stats.count(fleet.locks.client, stats.REAPER_RESTORED, len(restored))
        return {"republished": len(keys), "restored": len(restored)}


def control_queue(queue: str) -> str:
    """The queue of the fleet's own housekeeping beside agent queue ``queue``.

    The reaper must run while the agent queue holds a backlog (that is when
    workers die with work in hand): on the agent queue its tick would wait
    behind the backlog and expire. Every fleet worker consumes this queue too,
    and kombu alternates between a worker's queues, so a tick runs as soon as
    a pool process is free.
    """
    return f"{queue}.control"


def schedule_entry(queue: str) -> dict[str, Any]:
    """The beat entry that runs the reaper for agent queue ``queue``."""
    return {
        "task": REAP_TASK,
        "schedule": REAP_INTERVAL_S,
        # The reaper looks at the present: a missed run has nothing to do.
        "options": {"misfire": "skip", "expires": REAP_INTERVAL_S, "queue": control_queue(queue)},
    }


def reap(app: Celery, ledger: Ledger, locks: EntityLocks, timings: Timings) -> list[str]:
    """Republish orphaned claims; returns the idempotency keys republished."""
    orphans = [row for row in ledger.reapable(timings) if locks.holder(row.entity_key) is None]
    for row in orphans:
        _republish(app, row, jump_backlog=True)
        ledger.republished(row)
    return [row.idempotency_key for row in orphans]


def _republish(app: Celery, row: Any, *, jump_backlog: bool = False) -> None:
    """Publish a claim's stored payload again, same task id; with ``jump_backlog``,
    to its queue's control queue, so the takeover does not wait behind the
    backlog while the old holder may come back (every fleet worker of that
    queue consumes both)."""
    options: dict[str, Any] = {"task_id": row.task_id} if row.task_id else {}
    if row.queue:
        options["queue"] = control_queue(row.queue) if jump_backlog else row.queue
    app.send_task(row.agent, kwargs=message.pack(row.payload, row.idempotency_key), **options)


def replay(app: Celery, ledger: Ledger, outcome_id: int) -> Any:
    """Run a ``dead`` outcome again on purpose: a fresh delivery budget, same key.

    Returns the row as it was when it died.
    """
    row = ledger.revive(outcome_id)
    _republish(app, row)
    return row


def restore_stranded(
    app: Celery,
    agents: Mapping[str, AgentSpec],
    ledger: Ledger,
    locks: EntityLocks,
    timings: Timings,
) -> list[str]:
    """Give back to the queue messages a lost worker was holding before any claim.

    A worker that dies (or loses its broker connection) while it holds a
    delivered message it has not started leaves that message in kombu's
    ``unacked`` hash until the visibility timeout. The claim reaper cannot
    see it: there is no claim. Here a message of an agent task is restored
    (through kombu's own restore) when it was delivered more than
    ``stranded_after_s`` ago, is not a countdown retry still waiting, no
    lease is held on its entity and its key is not claimed by a running task.
    A live worker that still held it would at worst see a duplicate delivery,
    which the claim turns into a counted skip. Redis brokers only: RabbitMQ
    requeues a dead consumer's messages by itself.
    """
    if not kombu_redis.is_redis(app):
        return []
    restored: list[str] = []
    cutoff = time.time() - timings.stranded_after_s
    for held in list(kombu_redis.stranded_messages(app, cutoff, REAP_BATCH)):
        spec = agents.get(str(held.headers.get("task")))
        if spec is None or _eta_pending(held.headers.get("eta"), timings):
            continue
        key = _stranded_key(spec, held, ledger, locks)
        if key is None:
            continue
        kombu_redis.restore(app, held.tag)
        log.warning("restored stranded message %s (%s)", held.headers.get("id"), key)
        restored.append(key)
    return restored


def _stranded_key(
    spec: AgentSpec, held: kombu_redis.Unacked, ledger: Ledger, locks: EntityLocks
) -> str | None:
    """The idempotency key of an unacked agent message nobody is working on."""
    try:
        args, kwargs = kombu_redis.decode_body(held.body)
        parsed = message.unpack(args, kwargs)
        if isinstance(parsed, message.Problem):
            raise ValueError(parsed.reason)
        identity = spec.identify(spec.payload.model_validate(parsed.payload), parsed.key)
    except (ValueError, TypeError, ValidationError):
        return f"unparsable:{held.headers.get('id')}"  # restored, it will be rejected and acked
    if locks.holder(identity.entity) is not None:
        return None
    return None if ledger.status(identity.key) == Status.CLAIMED else identity.key


def _eta_pending(eta: str | None, timings: Timings) -> bool:
    if not eta:
        return False
    try:
        due = datetime.fromisoformat(eta)
    except ValueError:
        return False
    if due.tzinfo is None:
        due = due.replace(tzinfo=UTC)
    return due > claims.now() - timedelta(seconds=timings.stranded_after_s)
