"""The highly available beat: real beat processes, a real worker, real Redis.

The schedule is the fleet's own (beat_schedule.py) with the mentions poller
every second and nothing to fan out, so each tick is one guarded run whose
outcome row, keyed by the tick id, says whether that slot ran and how often
it was claimed.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from fleetworks import constants as c
from fleetworks.db import transaction
from fleetworks.models import GUARD_EVENTS, OUTCOMES, EventKind
from fleetworks.procs import Child, celery_argv
from tests.conftest import Worker, start_worker, truncate, wait_for

LEADER_KEY = c.LOCK_KEY + c.BEAT_LEADER_ENTITY + "fleetworks"
POLL = "mentions.poll"
PERIOD_S = 1.0


@pytest.fixture
def sqlite_db(sqlite_url: str) -> Iterator[str]:
    truncate(sqlite_url)
    yield sqlite_url
    truncate(sqlite_url)


@pytest.fixture
def tick_worker(sqlite_db: str, redis_client: redis.Redis, tmp_path: Path) -> Iterator[Worker]:
    w = start_worker(sqlite_db, tmp_path, f"beatw{os.getpid()}")
    yield w
    w.child.stop(15)


def start_beat(worker: Worker, log_dir: Path, name: str) -> Child:
    argv = celery_argv("config", "beat", "-s", str(log_dir / f"{name}.schedule"), "--pidfile=",
                       "--loglevel", "INFO")  # fmt: skip
    env = dict(
        os.environ,
        FLEET_DATABASE_URL=worker.database_url,
        FLEET_QUEUE=worker.queue,
        FLEET_MENTIONS_POLL_INTERVAL_S=str(PERIOD_S),
        FLEET_MENTIONS_PER_POLL="0",
        # No pricing fan-out on the test's queue, whatever the time of day.
        FLEET_PRICING_PRODUCTS="0",
    )
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
            select(o.idempotency_key, o.status, o.attempts).where(o.agent == POLL)
        ).all()
    return sorted((str(k), str(s), int(a)) for k, s, a in rows)


def slot_of(tick: str) -> datetime:
    return datetime.fromisoformat(tick.split("@", 1)[1].replace("Z", "+00:00"))


def missed_in_logs(*beats: Child) -> int:
    """Slots the beats reported as missed (misfire coalesce drops them)."""
    pattern = re.compile(rf"{re.escape('beat: poll-mentions: ')}(\d+) missed slot")
    return sum(int(n) for b in beats for n in pattern.findall(b.log_tail(200_000)))


def assert_each_slot_once(url: str, *beats: Child) -> list[datetime]:
    """Every slot from the first tick to the last ran exactly once, or was
    reported missed; none ran twice. Returns the slots that ran."""
    rows = tick_rows(url)
    assert rows, "no tick ran"
    assert all(status == "succeeded" for _, status, _ in rows), rows
    assert all(attempts == 1 for *_, attempts in rows), f"a tick was claimed twice: {rows}"
    slots = sorted(slot_of(key) for key, *_ in rows)
    span = round((slots[-1] - slots[0]).total_seconds() / PERIOD_S) + 1
    assert len(slots) + missed_in_logs(*beats) == span, (slots, missed_in_logs(*beats))
    with transaction(url) as conn:
        dup = conn.execute(
            select(GUARD_EVENTS.c.idempotency_key).where(
                (GUARD_EVENTS.c.agent == POLL)
                & (GUARD_EVENTS.c.kind == EventKind.SKIPPED_DUPLICATE)
            )
        ).all()
    assert dup == [], f"a tick was sent twice without a split leadership: {dup}"
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
    # Given two beats on one Redis, the poller due every second
    a, b = start_beat(tick_worker, tmp_path, "beat-a"), start_beat(tick_worker, tmp_path, "beat-b")
    try:
        # When they run for a dozen slots
        wait_for(lambda: len(tick_rows(tick_worker.database_url)) >= 12, 60, "12 ticks")
        # Then exactly one of them leads
        assert leader_pid(redis_client) in (a.pid, b.pid)
    finally:
        stop(a, b)
    time.sleep(1.0)  # the last tick sent, still running
    assert_each_slot_once(tick_worker.database_url, a, b)


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
        # And ticks continue from where the dead leader stopped
        ran_before = len(tick_rows(tick_worker.database_url))
        wait_for(lambda: len(tick_rows(tick_worker.database_url)) >= ran_before + 4, 30, "ticks")
    finally:
        stop(*beats)
    time.sleep(1.0)
    assert_each_slot_once(tick_worker.database_url, *beats)


def test_a_stalled_leader_steps_down_and_its_late_ticks_do_not_run_twice(
    tick_worker: Worker, redis_client: redis.Redis, tmp_path: Path
) -> None:
    beats, stalled, other = leader_and_other(tick_worker, redis_client, tmp_path)
    try:
        # Given the leader frozen past its lease, and the other beat leading
        stalled.signal(signal.SIGSTOP)
        wait_for(lambda: leader_pid(redis_client) == other.pid, 15, "the other beat to lead")
        time.sleep(2 * PERIOD_S)
        # When the stalled one wakes up
        stalled.signal(signal.SIGCONT)
        resumed = datetime.now(UTC)
        time.sleep(4 * PERIOD_S)
        # Then it does not take the lead back, and ticks keep running once each
        assert leader_pid(redis_client) == other.pid
        assert max(slot_of(k) for k, *_ in tick_rows(tick_worker.database_url)) > resumed
    finally:
        stalled.signal(signal.SIGCONT)
        stop(*beats)
    time.sleep(1.0)
    rows = tick_rows(tick_worker.database_url)
    assert all(attempts == 1 and status == "succeeded" for _, status, attempts in rows), rows
    slots = sorted(slot_of(k) for k, *_ in rows)
    assert len(slots) == len(set(slots))
    assert slots[-1] - slots[0] >= timedelta(seconds=6)


def test_a_tick_the_broker_refuses_is_sent_again_once_it_is_back(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    from fleetworks.app import create_app
    from fleetworks.beat import FleetScheduler
    from fleetworks.embedded import EmbeddedRedis, free_port
    from fleetworks.settings import Settings
    from tests.conftest import LOCKS_URL

    broker = EmbeddedRedis(tmp_path / "broker", port=free_port()).start()
    try:
        settings = Settings(broker_url=broker.url, redis_url=LOCKS_URL)
        poller = {"task": "mentions.poll", "schedule": 1.0, "kwargs": {"payload": {"limit": 0}}}
        app = create_app(settings, {"poll-mentions": poller})
        scheduler = FleetScheduler(app)
        slots_key = f"{c.BEAT_SLOTS_KEY}fleetworks:slots"
        assert scheduler.tick() > 0  # leads; the poller is seen for the first time
        scheduler.producer  # connected while the broker is up  # noqa: B018
        # Given the poller's slots handled up to 3 s ago, and the broker down
        behind = int((time.time() - 3) * 1000)
        redis_client.hset(slots_key, "poll-mentions", behind)
        broker.stop()
        # When beat loops: the tick cannot go out, and beat survives it
        scheduler.tick()
        assert int(redis_client.hget(slots_key, "poll-mentions") or 0) == behind
        # Then with the broker back the tick is sent and recorded
        broker.start()
        wait_for(
            lambda: (
                scheduler.tick() is not None
                and int(redis_client.hget(slots_key, "poll-mentions") or 0) > behind
            ),
            30,
            "the tick sent after the broker came back",
        )
        queued = redis.Redis.from_url(broker.url).lrange("fleet", 0, -1)
        assert any(b"poll-mentions@" in m for m in queued)
    finally:
        broker.stop()
