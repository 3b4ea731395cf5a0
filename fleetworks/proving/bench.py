"""``fleetworks bench throughput`` and ``bench batch``: the guard against plain Celery.

One worker process tree serves both sides of every round, so the machine,
pool and concurrency are the same: the worker starts consuming an idle queue;
each side's N tasks are published first, then the worker is told to consume
that side's queue (``add_consumer``) and the clock runs until the broker
holds nothing of it (queue empty, nothing unacked: with late acks, every
task has finished). Sides alternate first place between rounds; the report
is the median of each side and the ratio of the medians.

Plain side: ``probe.plain``, a no-op task with ``acks_late``, prefetch 1.
Guarded side: ``probe.run`` with ``effect: false``: validation, the entity
lock with its fencing token, the claim and the outcome row, and no effect.

Batch side (``bench batch``): ``probe.batch``, the same probe as a batch
agent (:mod:`fleetworks.batch`): every key leased, claimed and settled as
above, many keys per run.

Where the time goes is measured apart, in-process: the guard is run on its
own over fresh keys while Redis ``INFO commandstats`` and an SQLAlchemy
statement counter record what each guarded task costs.
"""

from __future__ import annotations

import socket
import statistics
import time
import uuid
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import redis
from celery import Celery
from sqlalchemy import event

from fleetworks import progress
from fleetworks.constants import PUBLISH_BATCH
from fleetworks.db import get_engine
from fleetworks.enqueue import enqueue_many
from fleetworks.procs import Child, celery_argv, fleet_env, wait_workers
from fleetworks.proving import probe
from fleetworks.settings import Settings

PLAIN, GUARDED = "probe.plain", "probe.run"
IDLE_QUEUE = "bench.idle"


def _drained(client: redis.Redis, queue: str) -> bool:
    return client.llen(queue) == 0 and client.hlen("unacked") == 0


def _side(app: Any, client: redis.Redis, worker: str, task: str, *, n: int, tag: str) -> float:
    """Tasks per second for ``n`` tasks of ``task`` already on their queue."""
    from fleetworks.app import fleet_of

    # A batch agent's messages go to its own queue beside the one named.
    queue = fleet_of(app).queue_for(task, f"bench.{task}") or f"bench.{task}"
    payloads = [{"id": f"{tag}-{i}", "effect": False} for i in range(n)]
    enqueue_many(app, task, payloads, queue=queue)
    started = time.perf_counter()
    app.control.add_consumer(queue, destination=[worker], reply=True, timeout=5)
    while not _drained(client, queue):
        if progress.active():
            progress.update(f"bench: {task}", n - int(client.llen(queue)), n)
        time.sleep(0.002)
    elapsed = time.perf_counter() - started
    progress.update(f"bench: {task}", n, n)
    app.control.cancel_consumer(queue, destination=[worker], reply=True, timeout=5)
    return n / elapsed


