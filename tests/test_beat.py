"""The highly available beat: real beat processes, a real worker, real Redis.

Beat runs the test's own app (tests/beat_app.py): one entry, ``probe.tick``
every second with misfire ``catch_up``, so every slot from the first tick to
the last must run, and nothing else lands on the test's queue. Each run
writes a row to ``probe_effect_log``, which has no UNIQUE key: how often a
slot really ran is counted there, apart from its outcome row.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from fleetworks import constants as c
from fleetworks.db import transaction
from fleetworks.models import GUARD_EVENTS, OUTCOMES, PROBE_EFFECT_LOG, TERMINAL, EventKind
from fleetworks.procs import Child, celery_argv
from fleetworks.proving.probe import TICK
from tests import beat_app
from tests.conftest import Worker, broker_idle, start_worker, truncate, wait_for

LEADER_KEY = c.LOCK_KEY + c.BEAT_LEADER_ENTITY + beat_app.NAME
SLOTS_KEY = f"{c.BEAT_SLOTS_KEY}{beat_app.NAME}:slots"
PERIOD = timedelta(seconds=beat_app.PERIOD_S)


@pytest.fixture
def sqlite_db(sqlite_url: str) -> Iterator[str]:
    truncate(sqlite_url)
    yield sqlite_url
    truncate(sqlite_url)


@pytest.fixture
def tick_worker(sqlite_db: str, redis_client: redis.Redis, tmp_path: Path) -> Iterator[Worker]:
    redis_client.delete(LEADER_KEY, SLOTS_KEY)
    w = start_worker(sqlite_db, tmp_path, f"beatw{os.getpid()}")
    yield w
    w.child.stop(15)


def start_beat(worker: Worker, log_dir: Path, name: str) -> Child:
    argv = celery_argv("tests.beat_app", "beat", "-s", str(log_dir / f"{name}.schedule"),
                       "--pidfile=", "--loglevel", "INFO")  # fmt: skip
    env = dict(os.environ, FLEET_DATABASE_URL=worker.database_url, FLEET_QUEUE=worker.queue)
    return Child(name, argv, env, log_path=log_dir / f"{name}.log").start()


def leader_pid(client: redis.Redis) -> int | None:
    holder = client.get(LEADER_KEY)
    if holder is None:
        return None
    match = re.search(rb"/(\d+):", holder)
    return int(match.group(1)) if match else None


def tick_rows(url: str) -> list[tuple[str, str, int]]:
    o = OUTCOMES.c
    with transaction(url) as conn:
        rows = conn.execute(
            select(o.idempotency_key, o.status, o.attempts).where(o.agent == TICK)
        ).all()
    return sorted((str(k), str(s), int(a)) for k, s, a in rows)


def runs_per_tick(url: str) -> Counter[str]:
    """How many runs of each tick committed their effect (no UNIQUE key)."""
    log = PROBE_EFFECT_LOG.c
    with transaction(url) as conn:
        rows = conn.execute(
            select(log.effect_key, func.count())
            .where(log.effect_key.like(f"{beat_app.ENTRY}@%"))
            .group_by(log.effect_key)
        ).all()
    return Counter({str(k): int(n) for k, n in rows})


def duplicates_skipped(url: str) -> int:
    e = GUARD_EVENTS.c
    with transaction(url) as conn:
        return int(
            conn.execute(
                select(func.count()).where(
                    (e.agent == TICK) & (e.kind == EventKind.SKIPPED_DUPLICATE)
                )
            ).scalar_one()
        )


def slot_of(tick: str) -> datetime:
    return datetime.fromisoformat(tick.split("@", 1)[1].replace("Z", "+00:00"))


def settle(worker: Worker) -> None:
    """Wait until every tick sent has been run: the queue idle, no claim open."""
    wait_for(
        lambda: (
            broker_idle(worker.queue)
            and all(s in TERMINAL for _, s, _ in tick_rows(worker.database_url))
        ),
        30,
        "every tick sent to have run",
    )


def assert_each_slot_once(url: str) -> list[datetime]:
    """Every slot from the first tick to the last ran, and ran exactly once
    (catch_up leaves no slot out); returns the slots."""
    rows = tick_rows(url)
    assert rows, "no tick ran"
    assert all(status == "succeeded" and attempts == 1 for _, status, attempts in rows), rows
    runs = runs_per_tick(url)
    assert set(runs) == {key for key, *_ in rows}
    assert set(runs.values()) == {1}, f"a slot ran more than once: {runs.most_common(3)}"
    slots = sorted(slot_of(key) for key, *_ in rows)
    expected = [slots[0] + i * PERIOD for i in range(round((slots[-1] - slots[0]) / PERIOD) + 1)]
    assert slots == expected, f"slots missing: {sorted(set(expected) - set(slots))}"
    return slots


def leader_and_other(
    worker: Worker, client: redis.Redis, log_dir: Path
) -> tuple[list[Child], Child, Child]:
    """Two beats running ticks: both, the one leading, the other."""
    beats = [start_beat(worker, log_dir, n) for n in ("beat-a", "beat-b")]
    try:
        wait_for(lambda: len(tick_rows(worker.database_url)) >= 3, 60, "3 ticks")
        pid = wait_for(lambda: leader_pid(client), 10, "a leader")
    except BaseException:
        stop(*beats)
        raise
    leader = next(b for b in beats if b.pid == pid)
    return beats, leader, next(b for b in beats if b is not leader)


def stop(*beats: Child) -> None:
    for b in beats:
        b.stop(10)


def test_two_beats_send_each_slot_once(
    tick_worker: Worker, redis_client: redis.Redis, tmp_path: Path
) -> None:
    # Given two beats on one Redis, a tick due every second
    a, b = start_beat(tick_worker, tmp_path, "beat-a"), start_beat(tick_worker, tmp_path, "beat-b")
    try:
        # When they run for a dozen slots
        wait_for(lambda: len(tick_rows(tick_worker.database_url)) >= 12, 60, "12 ticks")
        # Then exactly one of them leads, and only the leader sent ticks
        leader = leader_pid(redis_client)
        assert leader in (a.pid, b.pid)
    finally:
        # The follower first: a leader stopping cleanly hands the lead over at once.
        stop(*sorted((a, b), key=lambda beat: beat.pid == leader_pid(redis_client)))
    settle(tick_worker)
    assert_each_slot_once(tick_worker.database_url)
    follower = b if leader == a.pid else a
    assert "beat: sending" not in follower.log_tail(200_000)
    assert duplicates_skipped(tick_worker.database_url) == 0


def test_a_killed_leader_is_replaced_within_the_lease(
    tick_worker: Worker, redis_client: redis.Redis, tmp_path: Path
) -> None:
    beats, leader, other = leader_and_other(tick_worker, redis_client, tmp_path)
    try:
        # When the leader is killed with no chance to step down
        leader.signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: leader_pid(redis_client) == other.pid, 15, "the other beat to lead")
        failover = time.monotonic() - killed
        # Then the other leads within the lease TTL plus a loop (and margin)
        assert failover < c.BEAT_LEASE_TTL_S + 2 * c.BEAT_LOOP_S + 1.0, failover
        # And ticks continue from where the dead leader stopped: the slots of
        # the gap are caught up, none run twice
        ran_before = len(tick_rows(tick_worker.database_url))
        wait_for(lambda: len(tick_rows(tick_worker.database_url)) >= ran_before + 4, 30, "ticks")
    finally:
        stop(*beats)
    settle(tick_worker)
    assert_each_slot_once(tick_worker.database_url)


def in_process_beats(worker: Worker) -> tuple[Any, Any]:
    """Two schedulers of the test app in this process, on the worker's queue."""
    from fleetworks.app import create_app
    from fleetworks.beat import FleetScheduler
    from fleetworks.settings import Settings

    settings = Settings(database_url=worker.database_url, queue=worker.queue)
    entry = {"task": TICK, "schedule": beat_app.PERIOD_S, "options": {"misfire": "catch_up"}}
    app = create_app(settings, {beat_app.ENTRY: entry}, name=beat_app.NAME)
    a, b = FleetScheduler(app), FleetScheduler(app)
    a.leadership.identity, b.leadership.identity = "beat-a", "beat-b"
    return a, b


