"""``fleetworks bench autoscale``: a step load against an autoscaled pool and
against fixed pools of its minimum and maximum size, in the same run.

Each phase starts one worker on a queue of its own, lets it idle, then
publishes a burst of N probe tasks of ``work_ms`` each (with effects, so the
ledger can be counted) and waits until every one has settled. The autoscaled
phase also watches the pool its worker reports at each look
(``fleet:autoscale:<worker>``): ``reaction_s`` is burst start to the first
process added, ``full_capacity_s`` to the maximum, ``drain_s`` burst
published to every task settled (nothing waiting, nothing running),
``scale_down_s`` from then to the pool back at its minimum. ``interrupted``
counts tasks that needed a second delivery (a scale-down that killed one
would show here); ``lost`` tasks never settled; ``effects_duplicated`` is
ledger rows beyond one per key.
"""

from __future__ import annotations

import socket
import time
import uuid
from typing import Any

import redis
from celery import Celery
from sqlalchemy import func, select

from fleetworks import constants as c
from fleetworks.db import transaction
from fleetworks.enqueue import enqueue_many
from fleetworks.models import OUTCOMES, PROBE_EFFECTS, TERMINAL
from fleetworks.procs import Child, celery_argv, fleet_env, wait_workers
from fleetworks.proving import probe
from fleetworks.settings import Settings

AGENT = "probe.run"
#: Seconds each phase idles before its burst (the autoscaled pool must stay at min).
IDLE_S = 3.0


def _pool(client: redis.Redis, worker: str) -> int | None:
    actual = client.hget(c.AUTOSCALE_KEY + worker, "actual")
    return int(actual) if actual is not None else None


def _settled(url: str, tag: str) -> tuple[int, int]:
    """(keys settled, keys claimed more than once) of this phase."""
    o = OUTCOMES.c
    mine = o.idempotency_key.like(f"probe:{tag}-%")
    with transaction(url) as conn:
        settled = conn.execute(
            select(func.count()).where(mine & o.status.in_(TERMINAL))
        ).scalar_one()
        again = conn.execute(select(func.count()).where(mine & (o.attempts > 1))).scalar_one()
    return int(settled), int(again)


def _duplicated(url: str, tag: str) -> int:
    e = PROBE_EFFECTS.c
    with transaction(url) as conn:
        rows, keys = conn.execute(
            select(func.count(), func.count(func.distinct(e.effect_key))).where(
                e.effect_key.like(f"{tag}-%")
            )
        ).one()
    return int(rows) - int(keys)


