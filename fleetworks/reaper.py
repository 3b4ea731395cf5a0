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

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from pydantic import ValidationError
from sqlalchemy import select

from fleetworks import claims
from fleetworks import constants as c
from fleetworks.db import transaction
from fleetworks.locks import EntityLocks
from fleetworks.models import OUTCOMES, EventKind


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


def restore_stranded(app: Celery, fleet: Any, database_url: str) -> list[str]:
    """Give back to the queue messages a lost worker was holding before any claim.

    A worker that dies (or loses its broker connection) while it holds a
    delivered message it has not started leaves that message in kombu's
    ``unacked`` hash until the visibility timeout. The claim reaper cannot
    see it: there is no claim. Here a message of an agent task is restored
    (through kombu's own ``restore_by_tag``) when it was delivered more than
    ``STRANDED_AFTER_S`` ago, is not a countdown retry still waiting, no
    lease is held on its entity and its key is not claimed by a running task.
    A live worker that still held it would at worst see a duplicate delivery,
    which the claim turns into a counted skip. Redis brokers only: RabbitMQ
    requeues a dead consumer's messages by itself.
    """
    if not app.conf.broker_url.startswith(("redis://", "rediss://")):
        return []
    restored: list[str] = []
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        client = channel.client
        cutoff = time.time() - c.STRANDED_AFTER_S
        tags = client.zrangebyscore(channel.unacked_index_key, "-inf", cutoff, 0, c.REAP_BATCH)
        for raw_tag in tags:
            tag = raw_tag.decode() if isinstance(raw_tag, bytes) else str(raw_tag)
            stranded = _stranded_key(fleet, database_url, client.hget(channel.unacked_key, tag))
            if stranded is None:
                continue
            channel.qos.restore_by_tag(tag, leftmost=True)
            restored.append(stranded)
    return restored


def _stranded_key(fleet: Any, database_url: str, raw: bytes | None) -> str | None:
    """The idempotency key of an unacked agent message nobody is working on."""
    from fleetworks.agent import unpack

    if raw is None:
        return None
    message, _exchange, _routing_key = json.loads(raw)
    headers = message.get("headers") or {}
    spec = fleet.agents.get(headers.get("task"))
    if spec is None or _eta_pending(headers.get("eta")):
        return None
    try:
        args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        payload, key, problem = unpack(tuple(args), kwargs)
        parsed = spec.payload.model_validate(payload) if problem is None else None
    except (ValueError, TypeError, KeyError, ValidationError):
        parsed = None
    if parsed is None:
        return f"unparsable:{headers.get('id')}"  # restored, it will be rejected and acked
    key = key if key is not None else spec.key(parsed)
    entity = spec.entity(parsed) if spec.entity else key
    if fleet.lock.locks.holder(entity) is not None:
        return None
    with transaction(database_url) as db:
        status = db.execute(
            select(OUTCOMES.c.status).where(OUTCOMES.c.idempotency_key == key)
        ).scalar()
    return None if status == "claimed" else str(key)


def _eta_pending(eta: str | None) -> bool:
    if not eta:
        return False
    try:
        due = datetime.fromisoformat(eta)
    except ValueError:
        return False
    if due.tzinfo is None:
        due = due.replace(tzinfo=UTC)
    return due > claims.now() - timedelta(seconds=c.STRANDED_AFTER_S)
