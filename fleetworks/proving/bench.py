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

Beside the rates, each side's CPU time per task is counted: the worker's
process tree (its main process and its pool) and, where the broker runs on
this machine, the Redis server, read from the kernel's counters before and
after the side. The machine is shared, so a rate moves with its neighbours;
the CPU a task costs moves much less, and on a machine the bench saturates it
is what the rate ratio comes down to.

Where the time goes is measured apart, in-process: the guard is run on its
own over fresh keys while Redis ``INFO commandstats`` and an SQLAlchemy
statement counter record what each guarded task costs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import time
import uuid
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import psutil
import redis
from celery import Celery
from sqlalchemy import delete, event

from fleetworks import progress
from fleetworks.constants import PUBLISH_BATCH
from fleetworks.db import get_engine, sends_begin
from fleetworks.enqueue import enqueue_many
from fleetworks.procs import Child, celery_argv, fleet_env, wait_workers
from fleetworks.proving import probe
from fleetworks.settings import Settings

PLAIN, GUARDED = "probe.plain", "probe.run"
IDLE_QUEUE = "bench.idle"


def _drained(client: redis.Redis, queue: str) -> bool:
    return client.llen(queue) == 0 and client.hlen("unacked") == 0


class _Cpu:
    """CPU seconds used so far by a worker's process tree and a local Redis."""

    def __init__(self, worker_pid: int, client: redis.Redis) -> None:
        self.worker = psutil.Process(worker_pid)
        self.redis: psutil.Process | None = None
        try:
            pid = int(client.info("server")["process_id"])
            host = client.connection_pool.connection_kwargs.get("host", "")
            if host in ("127.0.0.1", "localhost", "::1") and psutil.pid_exists(pid):
                self.redis = psutil.Process(pid)
        except (redis.RedisError, KeyError, ValueError, psutil.Error):
            self.redis = None

    @staticmethod
    def _used(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return float(times.user + times.system)

    def sample(self) -> tuple[float, float, float | None]:
        """CPU seconds so far: the worker's main process, its pool, Redis."""
        main = self._used(self.worker)
        pool = 0.0
        for proc in self.worker.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                pool += self._used(proc)
        if self.redis is None:
            return main, pool, None
        try:
            return main, pool, self._used(self.redis)
        except psutil.Error:
            return main, pool, None


@dataclass(frozen=True, slots=True)
class _Round:
    tps: float
    #: CPU milliseconds per task: the worker's main process (which takes,
    #: dispatches and acknowledges messages), its pool (which runs them), and
    #: Redis (None if not local).
    main_cpu_ms: float
    pool_cpu_ms: float
    redis_cpu_ms: float | None


def _side(
    app: Any, client: redis.Redis, worker: str, task: str, *, n: int, tag: str, cpu: _Cpu
) -> _Round:
    """Tasks per second for ``n`` tasks of ``task`` already on their queue."""
    from fleetworks.app import fleet_of

    # A batch agent's messages go to its own queue beside the one named.
    queue = fleet_of(app).queue_for(task, f"bench.{task}") or f"bench.{task}"
    payloads = [{"id": f"{tag}-{i}", "effect": False} for i in range(n)]
    enqueue_many(app, task, payloads, queue=queue)
    cpu_before = cpu.sample()
    started = time.perf_counter()
    app.control.add_consumer(queue, destination=[worker], reply=True, timeout=5)
    while not _drained(client, queue):
        if progress.active():
            progress.update(f"bench: {task}", n - int(client.llen(queue)), n)
        time.sleep(0.002)
    elapsed = time.perf_counter() - started
    cpu_after = cpu.sample()
    progress.update(f"bench: {task}", n, n)
    app.control.cancel_consumer(queue, destination=[worker], reply=True, timeout=5)
    redis_ms = None
    if cpu_before[2] is not None and cpu_after[2] is not None:
        redis_ms = (cpu_after[2] - cpu_before[2]) / n * 1000
    main_ms = (cpu_after[0] - cpu_before[0]) / n * 1000
    return _Round(n / elapsed, main_ms, (cpu_after[1] - cpu_before[1]) / n * 1000, redis_ms)


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
    if sends_begin(engine):
        event.listen(engine, "begin", count)
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
        if sends_begin(engine):
            event.remove(engine, "begin", count)
    return {
        "redis_commands_per_task": round(redis_cmds / n, 2),
        "sql_statements_per_task": round(statements / n, 2),
        "guard_ms_per_task_in_process": round(elapsed / n * 1000, 3),
    }


#: The agent name the floor's rows are written under (and deleted after).
_FLOOR_AGENT = "bench.floor"


def _redis_round_trip_ms(client: redis.Redis, n: int) -> float:
    """Median milliseconds of one ``PING`` answered."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        client.ping()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _write_floor_ms(url: str, n: int) -> float:
    """Median milliseconds of a guarded task's one write, with nothing around it:
    ``BEGIN`` (``IMMEDIATE`` on SQLite), the outcome upsert the guard sends
    (the same SQL and values) and ``COMMIT``, on the driver's own connection:
    no SQLAlchemy connection, transaction or event around it, and none of the
    guard's Python."""
    from fleetworks.claims import compiled_settle, now
    from fleetworks.models import Outcome

    engine = get_engine(url)
    statement = compiled_settle(engine.dialect)
    sqlite = engine.dialect.name == "sqlite"
    tag = uuid.uuid4().hex[:8]
    times = []
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for i in range(n):
            stamp = now()
            values = {
                "agent": _FLOOR_AGENT, "entity_key": f"floor-{tag}-{i}",
                "idempotency_key": f"floor-{tag}-{i}", "fencing_token": 1,
                "task_id": f"floor-{tag}-{i}", "worker": "bench-floor", "queue": "bench",
                "queued_at": stamp, "status": "succeeded", "started_at": stamp,
                "finished_at": stamp, "payload": {"id": f"floor-{tag}-{i}", "effect": False},
                "result": None, "error": None,
            }  # fmt: skip
            started = time.perf_counter()
            params = statement.driver_params(values)
            if sqlite:
                cursor.execute("BEGIN IMMEDIATE")
            cursor.execute(statement.sql, params)
            cursor.fetchall()
            if sqlite:
                cursor.execute("COMMIT")
            else:
                raw.commit()
            times.append(time.perf_counter() - started)
        cursor.close()
    finally:
        raw.close()
    with get_engine(url).begin() as conn:
        conn.execute(delete(Outcome).where(Outcome.agent == _FLOOR_AGENT))
    return statistics.median(times) * 1000


def floor(settings: Settings, n: int = 300) -> dict[str, float]:
    """What a guarded task cannot cost less than here: its two Redis round
    trips (a ``PING`` each) and its one write transaction at the driver."""
    rtt = _redis_round_trip_ms(redis.Redis.from_url(settings.redis), n)
    write = _write_floor_ms(settings.database, n)
    return {
        "redis_round_trip_ms": round(rtt, 3),
        "database_write_ms": round(write, 3),
        "guard_floor_ms": round(2 * rtt + write, 3),
    }


def _race(
    app: Celery, settings: Settings, *, sides: tuple[str, str], tasks: int, rounds: int
) -> tuple[list[_Round], list[_Round]]:
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
    first: list[_Round] = []
    second: list[_Round] = []
    try:
        host = socket.gethostname()
        wait_workers(app, [f"{name}@{host}"], timeout_s=60)
        worker = f"{name}@{host}"
        cpu = _Cpu(child.pid, client)
        # Warm both paths (imports, connections, script loading) before timing.
        for task in sides:
            _side(app, client, worker, task, n=50, tag=f"{name}-warm", cpu=cpu)
        for r in range(rounds):
            order = [(sides[0], first), (sides[1], second)]
            for task, results in order if r % 2 == 0 else reversed(order):
                results.append(
                    _side(app, client, worker, task, n=tasks, tag=f"{name}-{r}", cpu=cpu)
                )
    finally:
        child.stop(30)
    return first, second


def _cpu_report(sides: dict[str, list[_Round]], tasks: int) -> dict[str, Any]:
    """Median CPU milliseconds per task of each side (the worker's main process,
    its pool, Redis and their total), the ratio of the first side's total to
    each other side's, and the resolution: the kernel counts CPU time in clock
    ticks (10 ms on Linux), so over a round of ``tasks`` a part that used less
    than one tick reads 0."""
    report: dict[str, Any] = {"resolution_ms": round(1000 / os.sysconf("SC_CLK_TCK") / tasks, 3)}
    totals: dict[str, float] = {}
    for side, rounds in sides.items():
        main = statistics.median(r.main_cpu_ms for r in rounds)
        pool = statistics.median(r.pool_cpu_ms for r in rounds)
        redis_ms = [r.redis_cpu_ms for r in rounds if r.redis_cpu_ms is not None]
        entry: dict[str, float | None] = {
            "worker_main": round(main, 3), "pool": round(pool, 3), "redis": None,
        }  # fmt: skip
        totals[side] = main + pool
        if len(redis_ms) == len(rounds):
            entry["redis"] = round(statistics.median(redis_ms), 3)
            totals[side] += statistics.median(redis_ms)
        entry["total"] = round(totals[side], 3)
        report[side] = entry
    base, *others = sides
    for side in others:
        report[f"ratio_{base}_to_{side}"] = round(totals[base] / totals[side], 3)
    return report


def run_throughput(app: Celery, settings: Settings, *, tasks: int, rounds: int) -> dict[str, Any]:
    plain_rounds, guarded_rounds = _race(
        app, settings, sides=(PLAIN, GUARDED), tasks=tasks, rounds=rounds
    )
    plain = [r.tps for r in plain_rounds]
    guarded = [r.tps for r in guarded_rounds]
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
        "cpu_ms_per_task": _cpu_report({"plain": plain_rounds, "guarded": guarded_rounds}, tasks),
        "where_time_goes": profile_guard(app, settings) | {"floor": floor(settings)},
    }


