"""Faults against real workers: a paused holder, a killed worker, poison messages."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import func, select

from fleetworks import constants as c
from fleetworks import context, inflight, timing
from fleetworks.db import transaction
from fleetworks.ledger import Ledger
from fleetworks.locks import EntityLocks
from fleetworks.models import GUARD_EVENTS, OUTCOMES, PROBE_EFFECTS, EventKind
from fleetworks.reaper import reap_inflight, replay
from fleetworks.timing import Timings
from tests.conftest import Worker, start_worker, wait_for


def outcome(url: str, key: str) -> Any:
    with transaction(url) as conn:
        return conn.execute(select(OUTCOMES).where(OUTCOMES.c.idempotency_key == key)).first()


def status_is(url: str, key: str, *statuses: str) -> Any:
    row = outcome(url, key)
    return row if row is not None and row.status in statuses else None


def effects(url: str, effect_key: str) -> list[int]:
    with transaction(url) as conn:
        rows = conn.execute(
            select(PROBE_EFFECTS.c.fencing_token).where(PROBE_EFFECTS.c.effect_key == effect_key)
        )
        return [r.fencing_token for r in rows]


def event_count(url: str, kind: EventKind, key: str) -> int:
    with transaction(url) as conn:
        return int(
            conn.execute(
                select(func.count()).where(
                    (GUARD_EVENTS.c.kind == kind) & (GUARD_EVENTS.c.idempotency_key == key)
                )
            ).scalar_one()
        )


def running(client: redis.Redis, key: str) -> Any:
    """The in-flight record of ``key``'s run (a first delivery writes no row
    until its outcome), or None."""
    return next((r for r in inflight.all_records(client) if r.key == key), None)


def fence(client: redis.Redis, key: str) -> int:
    """The last fencing token handed out for entity ``key``."""
    return int(client.get(c.FENCE_KEY + key) or 0)


def holder_pid(row: Any) -> int:
    return int(row.worker.rsplit("/", 1)[1])


def test_paused_holder_is_fenced_off_after_takeover(
    worker: Worker, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """SIGSTOP a holder past its lease; a second worker takes over; the first's
    late write is refused and recorded, and the effect exists once."""
    # Given worker A running a probe that works 3 s before its effect
    payload = {"id": "paused", "work_ms": 3000}
    worker.enqueue("probe.run", payload)
    first = wait_for(lambda: running(redis_client, "probe:paused"))
    first_token = fence(redis_client, "probe:paused")
    pid = holder_pid(first)
    # When A's process is paused until its lease runs out
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(
            lambda: not redis_client.exists(c.LOCK_KEY + "probe:paused"),
            timeout_s=timing.LEASE_TTL_MAX_S + 5,
            what="the paused holder's lease to expire",
        )
        # and worker B receives the same key (a redelivery, a re-poll)
        other = start_worker(worker.database_url, tmp_path, f"{worker.name}-b")
        try:
            other.enqueue("probe.run", payload)
            done = wait_for(
                lambda: status_is(worker.database_url, "probe:paused", "succeeded"),
                what="worker B to finish the key",
            )
        finally:
            other.child.stop(15)
    finally:
        os.kill(pid, signal.SIGCONT)
    # Then A, resumed, has its write refused and recorded; one effect, B's token.
    wait_for(
        lambda: event_count(worker.database_url, EventKind.STALE_WRITE, "probe:paused") == 1,
        what="the stale write to be refused",
    )
    assert done.fencing_token > first_token
    assert effects(worker.database_url, "paused") == [done.fencing_token]
    final = outcome(worker.database_url, "probe:paused")
    assert (final.status, final.fencing_token) == ("succeeded", done.fencing_token)


def test_killed_worker_is_recovered_by_the_reaper_within_seconds(
    database_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """SIGKILL of a whole worker (main process and pool): its claimed task runs
    again within seconds, not after the visibility timeout, and once."""
    from config import app

    queue = f"reap-{os.getpid()}"
    a = start_worker(database_url, tmp_path, f"reap-a-{os.getpid()}", queue=queue)
    b: Worker | None = None
    try:
        # Given a task running on worker A (its first delivery: an in-flight record)
        a.enqueue("probe.run", {"id": "orphan", "work_ms": 4000})
        wait_for(lambda: running(redis_client, "probe:orphan"))
        first_token = fence(redis_client, "probe:orphan")
        # When the whole of worker A dies at once, and a rescuer B is ready
        os.killpg(a.child.pid, signal.SIGKILL)
        b = start_worker(database_url, tmp_path, f"reap-b-{os.getpid()}", queue=queue, control=True)
        ready_at = time.monotonic()
        # Then the reaper (run here as beat would) republishes it once the lease is gone
        locks = EntityLocks(redis_client)
        ledger, timings = Ledger(database_url), Timings.derive(60.0)
        wait_for(lambda: reap_inflight(app, ledger, locks, timings), timeout_s=20,
                 what="the reaper")  # fmt: skip
        republished_s = time.monotonic() - ready_at
        done = wait_for(
            lambda: status_is(database_url, "probe:orphan", "succeeded"),
            what="the republished task to succeed",
        )
        recovery_s = time.monotonic() - ready_at
        # within one lease of the rescuer being ready (the lease was taken
        # before the kill), and then one run of 4 s (with 1.5 s of margin)
        assert republished_s < timing.LEASE_TTL_MAX_S, republished_s
        assert recovery_s < republished_s + 4 + 1.5, (republished_s, recovery_s)
        assert done.attempts == 2 and done.fencing_token > first_token
        assert effects(database_url, "orphan") == [done.fencing_token]
        # And the broker's late redelivery of the original message is a duplicate.
        app.send_task(
            "probe.run", kwargs={"payload": {"id": "orphan", "work_ms": 4000}}, queue=queue
        )
        wait_for(
            lambda: event_count(database_url, EventKind.SKIPPED_DUPLICATE, "probe:orphan") == 1
        )
        assert effects(database_url, "orphan") == [done.fencing_token]
    finally:
        a.child.stop(5)
        if b is not None:
            b.child.stop(15)


def test_poison_message_goes_dead_after_max_deliveries(worker: Worker) -> None:
    """A message that kills its worker process every time stops after max_deliveries."""
    worker.enqueue("probe.run", {"id": "poison", "crash": True})
    dead = wait_for(
        lambda: status_is(worker.database_url, "probe:poison", "dead"),
        timeout_s=90,
        what="the poison message to be declared dead",
    )
    assert dead.attempts == context.DEFAULT_MAX_DELIVERIES + 1
    assert "max_deliveries" in dead.error
    assert effects(worker.database_url, "poison") == []


def test_failures_retry_with_backoff_then_dead_then_replay(worker: Worker) -> None:
    """A behaviour that keeps failing is retried max_retries times, declared dead
    with its last error, and `replay` runs it again on purpose."""
    from config import app

    worker.enqueue("probe.run", {"id": "flaky", "fail_attempts": 50})
    dead = wait_for(
        lambda: status_is(worker.database_url, "probe:flaky", "dead"),
        timeout_s=90,
        what="retries to run out",
    )
    assert dead.attempts == context.DEFAULT_MAX_RETRIES + 1
    assert "ProbeFailure" in dead.error and "failing attempt 4" in dead.error
    # When an operator replays it
    replay(app, Ledger(worker.database_url), dead.id)
    # Then it runs again from a fresh budget (and, still failing, dies again)
    wait_for(lambda: event_count(worker.database_url, EventKind.REPLAYED, "probe:flaky") == 1)
    again = wait_for(
        lambda: (
            (r := status_is(worker.database_url, "probe:flaky", "dead"))
            and r.id == dead.id
            and r.finished_at > dead.finished_at
            and r
        ),
        timeout_s=90,
        what="the replayed run to finish",
    )
    assert again.attempts == context.DEFAULT_MAX_RETRIES + 1


def test_failure_then_success_is_one_effect(worker: Worker) -> None:
    """A behaviour failing twice then succeeding: retried with back-off, one effect."""
    worker.enqueue("probe.run", {"id": "recovers", "fail_attempts": 2})
    done = wait_for(
        lambda: status_is(worker.database_url, "probe:recovers", "succeeded"), timeout_s=60
    )
    assert done.attempts == 3
    assert done.error is None
    assert effects(worker.database_url, "recovers") == [done.fencing_token]


def test_client_kill_cuts_the_workers_broker_connections_and_only_theirs(
    worker: Worker, tmp_path: Path
) -> None:
    """client-kill on Redis: every connection of the worker's processes to the
    broker dies (its consumer among them, blocked in BRPOP), the worker
    reconnects and works on; a connection of anyone else survives. Loss is
    not asserted here: a popped message can die with its connection."""
    import random

    from fleetworks.proving import faults
    from tests.conftest import BROKER_URL

    client = redis.Redis.from_url(BROKER_URL)
    port = client.connection_pool.connection_kwargs["port"]

    def theirs() -> list[dict[str, Any]]:
        pids = [worker.child.pid, *worker.pool_pids()]
        mine = faults._connections_to(pids, port)
        return [e for e in client.client_list() if faults._address(e["addr"]) in mine]

    # Given the worker waiting for work in BRPOP, and a bystander's connection
    before = wait_for(
        lambda: (found := theirs()) and any(e["cmd"] == "brpop" for e in found) and found,
        what="the worker blocked in BRPOP",
    )
    bystander = redis.Redis.from_url(BROKER_URL)
    bystander_id = bystander.client_id()
    injector = faults.Injector([worker.child], None, worker.database_url, random.Random(1),
                               broker_url=BROKER_URL)  # fmt: skip
    # When client-kill hits
    detail = injector.client_kill([])
    # Then every one of the worker's connections of before is gone,
    gone = {e["id"] for e in before} - {e["id"] for e in client.client_list()}
    assert gone == {e["id"] for e in before}, detail
    assert "in BRPOP" in detail and int(detail.split()[3]) >= len(before), detail
    # the bystander's is not,
    assert bystander.ping() and bystander.client_id() == bystander_id
    # and the worker is back in BRPOP on a new connection, having said so
    wait_for(
        lambda: any(e["cmd"] == "brpop" and e["id"] not in gone for e in theirs()),
        what="the worker to consume again",
    )
    log = worker.child.log_tail(200_000)
    assert log.count("Connected to redis") >= 2, log[-3000:]
    # And it works on.
    worker.enqueue("probe.run", {"id": "after-client-kill"})
    wait_for(lambda: status_is(worker.database_url, "probe:after-client-kill", "succeeded"))
    bystander.close()
    client.close()
