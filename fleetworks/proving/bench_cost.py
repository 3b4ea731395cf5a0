"""``fleetworks bench cost``: what one task costs, counted rather than timed.

Counts do not move with the machine's load, so they are the figures a
capacity model can rest on. Three parts:

- **guard** (in this process): N guarded runs of ``probe.run`` over fresh
  keys, exactly as a worker's pool process runs them. Counted: Redis commands
  (the server's ``INFO commandstats``), Redis round trips (each request
  written on a connection, a pipeline or script being one), bytes to and from
  Redis (the server's ``INFO stats``), SQL statements and transactions (the
  engine's events).
- **enqueue** (in this process): N messages sent one by one with ``enqueue``
  and N with ``enqueue_many``, to a queue nobody reads; the same counts.
- **worker** (a real worker, as ``bench throughput`` starts one): N plain
  Celery tasks (``acks_late``) and N guarded no-ops, each sent and run to the
  end; Redis commands and bytes per task, server side, the publisher's
  included, with the commands that make them up. SQL is counted in the guard
  part only: the worker's pool processes run that same code, and nothing
  outside a process counts its statements exactly (PostgreSQL's
  ``pg_stat_database`` is flushed by each backend when it likes). Also
  measured there: the results database's growth per task (its size on disk,
  SQLite after a WAL checkpoint) and the worker's resident memory after the run.

What the server counts includes this process's own ``INFO`` calls: each
window's figures have an empty window's subtracted.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery
from redis.connection import AbstractConnection
from sqlalchemy import event, text

from fleetworks.db import get_engine, is_postgres, sends_begin
from fleetworks.enqueue import enqueue, enqueue_many
from fleetworks.procs import Child, celery_argv, fleet_env, wait_workers
from fleetworks.proving import probe
from fleetworks.proving.bench import GUARDED, IDLE_QUEUE, PLAIN, _drained
from fleetworks.settings import Settings


@dataclass
class Window:
    """What one counted stretch cost, in total."""

    commands: Counter[str] = field(default_factory=Counter)
    round_trips: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    statements: int = 0
    transactions: int = 0

    def per(self, n: int) -> dict[str, Any]:
        return {
            "redis_commands": round(sum(self.commands.values()) / n, 2),
            "redis_round_trips": round(self.round_trips / n, 2),
            "bytes_to_redis": round(self.bytes_in / n),
            "bytes_from_redis": round(self.bytes_out / n),
            "sql_statements": round(self.statements / n, 2),
            "sql_transactions": round(self.transactions / n, 2),
            "commands": {
                k: round(v / n, 2) for k, v in self.commands.most_common() if round(v / n, 2)
            },
        }


class Server:
    """The server-side counters of one Redis, read with ``INFO``."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        first = self._read()
        # An empty window: what reading the counters itself costs.
        self.own = self._diff(first, self._read())

    def _read(self) -> tuple[Counter[str], int, int]:
        stats = self.client.info("commandstats")
        calls = Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})
        net = self.client.info("stats")
        return calls, int(net["total_net_input_bytes"]), int(net["total_net_output_bytes"])

    @staticmethod
    def _diff(
        a: tuple[Counter[str], int, int], b: tuple[Counter[str], int, int]
    ) -> tuple[Counter[str], int, int]:
        calls = Counter(b[0])
        calls.subtract(a[0])
        return calls, b[1] - a[1], b[2] - a[2]

    @contextmanager
    def counting(self, window: Window) -> Iterator[None]:
        before = self._read()
        yield
        calls, bytes_in, bytes_out = self._diff(before, self._read())
        calls.subtract(self.own[0])
        window.commands.update({k: v for k, v in calls.items() if v > 0})
        window.bytes_in += bytes_in - self.own[1]
        window.bytes_out += bytes_out - self.own[2]


@contextmanager
def _round_trips(window: Window) -> Iterator[None]:
    """Count every request this process writes to any Redis connection."""
    original = AbstractConnection.send_packed_command

    def counted(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        window.round_trips += 1
        original(self, command, check_health)  # type: ignore[no-untyped-call]

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        yield
    finally:
        AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


@contextmanager
def _sql(url: str, window: Window) -> Iterator[None]:
    engine = get_engine(url)

    def statement(*_: Any) -> None:
        window.statements += 1

    def commit(*_: Any) -> None:
        window.transactions += 1

    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "commit", commit)
    if sends_begin(engine):
        event.listen(engine, "begin", statement)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", statement)
        event.remove(engine, "commit", commit)
        if sends_begin(engine):
            event.remove(engine, "begin", statement)


@contextmanager
def _in_process(server: Server, url: str, window: Window) -> Iterator[None]:
    # The server's counters are read outside the round-trip count.
    with server.counting(window), _round_trips(window), _sql(url, window):
        yield


