"""The outbox closes the Redis transport's lost-message window.

A message popped by a consumer whose connection closes before kombu records
it as unacknowledged is in no queue and no ``unacked`` entry; the outbox
keeps its record until a run leases its entity, and the reaper publishes it
again. Real worker, real broker, real database.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import func, select

from fleetworks import constants as c
from fleetworks import outbox
from fleetworks.db import transaction
from fleetworks.enqueue import enqueue, enqueue_many
from fleetworks.ledger import Ledger
from fleetworks.locks import EntityLocks
from fleetworks.models import GUARD_EVENTS, OUTCOMES, PROBE_EFFECTS, EventKind
from fleetworks.reaper import recover_lost
from fleetworks.timing import Timings
from tests.conftest import BROKER_URL, start_worker, wait_for


def _reaper(database_url: str, client: redis.Redis, after_s: float | None = None) -> Any:
    """``recover_lost`` as the reaper task runs it, optionally with a shorter bound."""
    from config import app, fleet

    timings = Timings.derive(60.0)
    if after_s is not None:
        timings = dataclasses.replace(timings, outbox_after_s=after_s)
    ledger, locks = Ledger(database_url), EntityLocks(client)
    return lambda: recover_lost(app, fleet.agents, ledger, locks, timings)


def _status(url: str, key: str) -> str | None:
    with transaction(url) as conn:
        found = conn.execute(
            select(OUTCOMES.c.status).where(OUTCOMES.c.idempotency_key == key)
        ).scalar()
    return None if found is None else str(found)


def _count(url: str, query: Any) -> int:
    with transaction(url) as conn:
        return int(conn.execute(query).scalar_one())


def test_a_message_popped_and_never_recorded_as_unacked_runs_once(
    database_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """The window itself: a consumer pops the message and its connection closes
    before the unacked record; the reaper publishes it again and it runs once."""
    from config import app

    queue = f"outbox-{uuid.uuid4().hex[:8]}"
    name = f"pop{uuid.uuid4().hex[:6]}"
    task_id = enqueue(app, "probe.run", {"id": name, "work_ms": 10}, queue=queue)
    assert redis_client.hexists(c.OUTBOX_KEY, task_id), "recorded before it left"
    # A consumer's BRPOP takes it; the connection closes before kombu's
    # HSET unacked (what CLIENT KILL, a restart or a cut cable does).
    consumer = redis.Redis.from_url(BROKER_URL)
    popped = consumer.brpop([queue], timeout=5)
    consumer.connection_pool.disconnect()
    assert popped is not None and task_id.encode() in popped[1]
    broker = redis.Redis.from_url(BROKER_URL)
    assert broker.llen(queue) == 0 and not any(
        task_id.encode() in raw for raw in broker.hvals("unacked")
    ), "lost: in no queue and no unacked entry"

    reaper = _reaper(database_url, redis_client)
    # Not before the bound: it might still be on its way to the queue.
    assert reaper() == []
    w = start_worker(database_url, tmp_path, f"outbox-{os.getpid()}", queue=queue)
    try:
        assert wait_for(reaper, timeout_s=Timings.derive(60.0).outbox_after_s + 5) == [task_id]
        wait_for(lambda: _status(database_url, f"probe:{name}") == "succeeded", 30)
        effects = _count(
            database_url,
            select(func.count()).where(PROBE_EFFECTS.c.effect_key == name),
        )
        assert effects == 1
        republished = select(func.count()).where(
            (GUARD_EVENTS.c.kind == EventKind.REPUBLISHED)
            & (GUARD_EVENTS.c.idempotency_key == f"probe:{name}")
        )
        assert _count(database_url, republished) == 1
        # The run's lease dropped the record: nothing more to recover.
        wait_for(lambda: not redis_client.hexists(c.OUTBOX_KEY, task_id), 10)
        assert reaper() == []
    finally:
        w.child.stop(15)


def test_a_message_recorded_and_never_published_is_published_and_runs_once(
    database_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """The publisher recorded the message and died before its LPUSH."""
    from config import app

    queue = f"outbox-{uuid.uuid4().hex[:8]}"
    name = f"unsent{uuid.uuid4().hex[:6]}"
    task_id = str(uuid.uuid4())
    headers = {"task": "probe.run", "id": task_id, c.SENT_AT_HEADER: time.time() - 10}
    body = ([], {"payload": {"id": name, "work_ms": 10}}, {})
    with outbox.collecting(app, "probe.run", hold=False):
        outbox.on_publish(headers, body, queue, {})
    assert outbox.pending_count(redis_client) >= 1
    w = start_worker(database_url, tmp_path, f"unsent-{os.getpid()}", queue=queue)
    try:
        assert _reaper(database_url, redis_client)() == [task_id]
        wait_for(lambda: _status(database_url, f"probe:{name}") == "succeeded", 30)
        assert (
            _count(database_url, select(func.count()).where(PROBE_EFFECTS.c.effect_key == name))
            == 1
        )
        with transaction(database_url) as conn:
            stored = conn.execute(
                select(OUTCOMES.c.task_id).where(OUTCOMES.c.idempotency_key == f"probe:{name}")
            ).scalar()
        assert stored == task_id, "published again under the same task id"
    finally:
        w.child.stop(15)


def test_waiting_messages_are_not_taken_for_lost(
    database_url: str, redis_client: redis.Redis
) -> None:
    """Records of messages still in their queue (no worker yet) stay put, however
    old: the queue's oldest waiting message is no newer than they are."""
    from config import app

    queue = f"outbox-{uuid.uuid4().hex[:8]}"
    ids = enqueue_many(
        app, "probe.run", [{"id": f"wait-{uuid.uuid4().hex[:6]}-{i}"} for i in range(1200)],
        queue=queue,
    )  # fmt: skip
    assert all(redis_client.hmget(c.OUTBOX_KEY, ids)), "every message of the fan-out recorded"
    assert redis.Redis.from_url(BROKER_URL).llen(queue) == 1200
    assert _reaper(database_url, redis_client, after_s=0.0)() == []
    # Once the queue's head is newer than a record, that record's message is gone.
    broker = redis.Redis.from_url(BROKER_URL)
    for _ in range(300):
        broker.rpop(queue)
    head = float(redis_client.zscore(c.OUTBOX_AT_KEY, ids[300]) or 0)
    # The popped ones published strictly before the new head (a tie is kept: it
    # might be the head's twin still waiting).
    expected = {t for t in ids[:300] if float(redis_client.zscore(c.OUTBOX_AT_KEY, t) or 0) < head}
    assert len(expected) >= 290
    lost = _reaper(database_url, redis_client, after_s=0.0)()
    assert set(lost) == expected, "exactly the popped ones"
    broker.delete(queue)
    outbox.forget(redis_client, "")  # no-op on an empty id
    for task_id in ids:
        outbox.forget(redis_client, task_id)


def test_a_message_put_back_at_the_far_end_is_not_taken_for_lost(
    database_url: str, redis_client: redis.Redis
) -> None:
    """kombu puts a restored message back on the left, behind newer ones: the
    first-in, first-out reading alone would call it lost; the queue is read
    through, and the reaper's own restores date the record anew."""
    from config import app

    queue = f"outbox-{uuid.uuid4().hex[:8]}"
    ids = enqueue_many(
        app, "probe.run", [{"id": f"back-{uuid.uuid4().hex[:6]}-{i}"} for i in range(20)],
        queue=queue,
    )  # fmt: skip
    broker = redis.Redis.from_url(BROKER_URL)
    oldest = broker.rpop(queue)
    assert oldest is not None and ids[0].encode() in oldest
    broker.lpush(queue, oldest)  # back at the far end, its old date kept
    assert _reaper(database_url, redis_client, after_s=0.0)() == []
    outbox.touch(redis_client, ids[0])
    assert float(redis_client.zscore(c.OUTBOX_AT_KEY, ids[0]) or 0) > float(
        redis_client.zscore(c.OUTBOX_AT_KEY, ids[-1]) or 0
    )
    broker.delete(queue)
    for task_id in ids:
        outbox.forget(redis_client, task_id)
