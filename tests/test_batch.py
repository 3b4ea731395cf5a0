"""Batch agents against a real worker, real Redis and each real results database."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from fleetworks import message
from fleetworks.app import fleet_of
from fleetworks.batch import batch_queue
from fleetworks.context import AgentSpec, Batch
from fleetworks.db import transaction
from fleetworks.enqueue import enqueue_many
from fleetworks.ledger import Ledger
from fleetworks.locks import EntityLocks
from fleetworks.models import PROBE_EFFECTS, EventKind, GuardEvent, Outcome
from fleetworks.proving.probe import BATCHED, TOGETHER, Probe
from fleetworks.reaper import reap, restore_stranded
from fleetworks.timing import Timings
from tests.conftest import Worker, broker_idle, start_worker, truncate, wait_for

_o = Outcome.__table__.c
_e = GuardEvent.__table__.c


def _rows(url: str, prefix: str, agent: str = BATCHED) -> list[Any]:
    with transaction(url) as conn:
        return list(
            conn.execute(
                select(Outcome.__table__).where(
                    (_o.agent == agent) & _o.idempotency_key.startswith(f"probe:{prefix}")
                )
            )
        )


def _settled(url: str, prefix: str, n: int, agent: str = BATCHED) -> bool:
    rows = _rows(url, prefix, agent)
    return len(rows) == n and all(r.status in ("succeeded", "dead", "rejected") for r in rows)


def _effects(url: str, prefix: str) -> int:
    with transaction(url) as conn:
        return int(
            conn.execute(
                select(func.count()).where(PROBE_EFFECTS.c.effect_key.startswith(prefix))
            ).scalar_one()
        )


def _events(url: str, kind: EventKind, prefix: str) -> int:
    with transaction(url) as conn:
        return int(
            conn.execute(
                select(func.count()).where(
                    (_e.kind == kind) & _e.idempotency_key.startswith(f"probe:{prefix}")
                )
            ).scalar_one()
        )


def _send(worker: Worker, payloads: list[dict[str, Any]], agent: str = BATCHED) -> list[str]:
    from config import app

    return enqueue_many(app, agent, payloads, queue=worker.queue)


def test_a_batch_agent_runs_many_keys_per_run_each_once(worker: Worker) -> None:
    # Given 400 keys, 40 of them sent twice, for the batch twin of the probe
    payloads = [{"id": f"bk{i}"} for i in range(400)]
    _send(worker, payloads + payloads[:40])
    # When the worker has settled them
    wait_for(lambda: _settled(worker.database_url, "bk", 400), 60, "400 keys settled")
    wait_for(lambda: broker_idle(batch_queue(worker.queue, BATCHED)), 30, "batch queue drained")
    rows = _rows(worker.database_url, "bk")
    # Then every key succeeded once, with one effect each
    assert {r.status for r in rows} == {"succeeded"}
    assert _effects(worker.database_url, "bk") == 400
    # and the 40 second copies were counted as duplicates, never run
    wait_for(
        lambda: _events(worker.database_url, EventKind.SKIPPED_DUPLICATE, "bk") == 40,
        30, "40 duplicates counted",
    )  # fmt: skip
    # and the keys were claimed many per statement (one claim time per batch)
    claims_at = {r.started_at for r in rows}
    assert len(claims_at) <= 400 / 10, f"{len(claims_at)} claim statements for 400 keys"
    # and they came through the batch agent's own queue
    assert {r.queue for r in rows} == {batch_queue(worker.queue, BATCHED)}


def test_an_item_that_fails_is_retried_alone_and_a_bad_one_rejected(worker: Worker) -> None:
    # Given a batch where 5 items fail their first attempt and 1 payload is invalid
    payloads: list[dict[str, Any]] = [
        {"id": f"bf{i}", "fail_attempts": 1 if i % 20 == 0 else 0} for i in range(100)
    ]
    payloads.insert(50, {"id": "bf-bad", "work_ms": -1})
    _send(worker, payloads)
    # When it has settled
    wait_for(lambda: _settled(worker.database_url, "bf", 100), 60, "100 keys settled")
    rows = {r.idempotency_key: r for r in _rows(worker.database_url, "bf")}
    # Then every valid key succeeded once; the failing ones on their second attempt
    assert {r.status for r in rows.values()} == {"succeeded"}
    assert _effects(worker.database_url, "bf") == 100
    again = {k for k, r in rows.items() if r.attempts == 2}
    assert again == {f"probe:bf{i}" for i in range(0, 100, 20)}
    assert _events(worker.database_url, EventKind.ATTEMPT_FAILED, "bf") == 5
    # and the invalid payload is one rejected row naming the field
    with transaction(worker.database_url) as conn:
        rejected = conn.execute(
            select(_o.error).where((_o.agent == BATCHED) & (_o.status == "rejected"))
        ).scalars().all()  # fmt: skip
    assert len(rejected) == 1
    assert "work_ms" in rejected[0]


def test_a_batch_behaviour_settles_whole_batches_and_a_failing_item_alone(
    worker: Worker,
) -> None:
    url = worker.database_url
    # Given 300 keys, 30 sent twice, for an agent with a batch behaviour
    payloads = [{"id": f"tg{i}"} for i in range(300)]
    _send(worker, payloads + payloads[:30], TOGETHER)
    wait_for(lambda: _settled(url, "tg", 300, TOGETHER), 60, "300 keys settled")
    wait_for(lambda: broker_idle(batch_queue(worker.queue, TOGETHER)), 30, "queue drained")
    rows = _rows(url, "tg", TOGETHER)
    # Then every key succeeded once, through the batch behaviour, one effect each
    assert {r.status for r in rows} == {"succeeded"}
    assert all(r.result["together"] for r in rows), [r.result for r in rows][:3]
    assert _effects(url, "tg") == 300
    wait_for(lambda: _events(url, EventKind.SKIPPED_DUPLICATE, "tg") == 30, 30, "duplicates")
    # And given a batch where one item fails its first attempt
    failing = [{"id": f"tf{i}", "fail_attempts": 1 if i == 40 else 0} for i in range(100)]
    _send(worker, failing, TOGETHER)
    wait_for(lambda: _settled(url, "tf", 100, TOGETHER), 60, "100 keys settled")
    rows = _rows(url, "tf", TOGETHER)
    # Then its batch ran again per item: the failing key alone failed, then
    # succeeded on its second attempt; every key has one effect
    assert {r.status for r in rows} == {"succeeded"}
    assert _effects(url, "tf") == 100
    assert {r.idempotency_key for r in rows if r.attempts == 2} == {"probe:tf40"}
    assert _events(url, EventKind.ATTEMPT_FAILED, "tf") == 1
    alone = [r.idempotency_key for r in rows if "together" not in r.result]
    assert alone, "no key of the failing batch ran per item"


def test_a_database_error_in_a_batch_behaviour_rolls_back_only_its_savepoint(
    worker: Worker,
) -> None:
    from fleetworks.claims import now

    url = worker.database_url
    # Given one key's effect row already written, so the batch behaviour's
    # one executemany fails on the UNIQUE key (on PostgreSQL an error that
    # aborts the transaction unless rolled back to a savepoint)
    with transaction(url) as conn:
        conn.execute(PROBE_EFFECTS.insert().values(
            effect_key="te7", fencing_token=0, worker="before", created_at=now()
        ))  # fmt: skip
    _send(worker, [{"id": f"te{i}"} for i in range(50)], TOGETHER)

    # When the worker has run them
    def others_done() -> bool:
        rows = {r.idempotency_key: r for r in _rows(url, "te", TOGETHER)}
        done = [k for k, r in rows.items() if r.status == "succeeded"]
        return (
            len(done) == 49
            and rows.get("probe:te7") is not None
            and (rows["probe:te7"].status in ("failed", "dead"))
        )

    wait_for(others_done, 60, "49 keys settled and te7 failed")
    rows = {r.idempotency_key: r for r in _rows(url, "te", TOGETHER)}
    # Then the batch ran again per item: every other key succeeded once with
    # one effect, the conflicting key alone failed, its row untouched
    assert "IntegrityError" in (rows["probe:te7"].error or ""), rows["probe:te7"].error
    alone = [k for k, r in rows.items() if r.status == "succeeded" and "together" not in r.result]
    assert alone, "no key of the failed batch ran per item"
    assert _effects(url, "te") == 50
    with transaction(url) as conn:
        (kept,) = conn.execute(
            select(PROBE_EFFECTS.c.worker).where(PROBE_EFFECTS.c.effect_key == "te7")
        ).all()  # fmt: skip
    assert kept.worker == "before"


def test_a_worker_killed_mid_batch_loses_nothing_and_doubles_nothing(
    sqlite_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    from config import app

    truncate(sqlite_url)
    queue = f"bkill-{os.getpid()}"
    # One pool process: the one killed is the one running the batch.
    worker = start_worker(
        sqlite_url, tmp_path, f"bkill-{os.getpid()}", queue=queue, control=True, concurrency=1
    )
    ledger, timings = Ledger(sqlite_url), Timings.derive(60.0)
    locks, agents = EntityLocks(redis_client), fleet_of(app).agents
    try:
        # Given batches of slow items (50 ms each, 100 per batch) in flight
        _send(worker, [{"id": f"bx{i}", "work_ms": 50} for i in range(300)])
        wait_for(lambda: _rows(sqlite_url, "bx"), 30, "a first claim")
        # When the pool process is killed while it runs a batch (its claims
        # committed, its behaviours under way)
        time.sleep(0.5)
        os.kill(worker.pool_pids()[0], signal.SIGKILL)

        # Then every key is settled once, by the others and the reaper (run
        # here every second, as beat would)
        restored: list[str] = []

        def reaped_and_settled() -> bool:
            restored.extend(reap(app, ledger, locks, timings))
            restored.extend(restore_stranded(app, agents, ledger, locks, timings))
            return _settled(sqlite_url, "bx", 300) or bool(time.sleep(1))

        wait_for(reaped_and_settled, 90, "300 keys settled")
        rows = _rows(sqlite_url, "bx")
        assert {r.status for r in rows} == {"succeeded"}
        assert _effects(sqlite_url, "bx") == 300
        # and the killed process did hold claims that a later run took over,
        # after the reaper gave its taken messages back
        taken_over = [r.idempotency_key for r in rows if r.attempts >= 2]
        assert len(taken_over) >= 50, f"only {len(taken_over)} claims were taken over"
        assert restored, "the reaper recovered nothing"
    finally:
        worker.child.stop(15)


def test_a_batch_spec_is_checked() -> None:
    with pytest.raises(ValueError, match="batch size"):
        Batch(size=0)
    with pytest.raises(ValueError, match="wait_s"):
        Batch(wait_s=-1)
    from fleetworks.events import Event

    # (a subscriber may batch: its runs stay in order per event key)
    assert AgentSpec(name="x", payload=Event, on=("t",), batch=Batch()).batch == Batch()
    assert Probe(id="a").id == "a"


def test_a_batch_agents_messages_are_routed_to_its_queue_whoever_sends_them() -> None:
    from config import app

    fleet = fleet_of(app)
    own = batch_queue(fleet.settings.queue, BATCHED)
    # Celery's own routing (send_task, apply_async without a queue) goes there
    routed = app.amqp.router.route({}, BATCHED, (), {})
    assert routed["queue"].name == own
    # and a sender naming a queue gets the batch queue beside it
    assert fleet.queue_for(BATCHED, "other") == batch_queue("other", BATCHED)
    assert fleet.queue_for(BATCHED, None) == own
    assert fleet.queue_for("probe.run", "other") == "other"


def test_a_batch_subscriber_handles_each_event_once_and_one_keys_events_in_order(
    worker: Worker,
) -> None:
    from config import app
    from fleetworks import events
    from tasks.pricing import ALERT, PRICE_DROPPED
    from tasks.schema import PRICE_ALERTS

    url, fleet = worker.database_url, fleet_of(app)
    spec = fleet.require_agent(ALERT)
    tag = uuid.uuid4().hex[:6]
    # Given 60 price drops of 20 products (3 each), stored in that order
    with transaction(url) as conn:
        for i in range(60):
            data = {"product": f"{tag}-{i % 20}", "tick": f"t{i // 20}",
                    "from_cents": 1000, "to_cents": 900 - i}  # fmt: skip
            events.store(conn, PRICE_DROPPED, data, event_id=f"{tag}-e{i}", key=data["product"])
    stored_ = [e for e in events.stored(url) if e.id.startswith(tag)]
    assert len(stored_) == 60
    # When each is sent to the alert agent (a batch subscriber), newest first,
    # as a relay that fell behind and a replay might
    queue = fleet.queue_for(ALERT, worker.queue)
    for event in reversed(stored_):
        app.send_task(ALERT, kwargs=message.pack(event.model_dump(),
                      events.subscription_key(ALERT, event.id)), queue=queue)  # fmt: skip

    def alerts() -> list[Any]:
        with transaction(url) as conn:
            return list(conn.execute(
                select(PRICE_ALERTS.c.event_id, PRICE_ALERTS.c.product_id)
                .where(PRICE_ALERTS.c.event_id.startswith(tag)).order_by(PRICE_ALERTS.c.id)
            ))  # fmt: skip

    wait_for(lambda: len(alerts()) == 60, 90, "60 alerts recorded")
    # Then each event was handled once, and one product's events in the order stored
    rows = alerts()
    assert sorted(r.event_id for r in rows) == sorted(e.id for e in stored_)
    position = {e.id: e.position for e in stored_}
    for product in {r.product_id for r in rows}:
        seen = [position[r.event_id] for r in rows if r.product_id == product]
        assert seen == sorted(seen), f"{product}'s events out of order"
    # (the newer ones were put back behind the older: deferred, not dropped)
    with transaction(url) as conn:
        put_back = conn.execute(
            select(func.count()).where(
                _e.kind.in_([EventKind.DEFERRED, EventKind.LOCK_CONTENDED])
                & _e.idempotency_key.startswith(f"{ALERT}|{tag}")
            )
        ).scalar_one()
    assert put_back > 0
    assert spec.batch is not None
