"""``fleetworks bench events``: events end to end against plain Celery.

One worker (the fleet's pool) and one relay process serve every round. The
events side: one run of ``probe.emit`` stores N events in its transaction;
the relay sends each to ``probe.on_a`` and ``probe.on_b`` (2N guarded
subscriber runs that do nothing); the clock runs from the emitter's enqueue
until all 2N subscriber runs have their outcome. The plain side: 2N
``probe.plain`` tasks sent with ``send_task`` (pipelined, as the relay
sends) and consumed by the same pool, timed from the first send until the
queue is drained. Sides alternate first place between rounds; the report
is the median of each and their ratio, in events per second (one event =
two subscriber runs = two plain tasks).

Lag is, for every subscriber run, the time from the event's commit (its
``created_at``, set inside the emitting transaction: an upper bound of the
commit by the length of that transaction) to the run's start, p50 and p99
over all runs of all rounds.
"""

from __future__ import annotations

import socket
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery
from sqlalchemy import func, select

from fleetworks import progress
from fleetworks.db import transaction
from fleetworks.enqueue import enqueue
from fleetworks.models import EVENTS, OUTCOMES, TERMINAL
from fleetworks.procs import Child, celery_argv, fleet_env, wait_workers
from fleetworks.proving import probe
from fleetworks.settings import Settings


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _drained(client: redis.Redis, queue: str) -> bool:
    return client.llen(queue) == 0 and client.hlen("unacked") == 0


def _plain(app: Celery, client: redis.Redis, queue: str, n: int) -> float:
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            app.send_task(probe.PLAIN, kwargs={"payload": {}}, queue=queue, producer=producer)
    while not _drained(client, queue):
        time.sleep(0.002)
    return time.perf_counter() - started


def _handled(url: str, run: str) -> int:
    with transaction(url) as conn:
        ids = select(EVENTS.c.event_id).where(EVENTS.c.data["run"].as_string() == run)
        keys = [f"{s}|{i}" for s in probe.SUBSCRIBERS for i in conn.execute(ids).scalars()]
        if not keys:
            return 0
        return int(
            conn.execute(
                select(func.count()).where(
                    OUTCOMES.c.idempotency_key.in_(keys) & OUTCOMES.c.status.in_(TERMINAL)
                )
            ).scalar_one()
        )


def _events(app: Celery, url: str, n: int, run: str) -> tuple[float, list[float]]:
    started = time.perf_counter()
    enqueue(app, probe.EMIT, {"id": run, "count": n})
    while (handled := _handled(url, run)) < 2 * n:
        progress.update("bench: events handled", handled, 2 * n)
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    with transaction(url) as conn:
        created = dict(
            conn.execute(
                select(EVENTS.c.event_id, EVENTS.c.created_at).where(
                    EVENTS.c.data["run"].as_string() == run
                )
            ).all()
        )
        keys = {f"{s}|{i}": i for s in probe.SUBSCRIBERS for i in created}
        starts = conn.execute(
            select(OUTCOMES.c.idempotency_key, OUTCOMES.c.started_at).where(
                OUTCOMES.c.idempotency_key.in_(list(keys))
            )
        ).all()
    lags = [
        (_utc(started_at) - _utc(created[keys[key]])).total_seconds() * 1000
        for key, started_at in starts
    ]
    return elapsed, lags


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_events(app: Celery, settings: Settings, *, events: int, rounds: int) -> dict[str, Any]:
    client = redis.Redis.from_url(settings.broker)
    name = f"bench-events-{uuid.uuid4().hex[:6]}"
    env = fleet_env(settings, FLEET_TASK_MODULES=probe.task_modules(settings))
    logs = settings.home / "logs"
    argv = celery_argv(
        settings.app, "worker", "-n", f"{name}@%h", "-Q", settings.queue,
        "-c", str(settings.worker_concurrency), "-P", settings.worker_pool,
        "--loglevel", "WARNING", "--without-mingle", "--without-gossip",
    )  # fmt: skip
    worker = Child(name, argv, env, logs / "bench-events-worker.log").start()
    relay_argv = [sys.executable, "-m", "fleetworks", "-A", settings.app, "relay"]
    relay = Child(f"{name}-relay", relay_argv, env, logs / "bench-events-relay.log").start()
    plain: list[float] = []
    evented: list[float] = []
    lags: list[float] = []
    try:
        wait_workers(app, [f"{name}@{socket.gethostname()}"], timeout_s=60)
        # Warm both paths (imports, connections, scripts) before timing.
        _plain(app, client, settings.queue, 50)
        _events(app, settings.database, 25, f"{name}-warm")
        for r in range(rounds):
            sides = ["plain", "events"] if r % 2 == 0 else ["events", "plain"]
            for side in sides:
                if side == "plain":
                    plain.append(events / _plain(app, client, settings.queue, 2 * events))
                else:
                    elapsed, round_lags = _events(app, settings.database, events, f"{name}-{r}")
                    evented.append(events / elapsed)
                    lags += round_lags
    finally:
        relay.stop(10)
        worker.stop(30)
    plain_eps, events_eps = statistics.median(plain), statistics.median(evented)
    return {
        "events": events,
        "subscribers": len(probe.SUBSCRIBERS),
        "rounds": rounds,
        "concurrency": settings.worker_concurrency,
        "events_per_s": round(events_eps, 1),
        "plain_per_s": round(plain_eps, 1),
        "ratio": round(events_eps / plain_eps, 3),
        "lag_p50_ms": round(_percentile(lags, 0.5), 1),
        "lag_p99_ms": round(_percentile(lags, 0.99), 1),
        "rounds_events_per_s": [round(x, 1) for x in evented],
        "rounds_plain_per_s": [round(x, 1) for x in plain],
    }


def render(result: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"events, {result['events']} events x {result['subscribers']} subscribers x "
            f"{result['rounds']} rounds, concurrency {result['concurrency']}",
            f"  events end to end  {result['events_per_s']:>8} events/s  "
            f"{result['rounds_events_per_s']}",
            f"  plain Celery       {result['plain_per_s']:>8} events/s  "
            f"{result['rounds_plain_per_s']} (2 tasks per event)",
            f"  ratio              {result['ratio']}",
            f"  lag, commit to subscriber start: p50 {result['lag_p50_ms']} ms, "
            f"p99 {result['lag_p99_ms']} ms",
        ]
    )
