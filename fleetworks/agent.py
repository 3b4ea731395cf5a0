"""A fleet: the runtime bound to one Celery app, and the agents bound to it.

``@fleet.agent(spec)`` turns ``behaviour(ctx, payload) -> result`` into an
:class:`AgentTask`: late-acknowledged, rejected (requeued) when its worker
process is lost, and run through :class:`fleetworks.guard.Guard`. Its
arguments are always those :mod:`fleetworks.message` builds; anything else is
recorded as ``rejected``.

What the guard decided is the Celery state Flower shows, once the outcome is
recorded (:meth:`AgentTask.run_guarded`):

- ``SUCCESS``: the behaviour ran (result ``{"status": "succeeded", "result": ...}``)
  or the delivery had nothing left to do: its key was already done
  (``skipped_duplicate``), its entity busy for an agent that skips
  (``skipped_locked``), or it lost its right to write to a newer holder of
  its key, which does the work (``stale_write``); result
  ``{"status": ..., "detail": ...}``;
- ``FAILURE``: a payload the agent refuses (:class:`RejectedError`, with the
  reason) or a dead letter (a key declared dead, a delivery of a dead key, a
  behaviour that failed its last attempt: :class:`DeadLetterError`, naming
  the key); never retried, the message acknowledged
  (``task_acks_on_failure_or_timeout``);
- ``RETRY``: the guard asked for the message again later (a retried failure,
  a contended lock, a deferred event).

Celery's ``Reject`` is not used for a refused payload: its ``REJECTED`` state
ranks below ``STARTED`` in Celery's event state, so Flower would show the
task as ``STARTED`` forever (celery/celery#4222, mher/flower#487).
"""

from __future__ import annotations

import logging
import math
import os
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from celery import Celery, Task
from kombu.transport.native_delayed_delivery import MAX_NUMBER_OF_BITS_TO_USE

from fleetworks import kombu_redis, logs, message, reaper, retention, tracing
from fleetworks.batch import BatchGuard, batch_queue
from fleetworks.constants import BATCH_INFIX, SENT_AT_HEADER
from fleetworks.context import AgentSpec, RunContext
from fleetworks.controllers import ControllerContext, ControllerSpec, bind_shared, make_spec
from fleetworks.guard import Behaviour, Delivery, Guard, RetryRequested
from fleetworks.ledger import Ledger
from fleetworks.locks import EntityLocks, Heartbeat
from fleetworks.models import Ended, EventKind, Status
from fleetworks.redisconn import get_redis
from fleetworks.request import GuardedTask
from fleetworks.settings import Settings
from fleetworks.timing import Timings

#: Share of the hard time limit given as the soft limit, so a behaviour gets
#: ``SoftTimeLimitExceeded`` and can stop cleanly before it is killed.
SOFT_LIMIT_SHARE = 0.9

log = logging.getLogger(__name__)

#: The prefix Celery's native delayed delivery (RabbitMQ quorum queues) puts
#: before a delayed message's routing key: the countdown, one bit per word.
_DELAY_PREFIX = re.compile(rf"^(?:[01]\.){{{MAX_NUMBER_OF_BITS_TO_USE}}}")


def queue_of(routing_key: str | None) -> str | None:
    """The queue a message was sent to, from its routing key: a message that
    went through native delayed delivery carries its countdown in front."""
    return _DELAY_PREFIX.sub("", routing_key, count=1) if routing_key else routing_key


_FLEETS: weakref.WeakKeyDictionary[Celery, Fleet] = weakref.WeakKeyDictionary()

#: Agents declared with :func:`shared_agent`: bound to every fleet, present and future.
_SHARED: list[tuple[AgentSpec, Behaviour, dict[str, Any]]] = []


def fleets() -> list[Fleet]:
    """The fleets of this process, the newest first."""
    return list(reversed(list(_FLEETS.values())))