def _commandstats(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


def profile_guard(app: Celery, settings: Settings, n: int = 200) -> dict[str, float]:
    """Redis commands and SQL statements per guarded run, measured in-process."""
    from fleetworks.agent import AgentTask
    from fleetworks.app import fleet_of
    from fleetworks.guard import Delivery

    fleet = fleet_of(app)
    spec = fleet.require_agent(GUARDED)
    task = app.tasks[GUARDED]
    assert isinstance(task, AgentTask)

    statements = 0

    def count(*_: Any) -> None:
        nonlocal statements
        statements += 1

    engine = get_engine(settings.database)
    event.listen(engine, "before_cursor_execute", count)
    client = redis.Redis.from_url(settings.redis)
    tag = uuid.uuid4().hex[:8]
    try:
        before, started = _commandstats(client), time.perf_counter()
        for i in range(n):
            delivery = Delivery(
                task_id=f"profile-{tag}-{i}",
                worker="bench-profile",
                args=(),
                kwargs={"payload": {"id": f"profile-{tag}-{i}", "effect": False}},
            )
            fleet.guard.run(spec, type(task).behaviour, delivery)
        elapsed = time.perf_counter() - started
        # One INFO call of ours falls inside the window.
        redis_cmds = _commandstats(client) - before - 1
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return {
        "redis_commands_per_task": round(redis_cmds / n, 2),
        "sql_statements_per_task": round(statements / n, 2),
        "guard_ms_per_task_in_process": round(elapsed / n * 1000, 3),
    }


def _race(
    app: Celery, settings: Settings, *, sides: tuple[str, str], tasks: int, rounds: int
) -> tuple[list[float], list[float]]:
    """Tasks per second of each of two tasks, per round, on one worker."""
    client = redis.Redis.from_url(settings.broker)
    name = f"bench-{uuid.uuid4().hex[:6]}"
    argv = celery_argv(
        settings.app, "worker", "-n", f"{name}@%h", "-Q", IDLE_QUEUE,
        "-c", str(settings.worker_concurrency), "-P", settings.worker_pool,
        "--loglevel", "WARNING", "--without-mingle", "--without-gossip",
    )  # fmt: skip
    child = Child(
        name,
        argv,
        fleet_env(settings, FLEET_TASK_MODULES=probe.task_modules(settings)),
        settings.home / "logs" / "bench.log",
    ).start()
    first: list[float] = []
    second: list[float] = []
    try:
        host = socket.gethostname()
        wait_workers(app, [f"{name}@{host}"], timeout_s=60)
        worker = f"{name}@{host}"
        # Warm both paths (imports, connections, script loading) before timing.
        for task in sides:
            _side(app, client, worker, task, n=50, tag=f"{name}-warm")
        for r in range(rounds):
            order = [(sides[0], first), (sides[1], second)]
            for task, results in order if r % 2 == 0 else reversed(order):
                results.append(_side(app, client, worker, task, n=tasks, tag=f"{name}-{r}"))
    finally:
        child.stop(30)
    return first, second


def run_throughput(app: Celery, settings: Settings, *, tasks: int, rounds: int) -> dict[str, Any]:
    plain, guarded = _race(app, settings, sides=(PLAIN, GUARDED), tasks=tasks, rounds=rounds)
    plain_tps, guarded_tps = statistics.median(plain), statistics.median(guarded)
    return {
        "tasks": tasks,
        "rounds": rounds,
        "concurrency": settings.worker_concurrency,
        "pool": settings.worker_pool,
        "plain_tps": round(plain_tps, 1),
        "guarded_tps": round(guarded_tps, 1),
        "ratio": round(guarded_tps / plain_tps, 3),
        "rounds_plain_tps": [round(x, 1) for x in plain],
        "rounds_guarded_tps": [round(x, 1) for x in guarded],
        "where_time_goes": profile_guard(app, settings),
    }


def run_batch(app: Celery, settings: Settings, *, tasks: int, rounds: int) -> dict[str, Any]:
    """Guarded keys per second through a batch agent (``probe.batch``, batches of
    :data:`~fleetworks.proving.probe.BATCH_SIZE`) against plain Celery messages
    per second, on the same worker in the same run."""
    plain, batched = _race(app, settings, sides=(PLAIN, probe.BATCHED), tasks=tasks,
                           rounds=rounds)  # fmt: skip
    plain_tps, batched_kps = statistics.median(plain), statistics.median(batched)
    return {
        "tasks": tasks,
        "rounds": rounds,
        "batch_size": probe.BATCH_SIZE,
        "concurrency": settings.worker_concurrency,
        "pool": settings.worker_pool,
        "plain_tps": round(plain_tps, 1),
        "batched_keys_per_s": round(batched_kps, 1),
        "ratio": round(batched_kps / plain_tps, 3),
        "rounds_plain_tps": [round(x, 1) for x in plain],
        "rounds_batched_keys_per_s": [round(x, 1) for x in batched],
    }


#: How ``bench fanout`` publishes: Celery's ``send_task`` one round trip per
#: message, ``send_task`` in kombu's ``Producer.batch`` (its pipelines), and
#: ``enqueue_many``.
FANOUT_WAYS = ("send_task", "send_task_batched", "enqueue_many")
#: The task a fan-out publishes: the pricing agent's reprice.
FANOUT_TASK = "pricing.reprice"


def _publish_rate(app: Any, client: redis.Redis, n: int, way: str) -> float:
    """Messages per second publishing ``n`` reprice-sized tasks to a queue nobody reads."""
    from fleetworks.app import fleet_of

    # Where the pricing agent's messages go (a batch agent's own queue), for every way.
    queue = fleet_of(app).queue_for(FANOUT_TASK, f"bench.fanout.{uuid.uuid4().hex[:8]}")
    assert queue is not None
    payloads = [{"product_id": f"sku-{i:06d}", "tick": "t@0", "window": 0} for i in range(n)]
    started = time.perf_counter()
    if way == "enqueue_many":
        enqueue_many(app, FANOUT_TASK, payloads, queue=queue)
    else:
        with app.producer_or_acquire() as producer:
            batch: AbstractContextManager[Any] = (
                producer.batch(PUBLISH_BATCH) if way == "send_task_batched" else nullcontext()
            )
            with batch:
                for p in payloads:
                    app.send_task(FANOUT_TASK, kwargs={"payload": p}, queue=queue,
                                  producer=producer)  # fmt: skip
    elapsed = time.perf_counter() - started
    assert client.llen(queue) == n, "every message must be in the queue"
    client.delete(queue)
    return n / elapsed


def run_fanout(app: Celery, settings: Settings, *, tasks: int, rounds: int) -> dict[str, Any]:
    """``enqueue_many`` against Celery's ``send_task``, one publish per message
    and in kombu's publish batches, in the same run, the order turned each round."""

    client = redis.Redis.from_url(settings.broker)
    rates: dict[str, list[float]] = {way: [] for way in FANOUT_WAYS}
    for way in FANOUT_WAYS:
        _publish_rate(app, client, 200, way)  # connect, declare, warm
    for r in range(rounds):
        order = FANOUT_WAYS if r % 2 == 0 else tuple(reversed(FANOUT_WAYS))
        for way in order:
            rates[way].append(_publish_rate(app, client, tasks, way))
    median = {way: statistics.median(values) for way, values in rates.items()}
    return {
        "tasks": tasks,
        "rounds": rounds,
        **{f"{way}_per_s": round(median[way], 1) for way in FANOUT_WAYS},
        "ratio": round(median["enqueue_many"] / median["send_task"], 2),
        "ratio_to_batched": round(median["enqueue_many"] / median["send_task_batched"], 2),
        "rounds_per_s": {way: [round(x, 1) for x in values] for way, values in rates.items()},
    }


def render(result: dict[str, Any]) -> str:
    w = result["where_time_goes"]
    return "\n".join(
        [
            f"throughput, {result['tasks']} no-op tasks x {result['rounds']} rounds, "
            f"{result['pool']} pool, concurrency {result['concurrency']}",
            f"  plain Celery  {result['plain_tps']:>8} tasks/s   {result['rounds_plain_tps']}",
            f"  guarded       {result['guarded_tps']:>8} tasks/s   {result['rounds_guarded_tps']}",
            f"  ratio         {result['ratio']}",
            f"  per guarded task: {w['redis_commands_per_task']} Redis commands, "
            f"{w['sql_statements_per_task']} SQL statements, "
            f"{w['guard_ms_per_task_in_process']} ms of guard in-process",
        ]
    )
