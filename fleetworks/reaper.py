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

A key's first delivery claims nothing before its outcome commits: while it
runs it exists as its in-flight record in Redis (:mod:`fleetworks.inflight`).
:func:`reap_inflight` applies the same rule to those records: one older than
a full lease, whose entity no lease holds and whose key has no row, is
published again from the payload it holds; its next delivery claims first.

:func:`restore_stranded` covers messages a lost worker held before any
claim existed; :func:`recover_lost` those the broker lost between its pop and
its unacked record (:mod:`fleetworks.outbox`). The reaper runs as the task ``fleet.reap``, every
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

from fleetworks import claims, holders, inflight, kombu_redis, message, outbox, stats
from fleetworks import constants as c
from fleetworks.ledger import REAP_BATCH, Ledger, RunId
from fleetworks.locks import EntityLocks
from fleetworks.models import TERMINAL, EventKind, Status
from fleetworks.timing import REAP_INTERVAL_S, Timings

if TYPE_CHECKING:
    from fleetworks.agent import Fleet
    from fleetworks.context import AgentSpec

log = logging.getLogger(__name__)

#: Name of the runtime's reaper task, scheduled by beat.
REAP_TASK = "fleet.reap"
#: What names the control queue beside an agent queue (:func:`control_queue`).
CONTROL_SUFFIX = ".control"


