"""A worker's pool sized by its queues' depth: Celery's ``worker_autoscaler``.

On one machine fleetworks scales pool processes inside one worker, not
worker processes, for three reasons. A new pool process is a fork of a
worker that has already imported the app and connected: capacity arrives
in milliseconds, where a new worker process needs seconds to start. Billiard
shrinks a pool by stopping idle processes only (a busy pool refuses to
shrink), so a scale-down never interrupts a task. And one worker keeps one
broker connection and one prefetch window, reserving up to the maximum.

Celery's own autoscaler sizes the pool from the tasks the worker has already
reserved (``len(state.reserved_requests)``), which never exceeds its
prefetch: it cannot see a backlog. This one looks at the broker through
:mod:`fleetworks.autoscale.depth` every ``AUTOSCALE_INTERVAL_S`` and follows
:mod:`fleetworks.autoscale.policy`; each look is also written to Redis
(``fleet:autoscale:<worker>``) for the ``/metrics`` endpoint.

Enable it with ``--autoscale=MAX,MIN`` (``fleetworks up`` passes the
``FLEET_AUTOSCALE_*`` settings); the app already names this class.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.worker.autoscale import Autoscaler

from fleetworks import constants as c
from fleetworks import stats
from fleetworks.app import settings_of
from fleetworks.autoscale.depth import DepthProbe, probe_for
from fleetworks.autoscale.policy import Policy, Scaler
from fleetworks.redisconn import get_redis

log = logging.getLogger(__name__)


class QueueDepthAutoscaler(Autoscaler):  # type: ignore[misc]
    def __init__(
        self,
        pool: Any,
        max_concurrency: int,
        min_concurrency: int = 0,
        *,
        worker: Any = None,
        keepalive: float = c.AUTOSCALE_INTERVAL_S,
        mutex: Any = None,
    ) -> None:
        super().__init__(
            pool, max_concurrency, min_concurrency, worker, keepalive=c.AUTOSCALE_INTERVAL_S,
            mutex=mutex,
        )  # fmt: skip
        settings = settings_of(worker.app)
        self.settings = settings
        policy = Policy(
            min_workers=max(1, min_concurrency),
            max_workers=max_concurrency,
            target_per_worker=settings.autoscale_target_per_worker,
            scale_down_after_s=settings.autoscale_scale_down_after_s,
        )
        self.scaler = Scaler(policy, current=max(1, min_concurrency))
        management = settings.rabbitmq_management_url
        self._probe: DepthProbe = probe_for(
            worker.app, management.get_secret_value() if management else None
        )
        self._looked_at = 0.0
        self._name = str(getattr(worker, "hostname", "worker"))

    @property
    def queues(self) -> list[str]:
        return sorted(self.worker.app.amqp.queues.consume_from)

    def _maybe_scale(self, req: Any = None) -> bool:
        now = time.monotonic()
        if now - self._looked_at < c.AUTOSCALE_INTERVAL_S * 0.9:
            return False
        self._looked_at = now
        try:
            depth = self._probe.sample(self.queues)
        except Exception as exc:
            log.warning("autoscale: queue depth unavailable (%s); pool left as it is", exc)
            return False
        backlog = sum(d.backlog for d in depth.values())
        running = sum(d.running for d in depth.values())
        procs = self.processes
        self.scaler.current = procs
        want = self.scaler.step(now, backlog, running)
        if want > procs:
            self.scale_up(want - procs)
        elif want < procs:
            self._shrink(procs - want)
        if want != procs:
            self._count_decision("up" if want > procs else "down")
        self._report(want, backlog, running, depth)
        return bool(want != procs)

    def _count_decision(self, direction: str) -> None:
        client = get_redis(self.settings.redis, **self.settings.redis_tls(self.settings.redis))
        for queue in self.queues:
            stats.count(client, stats.autoscale_field(queue, direction))

    def _report(self, desired: int, backlog: int, running: int, depth: dict[str, Any]) -> None:
        ages = [d.oldest_age_s for d in depth.values() if d.oldest_age_s is not None]
        fields: dict[bytes | bytearray | memoryview[int] | str | int | float, str | int | float] = {
            "desired": desired,
            "actual": self.processes,
            "backlog": backlog,
            "running": running,
            "oldest_age_s": max(ages) if ages else -1,
            "queues": ",".join(self.queues),
            "at": time.time(),
        }
        try:
            client = get_redis(self.settings.redis, **self.settings.redis_tls(self.settings.redis))
            key = c.AUTOSCALE_KEY + self._name
            with client.pipeline() as pipe:
                pipe.hset(key, mapping=fields)
                pipe.expire(key, c.AUTOSCALE_REPORT_TTL_S)
                pipe.execute()
        except Exception as exc:
            log.debug("autoscale: report not written (%s)", exc)

    def info(self) -> dict[str, Any]:
        base: dict[str, Any] = super().info()
        return base | {
            "policy": "queue depth",
            "target_per_worker": self.scaler.policy.target_per_worker,
        }