def run_batch(app: Celery, settings: Settings, *, tasks: int, rounds: int) -> dict[str, Any]:
    """Guarded keys per second through a batch agent (``probe.batch``, batches of
    :data:`~fleetworks.proving.probe.BATCH_SIZE`) against plain Celery messages
    per second, on the same worker in the same run."""
    plain_rounds, batched_rounds = _race(app, settings, sides=(PLAIN, probe.BATCHED), tasks=tasks,
                                         rounds=rounds)  # fmt: skip
    plain = [r.tps for r in plain_rounds]
    batched = [r.tps for r in batched_rounds]
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
        "cpu_ms_per_key": _cpu_report({"plain": plain_rounds, "batched": batched_rounds}, tasks),
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
    w, cpu = result["where_time_goes"], result["cpu_ms_per_task"]
    return "\n".join(
        [
            f"throughput, {result['tasks']} no-op tasks x {result['rounds']} rounds, "
            f"{result['pool']} pool, concurrency {result['concurrency']}",
            f"  plain Celery  {result['plain_tps']:>8} tasks/s   {result['rounds_plain_tps']}",
            f"  guarded       {result['guarded_tps']:>8} tasks/s   {result['rounds_guarded_tps']}",
            f"  ratio         {result['ratio']}",
            *(
                f"  CPU per task  {side:<8} {cpu[side]['total']} ms: worker main "
                f"{cpu[side]['worker_main']}, pool {cpu[side]['pool']}, Redis {cpu[side]['redis']}"
                for side in ("plain", "guarded")
            ),
            f"  (CPU is counted in steps of {cpu['resolution_ms']} ms per task: one clock tick "
            "over a round)",
            f"  per guarded task: {w['redis_commands_per_task']} Redis commands, "
            f"{w['sql_statements_per_task']} SQL statements, "
            f"{w['guard_ms_per_task_in_process']} ms of guard in-process",
            f"  its floor: {w['floor']['guard_floor_ms']} ms (2 Redis round trips of "
            f"{w['floor']['redis_round_trip_ms']} ms, the write alone "
            f"{w['floor']['database_write_ms']} ms)",
        ]
    )
