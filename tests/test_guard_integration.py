"""The guard against a real worker, real Redis and each real results database."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import redis
from sqlalchemy import func, select

from agents.mentions import MentionFeed
from fleetworks import inflight
from fleetworks.constants import FENCE_KEY
from fleetworks.db import transaction
from fleetworks.models import EventKind, GuardEvent, Outcome, ProbeEffect
from tasks.schema import MENTIONS, RESPONSES
from tests.conftest import LOCKS_URL, Worker, broker_idle, wait_for

_o = Outcome.__table__.c
_e = GuardEvent.__table__.c


def outcome(url: str, key: str) -> Any:
    with transaction(url) as conn:
        return conn.execute(select(Outcome.__table__).where(_o.idempotency_key == key)).first()


def events(url: str, kind: EventKind, key: str) -> int:
    with transaction(url) as conn:
        return int(
            conn.execute(
                select(func.count(func.distinct(_e.task_id))).where(
                    (_e.kind == kind) & (_e.idempotency_key == key)
                )
            ).scalar_one()
        )


def test_same_mention_twenty_times_one_response(worker: Worker) -> None:
    """20 deliveries of one mention, 10 of them racing from threads: one response."""
    # Given a mention the agent will answer (a question)
    mention = next(
        m for m in MentionFeed(3).stream(50, 0.0, "race") if "?" in m.text and "http" not in m.text
    )
    payload = mention.model_dump()
    key = f"mention:{mention.mention_id}"
    # When it is enqueued 10 times in a row and 10 times concurrently from threads
    for _ in range(10):
        worker.enqueue("mentions.respond", payload)
    barrier = threading.Barrier(10)

    def send() -> None:
        barrier.wait()
        worker.enqueue("mentions.respond", payload)

    threads = [threading.Thread(target=send) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then exactly one run succeeds and the other 19 are counted duplicates
    wait_for(
        lambda: events(worker.database_url, EventKind.SKIPPED_DUPLICATE, key) == 19,
        what="19 skipped duplicates",
    )
    row = outcome(worker.database_url, key)
    assert row.status == "succeeded"
    assert row.attempts == 1
    with transaction(worker.database_url) as conn:
        responses = conn.execute(
            select(func.count()).where(RESPONSES.c.mention_id == mention.mention_id)
        ).scalar_one()
        status = conn.execute(
            select(MENTIONS.c.status).where(MENTIONS.c.mention_id == mention.mention_id)
        ).scalar_one()
    assert responses == 1
    assert status == "responded"
    assert events(worker.database_url, EventKind.DUPLICATE_EFFECT, key) == 0


def test_invalid_payload_is_rejected_once_and_not_retried(worker: Worker) -> None:
    """A malformed payload becomes one `rejected` row; the message is acked, not retried."""
    task_id = worker.enqueue("mentions.respond", {"mention_id": "ok-1", "sentiment": "very"})
    row = wait_for(
        lambda: outcome(worker.database_url, f"rejected:{task_id}"), what="the rejected row"
    )
    assert row.status == "rejected"
    assert row.attempts == 1
    assert "sentiment" in row.error and "brand: Field required" in row.error
    wait_for(lambda: broker_idle(worker.queue), what="the message to be acked")
    # The worker is still serving: a valid probe after it runs.
    worker.enqueue("probe.run", {"id": "after-reject"})
    wait_for(lambda: outcome(worker.database_url, "probe:after-reject"), what="the next task")
    assert outcome(worker.database_url, f"rejected:{task_id}").attempts == 1


def test_wrong_task_shape_is_rejected(worker: Worker) -> None:
    """Positional arguments or a non-object payload are rejected with a clear reason."""
    from config import app

    bad_args = app.send_task("probe.run", args=[1, 2], queue=worker.queue).id
    bad_payload = worker.enqueue("probe.run", ["a", "list"])
    for task_id, reason in ((bad_args, "take payload="), (bad_payload, "JSON object")):
        row = wait_for(lambda t=task_id: outcome(worker.database_url, f"rejected:{t}"))
        assert row.status == "rejected"
        assert reason in row.error


def test_killed_pool_child_is_redelivered_and_effect_happens_once(worker: Worker) -> None:
    """SIGKILL of the pool child running a task: the task runs again, one effect."""
    # Given a probe task that takes 2 s before its effect, leased by a pool
    # child (its in-flight record names the child; no outcome row yet)
    worker.enqueue("probe.run", {"id": "kill-me", "work_ms": 2000})
    locks = redis.Redis.from_url(LOCKS_URL)
    claimed = wait_for(
        lambda: next((r for r in inflight.all_records(locks) if r.key == "probe:kill-me"), None),
        what="the lease",
    )
    first_token = int(locks.get(FENCE_KEY + "probe:kill-me") or 0)
    assert outcome(worker.database_url, "probe:kill-me") is None
    pid = int(claimed.worker.rsplit("/", 1)[1])
    assert pid in worker.pool_pids()
    # When that child is killed mid-task
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # Then the worker frees the dead child's lease at once: the redelivery finds
    # the record, claims the key (its second delivery) within 1.5 s (a lease
    # left to expire would take 6 s), without ever finding the entity locked,
    reclaimed = wait_for(
        lambda: (r := outcome(worker.database_url, "probe:kill-me")) and r.attempts == 2 and r,
        timeout_s=10,
        what="the redelivery to claim the key again",
    )
    assert time.monotonic() - killed_at < 1.5
    assert reclaimed.fencing_token > first_token
    # and runs with the higher fencing token; the effect exists exactly once.
    done = wait_for(
        lambda: (
            (r := outcome(worker.database_url, "probe:kill-me")) and r.status == "succeeded" and r
        ),
        timeout_s=60,
        what="the redelivered run to succeed",
    )
    assert done.attempts == 2
    assert done.fencing_token > first_token
    with transaction(worker.database_url) as conn:
        effects = conn.execute(
            select(ProbeEffect.__table__.c.fencing_token).where(
                ProbeEffect.__table__.c.effect_key == "kill-me"
            )
        ).all()
    assert [e.fencing_token for e in effects] == [done.fencing_token]
    with transaction(worker.database_url) as conn:
        kinds = conn.execute(
            select(GuardEvent.__table__.c.kind).where(
                GuardEvent.__table__.c.idempotency_key == "probe:kill-me"
            )
        ).scalars()
        assert list(kinds) == [], "the redelivery never found the entity locked"