def test_a_leader_stalled_between_sending_and_recording_runs_no_slot_twice(
    tick_worker: Worker, redis_client: redis.Redis
) -> None:
    """The race the tick ids exist for: a leader freezes after sending a tick and
    before recording its slot as handled; its lease runs out, the other beat
    leads and sends the same slots; the frozen one wakes and sends the rest."""
    a, b = in_process_beats(tick_worker)
    # Given beat a leading, with the last 4 slots due (handled up to 4 s ago)
    assert a.leadership.hold()
    behind = datetime.now(UTC).replace(microsecond=0) - 4 * PERIOD
    redis_client.hset(SLOTS_KEY, beat_app.ENTRY, int(behind.timestamp() * 1000))
    sent_by: dict[str, list[str]] = {"a": [], "b": []}
    send_a, send_b = a.send_tick, b.send_tick

    def b_sends(entry: Any, slot: datetime) -> str:
        sent_by["b"].append(send_b(entry, slot))
        return sent_by["b"][-1]

    def a_sends_then_freezes(entry: Any, slot: datetime) -> str:
        sent_by["a"].append(send_a(entry, slot))
        if len(sent_by["a"]) == 1:
            # When a freezes right after its first tick, past its lease (the
            # lease key ends as its TTL would end it), and b takes the lead
            redis_client.delete(LEADER_KEY)
            b.tick()
            assert b.leadership.lease is not None, "b leads once a's lease is gone"
        return sent_by["a"][-1]

    a.send_tick, b.send_tick = a_sends_then_freezes, b_sends
    # and a wakes up and goes on sending the slots it had planned
    a.tick()
    # Then both sent the same slots (the late ticks went out), a's record of
    # them was refused, and a steps down at its next loop
    assert len(sent_by["a"]) >= 4 and set(sent_by["a"]) <= set(sent_by["b"]), sent_by
    assert not a.leadership.hold() and a.leadership.lease is None
    b.tick()
    settle(tick_worker)
    # and each slot ran once: every tick a sent late was a skipped duplicate
    assert_each_slot_once(tick_worker.database_url)
    assert duplicates_skipped(tick_worker.database_url) == len(sent_by["a"])
    handled = int(redis_client.hget(SLOTS_KEY, beat_app.ENTRY) or 0)
    assert handled >= int(slot_of(sent_by["b"][-1]).timestamp() * 1000)
    a.close()
    b.close()


