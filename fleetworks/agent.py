"""Binding an agent behaviour to Celery, with the guard around it.

``@fleet.agent(spec)`` turns ``behaviour(ctx, payload) -> result`` into a
Celery task that is late-acknowledged, rejected (requeued) when its worker
process is lost, and run through :class:`fleetworks.guard.Guard`. The task's
arguments are always ``payload=<JSON object>`` and optionally ``key=<str>``
(an explicit idempotency key); anything else is recorded as ``rejected``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from celery import Celery, Task

from fleetworks.context import AgentSpec, RetryRequested, RunContext
from fleetworks.guard import Guard
from fleetworks.hooks import ClaimKey, EntityLock, ValidatePayload
from fleetworks.redisconn import get_redis
from fleetworks.request import UNRUNNABLE, GuardedTask
from fleetworks.settings import Settings

Behaviour = Callable[[RunContext, Any], Any]

#: Name of the runtime's reaper task, scheduled by beat.
REAP_TASK = "fleet.reap"

#: Share of the hard time limit given as the soft limit, so a behaviour gets
#: ``SoftTimeLimitExceeded`` and can stop cleanly before it is killed.
SOFT_LIMIT_SHARE = 0.9


def unpack(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, str | None, str | None]:
    """(payload, explicit key, shape problem) from a task's raw arguments."""
    if UNRUNNABLE in kwargs:
        return None, None, str(kwargs[UNRUNNABLE])
    extra = set(kwargs) - {"payload", "key"}
    if args or extra or "payload" not in kwargs:
        got = f"{len(args)} positional args, keyword args {sorted(kwargs)}"
        return None, None, f"agent tasks take payload=<object> and optional key=<str>; got {got}"
    key = kwargs.get("key")
    if key is not None and not isinstance(key, str):
        return None, None, f"key must be a string, got {type(key).__name__}"
    return kwargs["payload"], key, None


class Fleet:
    """The runtime of one deployment: settings, guard, and the agents bound to it."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.lock = EntityLock(
            lambda: get_redis(settings.redis, **settings.redis_tls(settings.redis))
        )
        self.guard = Guard([ValidatePayload(), self.lock, ClaimKey(self.lock)])
        self.agents: dict[str, AgentSpec] = {}
        self.behaviours: dict[str, Behaviour] = {}
        self._register_reaper()

    def _register_reaper(self) -> None:
        fleet = self

        @self.app.task(name=REAP_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
        def reap() -> dict[str, Any]:
            """Republish claims whose holder is gone (see fleetworks.reaper)."""
            from fleetworks.reaper import reap as reap_orphans
            from fleetworks.reaper import restore_stranded

            keys = reap_orphans(fleet.app, fleet.settings.database, fleet.lock.locks)
            restored = restore_stranded(fleet.app, fleet, fleet.settings.database)
            return {"republished": len(keys), "restored": len(restored)}

    def agent(self, spec: AgentSpec) -> Callable[[Behaviour], Task]:
        """Decorator: bind ``behaviour`` to a guarded Celery task named ``spec.name``."""

        if spec.time_limit_s > self.settings.max_time_limit_s:
            raise ValueError(
                f"{spec.name}: time_limit_s {spec.time_limit_s} exceeds FLEET_MAX_TIME_LIMIT_S "
                f"{self.settings.max_time_limit_s}, from which the visibility timeout is derived"
            )

        def bind(behaviour: Behaviour) -> Task:
            fleet = self

            @self.app.task(  # type: ignore[untyped-decorator]
                name=spec.name,
                base=GuardedTask,
                bind=True,
                acks_late=True,
                reject_on_worker_lost=True,
                time_limit=spec.time_limit_s,
                soft_time_limit=spec.time_limit_s * SOFT_LIMIT_SHARE,
                max_retries=None,
                typing=False,
                ignore_result=True,
            )
            def run(task: Task, *args: Any, **kwargs: Any) -> Any:
                return fleet.execute(task, spec, behaviour, args, kwargs)

            run.agent_spec = spec
            run.free_orphaned_lease = lambda kwargs, tag: fleet.free_orphaned_lease(
                spec, kwargs, tag
            )
            self.agents[spec.name] = spec
            self.behaviours[spec.name] = behaviour
            return run

        return bind

    def free_orphaned_lease(self, spec: AgentSpec, kwargs: dict[str, Any], tag: str) -> bool:
        """In the worker's main process: delete the lease a lost child held."""
        payload, key, problem = unpack((), kwargs)
        if problem is not None or not isinstance(payload, dict):
            return False
        parsed = spec.payload.model_validate(payload)
        key = key if key is not None else spec.key(parsed)
        entity = spec.entity(parsed) if spec.entity else key
        return self.lock.locks.release_owner(entity, tag)

    def execute(
        self,
        task: Task,
        spec: AgentSpec,
        behaviour: Behaviour,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        payload, key, problem = unpack(args, kwargs)
        request = task.request
        delivery = request.delivery_info or {}
        ctx = RunContext(
            spec=spec,
            task_id=request.id or "",
            worker=f"{request.hostname or 'local'}/{os.getpid()}",
            raw_payload=payload if problem is None else {"args": args, "kwargs": kwargs},
            explicit_key=key,
            retries=request.retries or 0,
            database_url=self.settings.database,
            shape_error=problem,
            queue=delivery.get("routing_key"),
            delivery_tag=str(delivery.get("delivery_tag") or ""),
        )
        try:
            return self.guard.run(ctx, behaviour)
        except RetryRequested as again:
            raise task.retry(countdown=again.countdown, max_retries=None, exc=again.exc) from None