def register(fleet: Fleet) -> None:
    """Register the reaper task on the fleet's app."""

    # shared=False: as for agents (fleetworks.agent), bound to this fleet only.
    @fleet.app.task(name=REAP_TASK, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def reap_task() -> dict[str, Any]:
        """Republish claims whose holder is gone; restore stranded messages."""
        keys = reap(fleet.app, fleet.ledger, fleet.locks, fleet.timings)
        keys += reap_inflight(fleet.app, fleet.ledger, fleet.locks, fleet.timings)
        restored = restore_stranded(
            fleet.app, fleet.agents, fleet.ledger, fleet.locks, fleet.timings
        )
        stats.count(fleet.locks.client, stats.REAPER_RESTORED, len(restored))
        lost = recover_lost(fleet.app, fleet.agents, fleet.ledger, fleet.locks, fleet.timings)
        stats.count(fleet.locks.client, stats.OUTBOX_REPUBLISHED, len(lost))
        return {"republished": len(keys), "restored": len(restored), "recovered": len(lost)}


def control_queue(queue: str) -> str:
    """The queue of the fleet's own housekeeping beside agent queue ``queue``.

    The reaper must run while the agent queue holds a backlog (that is when
    workers die with work in hand): on the agent queue its tick would wait
    behind the backlog and expire. Every fleet worker consumes this queue too,
    and kombu alternates between a worker's queues, so a tick runs as soon as
    a pool process is free.

    A control queue is its own control queue: a claim taken from it (a
    republished key) records it as its queue, and its next republish must
    land where the workers consume, not on ``<queue>.control.control``; a
    batch agent's queue (``<queue>.batch.<agent>``) shares ``<queue>``'s.
    """
    queue = queue.split(c.BATCH_INFIX, 1)[0]
    return queue if queue.endswith(CONTROL_SUFFIX) else f"{queue}{CONTROL_SUFFIX}"


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
    _publish(app, row.agent, row.idempotency_key, row.payload, task_id=row.task_id,
             queue=row.queue, jump_backlog=jump_backlog)  # fmt: skip


def _publish(
    app: Celery,
    agent: str,
    key: str,
    payload: Any,
    *,
    task_id: str | None,
    queue: str | None,
    jump_backlog: bool,
) -> None:
    options: dict[str, Any] = {"task_id": task_id} if task_id else {}
    if queue:
        options["queue"] = control_queue(queue) if jump_backlog else queue
    with outbox.collecting(app, agent, hold=False):
        app.send_task(agent, kwargs=message.pack(payload, key), **options)


def reap_inflight(app: Celery, ledger: Ledger, locks: EntityLocks, timings: Timings) -> list[str]:
    """Republish runs whose holder is gone from their in-flight records
    (:mod:`fleetworks.inflight`): a record older than a full lease whose
    entity no lease holds, and whose key has no row in the database. A key
    found final drops its record (its holder committed, then died before
    its release); a key with a ``claimed`` or ``failed`` row is left to
    :func:`reap` and the retry, and looked at again a lease later. Returns
    the idempotency keys republished."""
    client = locks.client
    now = time.time()
    republished: list[str] = []
    for record in inflight.older_than(client, now - timings.orphaned_after_s, REAP_BATCH):
        if locks.holder(record.entity) is not None:
            continue  # its run renews the lease: still running
        status = ledger.status(record.key)
        if status in TERMINAL:
            inflight.forget(client, record)
            continue
        if status is not None:
            inflight.touch(client, record.key, record.owner, now)
            continue
        # Not again before republish_after_s: the new delivery rewrites the record.
        if not inflight.touch(client, record.key, record.owner, now + timings.republish_after_s
                              - timings.orphaned_after_s):  # fmt: skip
            continue  # a new delivery rewrote it meanwhile
        _publish(app, record.agent, record.key, record.payload, task_id=record.task_id,
                 queue=record.queue, jump_backlog=True)  # fmt: skip
        run = RunId(record.agent, record.key, record.task_id, "reaper")
        ledger.event(run, EventKind.REPUBLISHED, f"in flight since {record.at:.3f}; "
                     f"holder {record.worker} gone")  # fmt: skip
        republished.append(record.key)
    return republished


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
    """Give back to the queue messages that no live worker holds.

    A worker that dies whole (or loses its broker connection and forgets what
    it received) leaves its delivered messages in kombu's ``unacked`` hash
    until the visibility timeout. Every fleet worker writes which deliveries
    it holds every second (:mod:`fleetworks.holders`); here an unacked agent
    message is restored (through kombu's own restore) when no live worker
    holds it, it was delivered before every live worker's latest snapshot,
    it is not a countdown retry still waiting, and no lease its own delivery
    took is still alive (a running task renews its lease: a worker killed
    whole stops renewing, and its message comes back once that lease ends).
    A lease the dead delivery held is freed on the way, so the restored
    message runs at once with a higher fencing token. Misjudged (a worker
    stalled past the staleness bound), a message is delivered twice, and its
    key makes the second delivery a counted skip. Redis brokers only:
    RabbitMQ requeues a dead consumer's messages by itself.
    """
    if not kombu_redis.is_redis(app):
        return []
    client = locks.client
    held = holders.live(client)
    restored: list[str] = []
    for message_ in list(kombu_redis.stranded_messages(app, held.settled_before, REAP_BATCH)):
        if message_.tag in held.tags or _eta_pending(message_.headers.get("eta"), timings):
            continue
        spec = agents.get(str(message_.headers.get("task")))
        if spec is None:
            continue
        key = _stranded_key(spec, message_, locks)
        if key is None:
            continue
        # kombu puts it back at the far end of its queue: date its outbox
        # record anew first, so it is not taken for lost while it waits there.
        outbox.touch(client, str(message_.headers.get("id") or ""))
        kombu_redis.restore(app, message_.tag)
        log.warning("restored stranded message %s (%s)", message_.headers.get("id"), key)
        restored.append(key)
    return restored


def _stranded_key(spec: AgentSpec, held: kombu_redis.Unacked, locks: EntityLocks) -> str | None:
    """The idempotency key of an unacked agent message no live worker holds,
    or None while a lease its delivery took is alive (its task is running)."""
    try:
        args, kwargs = kombu_redis.decode_body(held.body)
        parsed = message.unpack(args, kwargs)
        if isinstance(parsed, message.Problem):
            raise ValueError(parsed.reason)
        identity = spec.identify(spec.payload.model_validate(parsed.payload), parsed.key)
    except (ValueError, TypeError, ValidationError):
        return f"unparsable:{held.headers.get('id')}"  # restored, it will be rejected and acked
    holder = locks.holder(identity.entity) or ""
    if holder.startswith(held.tag + ":"):
        return None  # its own lease is alive: the task runs (or just died; wait for the TTL)
    return identity.key


def recover_lost(
    app: Celery,
    agents: Mapping[str, AgentSpec],
    ledger: Ledger,
    locks: EntityLocks,
    timings: Timings,
) -> list[str]:
    """Publish again the recorded agent messages that are nowhere: not queued,
    not unacked, their key neither claimed nor settled (see
    :mod:`fleetworks.outbox` for the rule and why it is safe). Returns the
    task ids republished. Redis brokers only."""
    if not kombu_redis.is_redis(app):
        return []
    client = locks.client
    items = outbox.overdue(client, time.time() - timings.outbox_after_s, REAP_BATCH)
    if not items:
        return []
    lost = _nowhere(app, items)
    recovered: list[str] = []
    for item in lost:
        spec = agents.get(str(item.record.get("task")))
        key = _recorded_key(spec, item)
        status = ledger.status(key) if key else None
        if status == Status.CLAIMED or status in TERMINAL:
            outbox.forget(client, item.task_id)  # its key ran, or runs, from another message
            continue
        if not outbox.still_recorded(client, item):
            continue  # a run leased it meanwhile, or it was published anew
        outbox.republish(app, item)
        log.warning("republished lost message %s (%s)", item.task_id, key or "no key")
        if spec is not None and key:
            run = RunId(spec.name, key, item.task_id, "reaper")
            ledger.event(run, EventKind.REPUBLISHED, "lost by the broker: in no queue, unacked "
                         "entry or claim")  # fmt: skip
        recovered.append(item.task_id)
    return recovered


def _nowhere(app: Celery, items: list[outbox.Recorded]) -> list[outbox.Recorded]:
    """The recorded messages found in no queue and no unacked entry."""
    default = str(app.conf.task_default_queue)

    def queue_of(item: outbox.Recorded) -> str:
        return str(item.record.get("queue") or default)

    # Queues first, then unacked: a message moving from one to the other
    # between the two reads is seen in one of them.
    waiting = {
        q: kombu_redis.oldest_waiting(app, q, c.SENT_AT_HEADER)
        for q in {queue_of(i) for i in items}
    }
    held = kombu_redis.unacked_task_ids(app)
    candidates: dict[str, list[outbox.Recorded]] = {}
    for item in items:
        busy, oldest = waiting[queue_of(item)]
        if item.task_id in held or (busy and (oldest is None or oldest <= item.at)):
            continue  # unacked, or may still be waiting in its queue
        candidates.setdefault(queue_of(item), []).append(item)
    lost: list[outbox.Recorded] = []
    for queue, found in candidates.items():
        ids = {item.task_id for item in found}
        waiting_now = kombu_redis.waiting_ids(app, queue, ids, outbox.SCAN_LIMIT) or set()
        lost += [item for item in found if item.task_id not in waiting_now]
    if lost:  # popped since the first read: unacked now
        held = kombu_redis.unacked_task_ids(app)
        lost = [item for item in lost if item.task_id not in held]
    return lost


def _recorded_key(spec: AgentSpec | None, item: outbox.Recorded) -> str | None:
    """The idempotency key of a recorded message, or None if it has none."""
    if spec is None:
        return None
    parsed = message.unpack(tuple(item.record.get("args") or ()), item.record.get("kwargs") or {})
    if isinstance(parsed, message.Problem):
        return None
    try:
        return spec.identify(spec.payload.model_validate(parsed.payload), parsed.key).key
    except (ValueError, TypeError, ValidationError):
        return None


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