def test_a_tick_the_broker_refuses_is_sent_again_once_it_is_back(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    from fleetworks.app import create_app
    from fleetworks.beat import FleetScheduler
    from fleetworks.embedded import EmbeddedRedis, free_port
    from fleetworks.settings import Settings
    from tests.conftest import LOCKS_URL

    broker = EmbeddedRedis(tmp_path / "broker", port=free_port()).start()
    name = f"refused{uuid.uuid4().hex[:6]}"
    try:
        settings = Settings(broker_url=broker.url, redis_url=LOCKS_URL)
        entry = {"task": TICK, "schedule": 1.0}
        app = create_app(settings, {beat_app.ENTRY: entry}, name=name)
        scheduler = FleetScheduler(app)
        slots_key = f"{c.BEAT_SLOTS_KEY}{name}:slots"
        scheduler.tick()
        assert scheduler.leadership.lease is not None, "the only beat leads"
        scheduler.producer  # connected while the broker is up  # noqa: B018
        # Given the entry's slots handled up to 3 s ago, and the broker down
        behind = int((time.time() - 3) * 1000)
        redis_client.hset(slots_key, beat_app.ENTRY, behind)
        broker.stop()
        # When beat loops: the tick cannot go out, and beat survives it
        scheduler.tick()
        assert int(redis_client.hget(slots_key, beat_app.ENTRY) or 0) == behind
        # Then with the broker back the tick is sent and recorded
        broker.start()
        wait_for(
            lambda: (
                scheduler.tick() is not None
                and int(redis_client.hget(slots_key, beat_app.ENTRY) or 0) > behind
            ),
            30,
            "the tick sent after the broker came back",
        )
        queued = redis.Redis.from_url(broker.url).lrange("fleet", 0, -1)
        assert any(f"{beat_app.ENTRY}@".encode() in m for m in queued)
    finally:
        broker.stop()
        redis_client.delete(f"{c.BEAT_SLOTS_KEY}{name}:slots")