def shared_agent(spec: AgentSpec, **options: Any) -> Callable[[Behaviour], Behaviour]:
    """Declare an agent without importing an app, the way Celery's ``shared_task`` does.

    The behaviour is bound to every fleet that exists now and to each one
    made later, so a task module never needs the deployment's app: the worker
    imports it (``init_app(modules=[...])`` or ``FLEET_TASK_MODULES``) and it
    joins that worker's fleet.
    """

    def declare(behaviour: Behaviour) -> Behaviour:
        _SHARED.append((spec, behaviour, options))
        for fleet in list(_FLEETS.values()):
            fleet.agent(spec, **options)(behaviour)
        return behaviour

    return declare


class UnknownAgentError(LookupError):
    """A name no agent of the fleet has; the message lists the known ones."""


class DeadLetterError(Exception):
    """A delivery whose key is dead, raised once its outcome is recorded, so
    Celery and Flower show it as ``FAILURE``; never retried."""


class RejectedError(Exception):
    """A payload the agent refuses, raised once the ``rejected`` row is
    recorded, so Celery and Flower show it as ``FAILURE``; never retried."""


class AgentTask(GuardedTask):
    """The Celery task of one agent. ``fleet``, ``spec`` and ``behaviour`` are
    set on the subclass :meth:`Fleet.agent` creates."""

    fleet: ClassVar[Fleet]
    agent_spec: ClassVar[AgentSpec]
    behaviour: ClassVar[Behaviour]
    #: The lease and the visibility timeout derive from the spec's time limit:
    #: a message cannot set another (a shorter one would kill the pool process).
    keeps_own_time_limits = True

    def run_guarded(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        request = self.request
        info = request.delivery_info or {}
        delivery = Delivery(
            task_id=request.id or "",
            worker=f"{request.hostname or 'local'}/{os.getpid()}",
            args=tuple(args),
            kwargs=kwargs,
            retries=request.retries or 0,
            queue=_queue_name(queue_of(info.get("routing_key"))),
            delivery_tag=str(info.get("delivery_tag") or ""),
            sent_at=_sent_at(request),
            trace=tracing.request_carrier(request),
        )
        with logs.bind_run(agent=self.name, task_id=delivery.task_id, worker=delivery.worker):
            return self._guarded(delivery, kwargs)

    def eta_horizon_s(self) -> float | None:
        """A message due later than the visibility timeout would be handed out again first."""
        return self.fleet.timings.visibility_timeout_s

    def _guarded(self, delivery: Delivery, kwargs: dict[str, Any]) -> Any:
        """The guard's run, its decision turned into the Celery state Flower shows."""
        spec, behaviour = self.agent_spec, type(self).behaviour
        try:
            if spec.batch is not None and self.fleet.batching:
                result = self.fleet.batches.run(spec, behaviour, delivery)
            else:
                result = self.fleet.guard.run(spec, behaviour, delivery)
        except RetryRequested as again:
            countdown = again.countdown
            if self.fleet.settings.queue_type == "quorum":
                # Native delayed delivery counts whole seconds and refuses a
                # countdown under one: round up, never down to no wait at all.
                countdown = math.ceil(countdown)
            raise self.retry(countdown=countdown, max_retries=None, exc=again.exc) from None
        except Exception as exc:
            key = self.key_of(kwargs)
            if key is None or not self._is_dead(key):
                raise
            why = f"{type(exc).__name__}: {exc}"
            raise DeadLetterError(f"{self.name} key {key!r} is dead: {why}") from exc
        if not isinstance(result, Ended):
            return {"status": str(Status.SUCCEEDED), "result": result}
        status, detail = result["status"], result["detail"]
        if status == Status.REJECTED:
            log.warning("%s[%s] rejected: %s", self.name, delivery.task_id, detail)
            raise RejectedError(f"{self.name} rejected the message: {detail}")
        if status == EventKind.SKIPPED_DEAD:
            key = self.key_of(kwargs) or "?"
            raise DeadLetterError(f"{self.name} key {key!r} is dead: {detail}")
        return dict(result)

    def _is_dead(self, key: str) -> bool:
        try:
            return self.fleet.ledger.terminal_status(key) == Status.DEAD
        except Exception:
            return False  # the original error says more than this one

    def key_of(self, kwargs: dict[str, Any]) -> str | None:
        """The idempotency key of a delivery's arguments, or None if they have none."""
        parsed = message.unpack((), kwargs)
        if isinstance(parsed, message.Problem):
            return None
        try:
            payload = self.agent_spec.payload.model_validate(parsed.payload)
            return self.agent_spec.identify(payload, parsed.key).key
        except Exception:
            return None

    def free_orphaned_lease(self, kwargs: dict[str, Any], delivery_tag: str) -> bool:
        parsed = message.unpack((), kwargs)
        if isinstance(parsed, message.Problem) or not isinstance(parsed.payload, dict):
            return False
        payload = self.agent_spec.payload.model_validate(parsed.payload)
        entity = self.agent_spec.identify(payload, parsed.key).entity
        return self.fleet.locks.release_owner(entity, delivery_tag)


class Fleet:
    """The runtime of one Celery app: settings, ledger, locks, guard and agents.

    Made by :func:`fleetworks.init_app`; found again with :meth:`Fleet.of`.
    """

    def __init__(self, app: Celery, settings: Settings, *, migrations: str | None = None) -> None:
        self.app = app
        self.settings = settings
        self.migrations = migrations
        self.timings = Timings.from_settings(settings)
        self.ledger = Ledger(settings.database)
        self._locks: EntityLocks | None = None
        self._client_id = 0
        self.heartbeat = Heartbeat(lambda: self.locks)
        self.guard = Guard(self.ledger, lambda: self.locks, self.heartbeat, app=app,
                           done_mark_s=self.timings.done_mark_s)  # fmt: skip
        self.agents: dict[str, AgentSpec] = {}
        #: The queue of each batch agent (:mod:`fleetworks.batch`), by agent name.
        self.batch_queues: dict[str, str] = {}
        #: Whether batch agents take many messages per run (a Redis broker).
        self.batching = kombu_redis.is_redis(app)
        self._batches: BatchGuard | None = None
        #: Controllers declared for this fleet (:mod:`fleetworks.controllers`), by name.
        self.controllers: dict[str, ControllerSpec] = {}
        self._imported = False
        reaper.register(self)
        retention.register(self)
        _FLEETS[app] = self
        for spec, behaviour, options in _SHARED:
            self.agent(spec, **options)(behaviour)
        bind_shared(self)

    @staticmethod
    def of(app: Celery) -> Fleet:
        fleet = _FLEETS.get(app)
        if fleet is None:
            raise LookupError(
                f"Celery app {app.main!r} has no fleet: call fleetworks.init_app(app) where "
                "the app is created"
            )
        return fleet

    @property
    def batches(self) -> BatchGuard:
        """The guard of batch agents' runs."""
        if self._batches is None:
            self._batches = BatchGuard(self)
        return self._batches

    @property
    def locks(self) -> EntityLocks:
        """The lock store on this process's Redis client (new after a fork)."""
        client = get_redis(self.settings.redis, **self.settings.redis_tls(self.settings.redis))
        if self._locks is None or self._client_id != id(client):
            self._locks = EntityLocks(client)
            self._client_id = id(client)
        return self._locks

    def agent(self, spec: AgentSpec, **options: Any) -> Callable[[Behaviour], Task]:
        """Decorator: bind ``behaviour`` to a guarded Celery task named ``spec.name``.

        ``options`` are further Celery task options (``queue``, ``rate_limit``, ...).
        """
        if spec.time_limit_s > self.settings.max_time_limit_s:
            raise ValueError(
                f"{spec.name}: time_limit_s {spec.time_limit_s} exceeds FLEET_MAX_TIME_LIMIT_S "
                f"{self.settings.max_time_limit_s}, from which the visibility timeout is derived"
            )

        # Never auto-retried, whatever autoretry_for says: their outcome is final.
        final = (*options.pop("dont_autoretry_for", ()), RejectedError, DeadLetterError)
        options["dont_autoretry_for"] = final
        # A refused payload is the sender's error: logged without a traceback.
        options["throws"] = (*options.pop("throws", ()), RejectedError)

        if spec.batch is not None and self.batching:
            # Its own queue beside the one it would use (fleetworks.batch),
            # routed there by the fleet's router, whatever the caller; on
            # RabbitMQ it runs one message per run on the queue it would use.
            base = options.pop("queue", None) or self.settings.queue
            self.batch_queues[spec.name] = batch_queue(str(base), spec.name)

        def bind(behaviour: Behaviour) -> Task:
            # shared=False: Celery would otherwise add this task, bound to this
            # fleet, to every app finalized later in the process, where it could
            # win over that app's own (shared_agent is fleetworks' sharing).
            task = self.app.task(
                shared=False,
                name=spec.name,
                base=AgentTask,
                bind=True,
                fleet=self,
                agent_spec=spec,
                behaviour=staticmethod(behaviour),
                acks_late=True,
                reject_on_worker_lost=True,
                time_limit=spec.time_limit_s,
                soft_time_limit=spec.time_limit_s * SOFT_LIMIT_SHARE,
                max_retries=None,
                typing=False,
                ignore_result=True,
                **options,
            )(_agent_run)
            self.agents[spec.name] = spec
            return task

        return bind

    def queue_for(self, agent: str, queue: str | None) -> str | None:
        """The queue a message of ``agent`` goes to when its sender names
        ``queue`` (None: the default): a batch agent's own queue beside it."""
        if agent not in self.agents:
            self.import_task_modules()  # where its spec says whether it batches
        own = self.batch_queues.get(agent)
        if own is None or (queue is not None and queue.endswith(BATCH_INFIX + agent)):
            return queue
        return own if queue is None else batch_queue(queue, agent)

    def controller(
        self, *, groups: Sequence[str], every_s: float, name: str | None = None
    ) -> Callable[[Callable[[ControllerContext], Any]], Callable[[ControllerContext], Any]]:
        """Decorator: run ``loop(ctx)`` every ``every_s`` for each of ``groups``,
        only in that group's leader (``fleetworks controllers``; see
        :mod:`fleetworks.controllers` for the context, the fence and the spread)."""

        def declare(loop: Callable[[ControllerContext], Any]) -> Callable[[ControllerContext], Any]:
            spec = make_spec(loop, groups, every_s, name)
            self.controllers[spec.name] = spec
            return loop

        return declare

    def import_task_modules(self) -> None:
        """Import the app's task modules once (where its agents are declared)."""
        if not self._imported:
            self.app.loader.import_default_modules()
            self._imported = True

    def require_agent(self, name: str) -> AgentSpec:
        """The spec of agent ``name``, or :class:`UnknownAgentError` naming the known ones."""
        if name not in self.agents:
            self.import_task_modules()
        spec = self.agents.get(name)
        if spec is None:
            raise UnknownAgentError(self._unknown(name))
        return spec

    def require_task(self, name: str) -> None:
        """Refuse a name that is neither an agent nor another task of the app."""
        if name in self.agents or name in self.app.tasks:
            return
        self.import_task_modules()
        if name not in self.agents and name not in self.app.tasks:
            raise UnknownAgentError(self._unknown(name))

    def _unknown(self, name: str) -> str:
        known = ", ".join(sorted(self.agents)) or "none"
        return f"unknown agent {name!r} for app {self.app.main!r}; known agents: {known}"


def _sent_at(request: Any) -> float | None:
    """The ``fleet_sent_at`` header (Celery exposes custom headers on the request)."""
    stamp = getattr(request, SENT_AT_HEADER, None)
    if stamp is None:
        stamp = (getattr(request, "headers", None) or {}).get(SENT_AT_HEADER)
    return float(stamp) if isinstance(stamp, int | float) and not isinstance(stamp, bool) else None


def _queue_name(routing_key: Any) -> str | None:
    """The queue a delivery came from, when its routing key is one a row can hold."""
    if isinstance(routing_key, str) and 0 < len(routing_key) <= 200:
        return routing_key if message.unstorable_text(routing_key) is None else None
    return None


def _agent_run(task: AgentTask, *args: Any, **kwargs: Any) -> Any:
    """The body of every agent task: the guard around the agent's behaviour."""
    return task.run_guarded(args, kwargs)


__all__ = [
    "AgentSpec",
    "AgentTask",
    "DeadLetterError",
    "Fleet",
    "RejectedError",
    "RunContext",
    "UnknownAgentError",
    "shared_agent",
]
