"""Autoscaling: the policy on recorded traces, the depth probe on real
brokers, a real worker's pool following a burst, and the /metrics endpoint."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import select

from fleetworks import constants as c
from fleetworks import inflight
from fleetworks.autoscale.depth import AmqpDepth, RedisDepth, probe_for
from fleetworks.autoscale.policy import Policy, Scaler
from fleetworks.db import transaction
from fleetworks.models import GUARD_EVENTS, OUTCOMES
from tests.conftest import BROKER_URL, LOCKS_URL, Worker, require, start_worker, wait_for

RABBIT_URL = os.environ.get("FLEET_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

POLICY = Policy(min_workers=1, max_workers=8, target_per_worker=2, scale_down_after_s=5)


def test_desired_is_the_clamped_ceiling_of_load_over_target() -> None:
    assert POLICY.desired(0, 0) == 1
    assert POLICY.desired(3, 0) == 2
    assert POLICY.desired(4, 1) == 3
    assert POLICY.desired(1000, 4) == 8
    with pytest.raises(ValueError, match="min_workers <= max_workers"):
        Policy(min_workers=5, max_workers=2, target_per_worker=1, scale_down_after_s=0)


def run_trace(trace: list[tuple[float, int, int]]) -> list[int]:
    scaler = Scaler(POLICY, current=1)
    return [scaler.step(t, backlog, running) for t, backlog, running in trace]


def test_a_burst_scales_up_at_once() -> None:
    # (time s, backlog, running) as a worker saw them, one look a second
    trace = [(0, 0, 0), (1, 0, 0), (2, 40, 1), (3, 30, 8), (4, 20, 8)]
    assert run_trace(trace) == [1, 1, 8, 8, 8]


def test_scale_down_waits_for_the_window_and_goes_one_step_at_a_time() -> None:
    busy = [(float(t), 20, 8) for t in range(3)]
    idle = [(float(t), 0, 0) for t in range(3, 30)]
    sizes = run_trace(busy + idle)
    assert sizes[:3] == [8, 8, 8]
    # Low from t=3: the first step down at t=8, then one step per 5 s window
    steps = {t: size for (t, *_), size in zip(busy + idle, sizes, strict=True)}
    assert steps[7.0] == 8 and steps[8.0] == 7 and steps[12.0] == 7 and steps[13.0] == 6
    assert sizes[-1] == 3, "idle t=3..29: steps at 8, 13, 18, 23, 28; not all the way to 1"


def test_a_short_lull_between_bursts_does_not_flap() -> None:
    trace = [(0, 20, 8), (1, 20, 8), (2, 0, 2), (3, 0, 1), (4, 15, 8), (5, 0, 1), (6, 0, 1)]
    assert run_trace(trace) == [8, 8, 8, 8, 8, 8, 8]


def publish(app: Celery, queue: str, n: int, *, priority: int | None = None) -> None:
    options = {"priority": priority} if priority is not None else {}
    with app.producer_or_acquire() as producer:
        for i in range(n):
            app.send_task("probe.run", kwargs={"payload": {"id": f"d{i}"}}, queue=queue,
                          producer=producer, **options)  # fmt: skip


@pytest.fixture
def app() -> Iterator[Celery]:
    from config import app

    yield app


def test_redis_backlog_sums_the_priority_sub_queues(app: Celery) -> None:
    queue = f"depth-{uuid.uuid4().hex[:8]}"
    probe = probe_for(app)
    assert isinstance(probe, RedisDepth)
    try:
        # Given messages at three priorities: three lists in Redis
        publish(app, queue, 3)
        publish(app, queue, 2, priority=5)
        publish(app, queue, 4, priority=9)
        lists = [
            k for k in redis.Redis.from_url(BROKER_URL).keys(f"{queue}*") if b"binding" not in k
        ]
        assert len(lists) == 3
        depth = probe.sample([queue, "no-such-queue"])
        assert depth[queue].backlog == 9 and depth[queue].running == 0
        assert depth[queue].oldest_age_s is not None and 0 <= depth[queue].oldest_age_s < 60
        assert depth["no-such-queue"].backlog == 0
    finally:
        probe.close()
        client = redis.Redis.from_url(BROKER_URL)
        for key in client.keys(f"{queue}*"):
            client.delete(key)


def test_redis_probe_honours_the_global_key_prefix() -> None:
    prefixed = Celery("prefixed", broker=BROKER_URL)
    prefixed.conf.broker_transport_options = {"global_keyprefix": "tenant7:"}
    queue = f"depth-{uuid.uuid4().hex[:8]}"
    probe = probe_for(prefixed)
    try:
        publish(prefixed, queue, 5, priority=6)
        assert redis.Redis.from_url(BROKER_URL).keys(f"tenant7:{queue}*")
        assert probe.sample([queue])[queue].backlog == 5
    finally:
        probe.close()
        client = redis.Redis.from_url(BROKER_URL)
        for key in client.keys("tenant7:*"):
            client.delete(key)


def _rabbit_reachable() -> bool:
    """A TCP answer at the host and port of ``FLEET_TEST_AMQP_URL``."""
    from urllib.parse import urlsplit

    where = urlsplit(RABBIT_URL)
    try:
        with socket.create_connection((where.hostname or "127.0.0.1", where.port or 5672), 2):
            return True
    except OSError:
        return False


def test_rabbitmq_backlog_is_a_passive_declare() -> None:
    require(
        _rabbit_reachable(), f"RabbitMQ not reachable at {RABBIT_URL} (set FLEET_TEST_AMQP_URL)"
    )
    rabbit = Celery("rabbit", broker=RABBIT_URL)
    queue = f"depth-{uuid.uuid4().hex[:8]}"
    probe = probe_for(rabbit)
    assert isinstance(probe, AmqpDepth)
    try:
        publish(rabbit, queue, 7)
        assert probe.sample([queue])[queue].backlog == 7
        assert probe.sample(["no-such-queue"])["no-such-queue"].backlog == 0
        assert probe.sample([queue])[queue].backlog == 7, "usable after a missing queue"
    finally:
        probe.close()
        with rabbit.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)


@pytest.fixture
def scaling_worker(
    database_url: str, redis_client: redis.Redis, tmp_path: Path
) -> Iterator[Worker]:
    w = start_worker(
        database_url, tmp_path, f"scalew{os.getpid()}", autoscale="4,1",
        FLEET_AUTOSCALE_SCALE_DOWN_AFTER_S="1", FLEET_AUTOSCALE_TARGET_PER_WORKER="1",
    )  # fmt: skip
    yield w
    w.child.stop(15)


def pool_report(worker: Worker) -> dict[str, str]:
    key = f"{c.AUTOSCALE_KEY}{worker.name}@{socket.gethostname()}"
    raw = redis.Redis.from_url(LOCKS_URL).hgetall(key)
    return {k.decode(): v.decode() for k, v in raw.items()}


def test_a_worker_pool_grows_with_a_burst_and_shrinks_without_interrupting(
    scaling_worker: Worker,
) -> None:
    w = scaling_worker
    url = w.database_url
    wait_for(lambda: pool_report(w).get("actual") == "1", 20, "the pool idle at its minimum")
    # When a burst of 24 tasks of 300 ms arrives, with one task of 15 s
    w.enqueue("probe.run", {"id": "long", "work_ms": 15_000})
    for i in range(24):
        w.enqueue("probe.run", {"id": f"burst-{i}", "work_ms": 300})
    # Then the pool grows to its maximum
    wait_for(lambda: pool_report(w).get("actual") == "4", 20, "the pool at its maximum")

    def outcomes() -> dict[str, tuple[str, int]]:
        with transaction(url) as conn:
            rows = conn.execute(
                select(OUTCOMES.c.idempotency_key, OUTCOMES.c.status, OUTCOMES.c.attempts)
            ).all()
        return {str(k): (str(s), int(a)) for k, s, a in rows}

    def running() -> set[str]:
        return {r.key for r in inflight.all_records(redis.Redis.from_url(LOCKS_URL))}

    # (a first delivery writes its row with its outcome; running, it is an
    # in-flight record)
    wait_for(lambda: "probe:long" in running(), 20, "the long task to start")
    # And when the burst is done it shrinks to its minimum while the long task
    # still runs: the process that stays is the busy one
    wait_for(lambda: pool_report(w).get("actual") == "1", 30, "the pool back at its minimum")
    assert "probe:long" in running() and "probe:long" not in outcomes(), (
        "the shrink came after the long task"
    )
    assert sum(1 for s, _ in outcomes().values() if s == "succeeded") == 24
    wait_for(lambda: outcomes().get("probe:long", ("",))[0] == "succeeded", 30,
             "the long task to finish")  # fmt: skip
    # interrupting nothing: every task ran once, none was lost or redelivered
    assert sorted(outcomes().values()) == [("succeeded", 1)] * 25
    with transaction(url) as conn:
        assert conn.execute(select(GUARD_EVENTS.c.kind)).all() == []


def test_metrics_endpoint_reports_depth_and_the_scaling_signal(app: Celery) -> None:
    from fleetworks.metrics import serve
    from fleetworks.settings import Settings

    queue = f"metrics-{uuid.uuid4().hex[:8]}"
    settings = Settings(queue=queue, autoscale_target_per_worker=2)
    server = serve(app, settings, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        publish(app, queue, 5)
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        assert f'fleetworks_queue_backlog{{queue="{queue}"}} 5.0' in text
        assert f'fleetworks_workers_desired{{queue="{queue}"}} 3.0' in text
        assert f'fleetworks_queue_oldest_age_seconds{{queue="{queue}"}}' in text
        with urllib.request.urlopen(f"{base}/scale?queue={queue}", timeout=5) as reply:
            scale = json.load(reply)
        assert scale["load"] == 5 and scale["desired_workers"] == 3
    finally:
        server.shutdown()
        client = redis.Redis.from_url(BROKER_URL)
        for key in client.keys(f"{queue}*"):
            client.delete(key)