class Phase:
    def __init__(self, app: Any, settings: Settings, label: str, pool_args: list[str]) -> None:
        self.app, self.settings, self.label = app, settings, label
        self.tag = f"as-{label}-{uuid.uuid4().hex[:6]}"
        self.queue = f"bench.{self.tag}"
        self.worker = f"{self.tag}@{socket.gethostname()}"
        argv = celery_argv(
            settings.app, "worker", "-n", f"{self.tag}@%h", "-Q", self.queue, *pool_args,
            "--loglevel", "INFO", "--without-mingle", "--without-gossip",
        )  # fmt: skip
        log = settings.home / "logs" / f"bench-{label}.log"
        self.child = Child(
            self.tag,
            argv,
            fleet_env(settings, FLEET_TASK_MODULES=probe.task_modules(settings)),
            log,
        )
        self.client = redis.Redis.from_url(settings.redis)

    def run(self, tasks: int, work_ms: int, timeout_s: float) -> dict[str, Any]:
        s = self.settings
        self.child.start()
        try:
            wait_workers(self.app, [self.worker], timeout_s=60)
            time.sleep(IDLE_S)
            idle_pool = _pool(self.client, self.worker)
            payloads = [{"id": f"{self.tag}-{i}", "work_ms": work_ms} for i in range(tasks)]
            started = time.monotonic()
            enqueue_many(self.app, AGENT, payloads, queue=self.queue)
            published = time.monotonic()
            seen = self._watch(tasks, started, timeout_s)
            settled_at = seen.pop("settled_at")
            scale_down = None
            if idle_pool is not None and settled_at is not None:
                deadline = (
                    time.monotonic() + s.autoscale_scale_down_after_s * s.autoscale_max_workers + 30
                )
                while time.monotonic() < deadline and _pool(self.client, self.worker) != idle_pool:
                    time.sleep(0.1)
                scale_down = round(time.monotonic() - settled_at, 2)
        finally:
            self.child.stop(60)
        settled, again = _settled(s.database, self.tag)
        return seen | {
            "idle_workers": idle_pool,
            "completion_s": round(settled_at - started, 2) if settled_at else None,
            "drain_s": round(settled_at - published, 2) if settled_at else None,
            "scale_down_s": scale_down,
            "interrupted": again,
            "lost": tasks - settled,
            "effects_duplicated": _duplicated(s.database, self.tag),
        }

    def _watch(self, tasks: int, started: float, timeout_s: float) -> dict[str, Any]:
        reaction = full = settled_at = None
        peak = 0
        low, high = self.settings.autoscale_min_workers, self.settings.autoscale_max_workers
        while time.monotonic() - started < timeout_s:
            now = time.monotonic()
            pool = _pool(self.client, self.worker)
            if pool is not None:
                peak = max(peak, pool)
                if reaction is None and pool > low:
                    reaction = round(now - started, 2)
                if full is None and pool >= high:
                    full = round(now - started, 2)
            if _settled(self.settings.database, self.tag)[0] >= tasks:
                settled_at = now
                break
            time.sleep(0.05)
        return {"reaction_s": reaction, "full_capacity_s": full, "peak_workers": peak,
                "settled_at": settled_at}  # fmt: skip


def run_autoscale(
    app: Celery, settings: Settings, *, tasks: int, work_ms: int, timeout_s: float
) -> dict[str, Any]:
    low, high = settings.autoscale_min_workers, settings.autoscale_max_workers
    auto = Phase(app, settings, "auto", ["--autoscale", f"{high},{low}"]).run(
        tasks, work_ms, timeout_s
    )
    fixed_max = Phase(app, settings, "max", ["-c", str(high)]).run(tasks, work_ms, timeout_s)
    fixed_min = Phase(app, settings, "min", ["-c", str(low)]).run(tasks, work_ms, timeout_s)
    ratio = (
        round(auto["completion_s"] / fixed_max["completion_s"], 3)
        if auto["completion_s"] and fixed_max["completion_s"]
        else None
    )
    return {
        "tasks": tasks,
        "work_ms": work_ms,
        "min_workers": low,
        "max_workers": high,
        "target_per_worker": settings.autoscale_target_per_worker,
        "scale_down_after_s": settings.autoscale_scale_down_after_s,
        **{k: v for k, v in auto.items()},
        "fixed_max_completion_s": fixed_max["completion_s"],
        "fixed_min_completion_s": fixed_min["completion_s"],
        "completion_vs_fixed_max": ratio,
        "lost": auto["lost"] + fixed_max["lost"] + fixed_min["lost"],
        "effects_duplicated": auto["effects_duplicated"]
        + fixed_max["effects_duplicated"]
        + fixed_min["effects_duplicated"],
    }


def render(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"autoscale: burst of {r['tasks']} tasks x {r['work_ms']} ms, pool "
            f"{r['min_workers']}..{r['max_workers']} (target {r['target_per_worker']} per process)",
            f"  idle pool {r['idle_workers']}, reaction {r['reaction_s']} s, full capacity "
            f"{r['full_capacity_s']} s, peak {r['peak_workers']}",
            f"  completion {r['completion_s']} s (fixed max {r['fixed_max_completion_s']} s, "
            f"fixed min {r['fixed_min_completion_s']} s): "
            f"{r['completion_vs_fixed_max']} x fixed max",
            f"  drain {r['drain_s']} s, back to min in {r['scale_down_s']} s",
            f"  interrupted {r['interrupted']}, lost {r['lost']}, "
            f"effects duplicated {r['effects_duplicated']}",
        ]
    )