def _guard(app: Celery, settings: Settings, server: Server, n: int) -> dict[str, Any]:
    from fleetworks.agent import AgentTask
    from fleetworks.app import fleet_of
    from fleetworks.guard import Delivery

    fleet = fleet_of(app)
    spec = fleet.require_agent(GUARDED)
    task = app.tasks[GUARDED]
    assert isinstance(task, AgentTask)
    tag = uuid.uuid4().hex[:8]

    def run(prefix: str, count: int) -> None:
        for i in range(count):
            delivery = Delivery(
                task_id=f"{prefix}-{tag}-{i}",
                worker="bench-cost",
                args=(),
                kwargs={"payload": {"id": f"{prefix}-{tag}-{i}", "effect": False}},
            )
            fleet.guard.run(spec, type(task).behaviour, delivery)

    run("warm", 20)  # scripts loaded, connections open
    window = Window()
    with _in_process(server, settings.database, window):
        run("cost", n)
    return window.per(n)


def _batch(app: Celery, settings: Settings, server: Server, n: int) -> dict[str, Any]:
    """Per key through a batch agent (``probe.batch``), in process: each run is
    handed one message, as Celery would, and takes the rest of its batch from
    the agent's queue, where they were published beforehand (not counted)."""
    from fleetworks.agent import AgentTask
    from fleetworks.app import fleet_of
    from fleetworks.guard import Delivery

    fleet = fleet_of(app)
    spec = fleet.require_agent(probe.BATCHED)
    task = app.tasks[probe.BATCHED]
    assert isinstance(task, AgentTask)
    size = probe.BATCH_SIZE
    queue = fleet.queue_for(probe.BATCHED, f"bench.cost.{uuid.uuid4().hex[:8]}")
    tag = uuid.uuid4().hex[:8]

    def batches(prefix: str, count: int) -> list[Delivery]:
        firsts = []
        for b in range(count):
            rest = [{"id": f"{prefix}-{tag}-{b}-{i}", "effect": False} for i in range(1, size)]
            enqueue_many(app, probe.BATCHED, rest, queue=queue)
            first = {"payload": {"id": f"{prefix}-{tag}-{b}-0", "effect": False}}
            firsts.append(Delivery(task_id=f"{prefix}-{tag}-{b}", worker="bench-cost", args=(),
                                   kwargs=first, queue=queue))  # fmt: skip
        return firsts

    def run(firsts: list[Delivery]) -> None:
        for first in firsts:
            fleet.batches.run(spec, type(task).behaviour, first)

    run(batches("warm", 1))
    count = max(1, n // size)
    firsts = batches("cost", count)  # all published first; each run takes the next 99
    window = Window()
    with _in_process(server, settings.database, window):
        run(firsts)
    return window.per(count * size)


def _enqueue(app: Celery, settings: Settings, server: Server, n: int) -> dict[str, Any]:
    queue = f"bench.cost.{uuid.uuid4().hex[:8]}"
    client = server.client
    payloads = [{"id": f"enq-{i}", "effect": False} for i in range(n)]
    enqueue_many(app, GUARDED, payloads[:20], queue=queue)  # declared, connected
    one, many = Window(), Window()
    with _in_process(server, settings.database, one):
        for p in payloads:
            enqueue(app, GUARDED, p, queue=queue)
    with _in_process(server, settings.database, many):
        enqueue_many(app, GUARDED, payloads, queue=queue)
    broker = redis.Redis.from_url(settings.broker)
    broker.delete(queue)
    # What the outbox holds for them is dropped with the queue: nobody will run them.
    client.delete("fleet:outbox", "fleet:outbox:at")
    return {"enqueue": one.per(n), "enqueue_many": many.per(n)}


#: Commands only this bench sends while it waits for a queue to drain.
POLLING = ("llen", "hlen")


def _window(server: Server, run: Callable[[], None]) -> tuple[Window, float]:
    window = Window()
    started = time.perf_counter()
    with server.counting(window):
        run()
    for name in POLLING:
        window.commands.pop(name, None)
    return window, time.perf_counter() - started


def _less(window: Window, other: Window, times: float = 1.0) -> None:
    """Take ``times`` x ``other`` out of ``window`` (never below zero)."""
    for name, count in other.commands.items():
        window.commands[name] = max(0, window.commands[name] - round(count * times))
    window.bytes_in = max(0, window.bytes_in - round(other.bytes_in * times))
    window.bytes_out = max(0, window.bytes_out - round(other.bytes_out * times))


@dataclass
class Rig:
    """One running worker, and what counts what it costs."""

    app: Celery
    settings: Settings
    server: Server
    worker: str

    def consume(self, queue: str, task: str, payloads: list[Any]) -> None:
        """Send ``payloads`` to ``queue``; have the worker consume it until drained."""
        client = redis.Redis.from_url(self.settings.broker)
        if payloads:
            enqueue_many(self.app, task, payloads, queue=queue)
        control = self.app.control
        control.add_consumer(queue, destination=[self.worker], reply=True, timeout=5)
        while not _drained(client, queue):
            time.sleep(0.01)
        control.cancel_consumer(queue, destination=[self.worker], reply=True, timeout=5)

    def side(self, task: str, n: int, tag: str) -> dict[str, Any]:
        """Server-side cost per task of sending and running ``n`` of ``task``.

        Taken out: what the worker does every second whatever it runs (its
        holder snapshot, the reaper's tick: counted over idle seconds, scaled
        to the window), and what telling it to consume costs (a window with
        no tasks in it)."""
        queue = f"bench.{task}"
        idle, idle_s = _window(self.server, lambda: time.sleep(2.0))
        control, control_s = _window(self.server, lambda: self.consume(queue, task, []))
        _less(control, idle, control_s / idle_s)
        payloads = [{"id": f"{tag}-{i}", "effect": False} for i in range(n)]
        size = _database_bytes(self.settings.database)
        window, took_s = _window(self.server, lambda: self.consume(queue, task, payloads))
        grown = _database_bytes(self.settings.database) - size
        _less(window, idle, took_s / idle_s)
        _less(window, control)
        result = window.per(n)
        for name in ("redis_round_trips", "sql_statements", "sql_transactions"):
            del result[name]
        result["background_commands_per_s"] = round(sum(idle.commands.values()) / idle_s, 1)
        result["database_bytes"] = round(grown / n)
        return result


def _database_bytes(url: str) -> int:
    """The results database's size on disk (SQLite: after a WAL checkpoint,
    outside any transaction, as a checkpoint must be)."""
    engine = get_engine(url)
    if is_postgres(url):
        with engine.connect() as conn:
            size = conn.execute(text("SELECT pg_database_size(current_database())"))
            return int(size.scalar_one())
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = cursor.execute("PRAGMA page_count").fetchone()[0]
        page = cursor.execute("PRAGMA page_size").fetchone()[0]
        cursor.close()
    finally:
        raw.close()
    return int(pages) * int(page)


def _rss_mib(pid: int | None) -> dict[str, float]:
    """Resident memory of the worker's main process and of each pool process."""
    import psutil

    if pid is None:
        return {}
    main = psutil.Process(pid)
    pool = [p.memory_info().rss for p in main.children()]
    mib = 1024 * 1024
    return {
        "main": round(main.memory_info().rss / mib, 1),
        "pool_each": round(max(pool, default=0) / mib, 1),
        "total": round((main.memory_info().rss + sum(pool)) / mib, 1),
    }


def _workers(app: Celery, settings: Settings, server: Server, n: int) -> dict[str, Any]:
    name = f"cost-{uuid.uuid4().hex[:6]}"
    argv = celery_argv(
        settings.app, "worker", "-n", f"{name}@%h", "-Q", IDLE_QUEUE,
        "-c", str(settings.worker_concurrency), "-P", settings.worker_pool,
        "--loglevel", "WARNING", "--without-mingle", "--without-gossip", "--without-heartbeat",
    )  # fmt: skip
    child = Child(
        name,
        argv,
        fleet_env(settings, FLEET_TASK_MODULES=probe.task_modules(settings)),
        settings.home / "logs" / "bench.log",
    ).start()
    try:
        worker = f"{name}@{socket.gethostname()}"
        wait_workers(app, [worker], timeout_s=60)
        rig = Rig(app, settings, server, worker)
        for task in (PLAIN, GUARDED):  # imports, connections, scripts
            rig.consume(f"bench.{task}", task, [{"id": f"{name}-warm-{i}"} for i in range(20)])
        return {
            "plain_celery": rig.side(PLAIN, n, name),
            "guarded": rig.side(GUARDED, n, name),
            "rss_mib": _rss_mib(child.pid),
        }
    finally:
        child.stop(30)


def run_cost(app: Celery, settings: Settings, *, tasks: int) -> dict[str, Any]:
    """Every figure per task (or per message), counted over ``tasks`` of each."""
    server = Server(redis.Redis.from_url(settings.redis))
    return {
        "tasks": tasks,
        "database": "postgresql" if is_postgres(settings.database) else "sqlite",
        "guard": _guard(app, settings, server, tasks),
        "batch_agent": _batch(app, settings, server, tasks),
        **_enqueue(app, settings, server, tasks),
        "worker": _workers(app, settings, server, tasks),
    }


def render(result: dict[str, Any]) -> str:
    lines = [f"cost per task, counted over {result['tasks']} ({result['database']})"]
    rows: list[tuple[str, dict[str, Any]]] = [
        ("guard (in process)", result["guard"]),
        ("batch agent, per key", result["batch_agent"]),
        ("enqueue, one by one", result["enqueue"]),
        ("enqueue_many", result["enqueue_many"]),
        ("worker: plain Celery", result["worker"]["plain_celery"]),
        ("worker: guarded", result["worker"]["guarded"]),
    ]
    show: Callable[[dict[str, Any], str], str] = lambda r, k: str(r.get(k, "-"))  # noqa: E731
    lines.append(
        f"  {'':<22} {'cmds':>6} {'trips':>6} {'B out':>7} {'B in':>7} {'stmts':>6} {'txns':>5}"
    )
    for label, r in rows:
        lines.append(
            f"  {label:<22} {show(r, 'redis_commands'):>6} {show(r, 'redis_round_trips'):>6} "
            f"{show(r, 'bytes_to_redis'):>7} {show(r, 'bytes_from_redis'):>7} "
            f"{show(r, 'sql_statements'):>6} {show(r, 'sql_transactions'):>5}"
        )
    return "\n".join(lines)
