"""A Celery app configured for the guarantees fleetworks makes.

Two ways in. :func:`create_app` builds a new app for a deployment that is
only a fleet (this repository's ``config``). :func:`init_app` takes a team's
existing Celery app, applies the fleet's configuration to it and returns its
:class:`~fleetworks.agent.Fleet`; a setting the team chose that would break
a guarantee is refused with an error naming the setting, never silently
overridden:

- JSON only: a message that can run code when decoded (pickle, yaml) is
  never accepted (``accept_content``, ``task_serializer``);
- late acknowledgement and requeue when a pool process is lost
  (``task_acks_late``, ``task_reject_on_worker_lost``): a message leaves
  the broker only once its outcome is written;
- a broker visibility timeout no shorter than the derived one
  (:mod:`fleetworks.timing`), so a running task is not handed to a second
  worker.

Everything else the app already sets (its broker, queues, routes, other
tasks) is the team's and is kept. :func:`load_app` finds an app from a
``module[:attribute]`` reference the way ``celery -A`` does.
"""

from __future__ import annotations

import os
import ssl
import sys
import time
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.app.utils import find_app
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    before_task_publish,
    celeryd_init,
    worker_process_init,
)
from kombu.entity import Queue

from fleetworks import batch, db, holders, kombu_redis, logs, outbox, redisconn, retention, timing
from fleetworks import constants as c
from fleetworks import tracing as _tracing  # noqa: F401  (connects the process signals)
from fleetworks.reaper import REAP_TASK, control_queue
from fleetworks.reaper import schedule_entry as reaper_entry
from fleetworks.request import GuardedTask
from fleetworks.settings import Settings

if TYPE_CHECKING:
    from fleetworks.agent import Fleet

#: Content types whose decoding can run code: never accepted by a fleet.
UNSAFE_CONTENT = frozenset(
    {"pickle", "application/x-python-serialize", "yaml", "application/x-yaml"}
)


class GuaranteeError(ValueError):
    """The app's configuration would break a guarantee; the message names the setting."""


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings of a fleet app."""
    return {
        "broker_url": settings.broker,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        "task_default_queue": settings.queue,
        "task_queues": [
            fleet_queue(settings, name) for name in (settings.queue, control_queue(settings.queue))
        ],
        "task_create_missing_queues": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": transport_options(settings),
        "broker_use_ssl": broker_tls(settings),
        # The pool is sized by queue depth when the worker runs with
        # --autoscale (fleetworks.autoscale.worker).
        "worker_autoscaler": "fleetworks.autoscale.worker:QueueDepthAutoscaler",
        "beat_scheduler": "fleetworks.beat:FleetScheduler",
        "beat_max_loop_interval": c.BEAT_LOOP_S,
        "timezone": "UTC",
        "enable_utc": True,
        **queue_type_config(settings),
    }


#: Queue arguments of a RabbitMQ quorum queue.
QUORUM_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}


def fleet_queue(settings: Settings, name: str) -> Queue:
    """A queue the fleet declares (its agent queue, its control queue), of the
    settings' queue type, bound under its own name.

    Celery would bind a queue declared without a routing key under the
    default one (the agent queue's name): through an exchange that routes by
    binding (a topic exchange, as quorum queues use), every message for the
    agent queue would then land on the control queue too. On a direct
    exchange Celery sends straight to the queue, so classic queues never
    showed it.
    """
    arguments = dict(QUORUM_ARGUMENTS) if settings.queue_type == "quorum" else None
    return Queue(name, routing_key=name, queue_arguments=arguments)  # type: ignore[no-untyped-call]


def queue_type_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings quorum queues need (``FLEET_QUEUE_TYPE=quorum``, RabbitMQ).

    Following Celery's "Using Quorum Queues": every queue the fleet declares
    or creates on the fly is a quorum queue; the workers use per-consumer
    QoS (quorum queues have no global QoS); countdowns (the guard's retries)
    go through Celery's native delayed delivery, which binds topic exchanges
    only, so the fleet's exchanges are topic exchanges; publisher confirms
    are on for every RabbitMQ broker (:func:`transport_options`). Quorum
    queues have no priorities: the fleet sets none, and refuses an app that
    does (:func:`check_guarantees`).
    """
    if settings.queue_type != "quorum":
        return {}
    return {
        "task_default_queue_type": "quorum",
        "task_create_missing_queue_type": "quorum",
        "task_default_exchange_type": "topic",
        "task_create_missing_queue_exchange_type": "topic",
        "worker_detect_quorum_queues": True,
    }


def visibility_timeout_s(settings: Settings) -> float:
    """How long the broker waits before handing an unacked message to another
    worker (see :class:`fleetworks.timing.Timings`)."""
    return timing.Timings.from_settings(settings).visibility_timeout_s


def transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's transport options: the Redis transport's visibility timeout and
    restore pace (other transports ignore them); on RabbitMQ, publisher confirms."""
    options: dict[str, Any] = {
        "visibility_timeout": visibility_timeout_s(settings),
        "unacked_restore_interval": timing.UNACKED_RESTORE_INTERVAL_S,
        "unacked_restore_throttle": 1,
    }
    if settings.amqp:
        options["confirm_publish"] = True
    return options


def broker_tls(settings: Settings) -> dict[str, Any] | None:
    """kombu's ``broker_use_ssl`` for a ``rediss://`` broker (the same CA and
    check as the lock client), else None."""
    options = settings.redis_tls(settings.broker)
    if not options:
        return None
    reqs = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
    tls: dict[str, Any] = {"ssl_cert_reqs": reqs[options["ssl_cert_reqs"]]}
    if "ssl_ca_certs" in options:
        tls["ssl_ca_certs"] = options["ssl_ca_certs"]
    return tls


def _set(app: Celery, key: str) -> bool:
    """Whether the app's own configuration sets ``key``: the loaded settings are
    a chain of maps whose last one is Celery's defaults."""
    app.conf.get("broker_url")  # loads a pending configuration
    return any(key in layer for layer in app._conf.maps[:-1])


def _chosen(app: Celery, key: str) -> Any:
    """The value the app's own configuration set for ``key``, or None if it left the default."""
    return app.conf[key] if _set(app, key) else None


def check_guarantees(app: Celery, settings: Settings) -> None:
    """Raise :class:`GuaranteeError` for a setting of ``app`` that breaks a guarantee."""
    accepted = _chosen(app, "accept_content") or []
    unsafe = sorted(set(accepted) & UNSAFE_CONTENT)
    if unsafe:
        raise GuaranteeError(
            f"accept_content accepts {', '.join(unsafe)}: a fleet accepts JSON only "
            "(decoding such a message can run code in the worker)"
        )
    serializer = _chosen(app, "task_serializer")
    if serializer not in (None, "json"):
        raise GuaranteeError(f"task_serializer is {serializer!r}: a fleet's messages are JSON")
    for key in ("task_acks_late", "task_reject_on_worker_lost"):
        if _set(app, key) and not app.conf[key]:
            raise GuaranteeError(
                f"{key} is False: a fleet acknowledges a message only after its outcome "
                "is written, and requeues it when a pool process is lost"
            )
    if settings.queue_type == "quorum":
        if _chosen(app, "task_queue_max_priority") is not None:
            raise GuaranteeError(
                "task_queue_max_priority is set with FLEET_QUEUE_TYPE=quorum: quorum queues "
                "have no priorities (RabbitMQ refuses to declare them)"
            )
        if _set(app, "worker_detect_quorum_queues") and not app.conf.worker_detect_quorum_queues:
            raise GuaranteeError(
                "worker_detect_quorum_queues is False with FLEET_QUEUE_TYPE=quorum: the workers "
                "would ask for global QoS, which quorum queues refuse"
            )
    options = _chosen(app, "broker_transport_options") or {}
    chosen = options.get("visibility_timeout")
    needed = visibility_timeout_s(settings)
    if chosen is not None and float(chosen) < needed:
        raise GuaranteeError(
            f"broker_transport_options['visibility_timeout'] is {chosen} s, shorter than the "
            f"{needed:g} s derived from FLEET_MAX_TIME_LIMIT_S: the broker would hand a running "
            "task to a second worker"
        )


def _merged(app: Celery, settings: Settings) -> dict[str, Any]:
    """The fleet's configuration, keeping what the app already chose where it is compatible."""
    config = celery_config(settings)
    broker = _chosen(app, "broker_url")
    if broker and settings.broker_url is None:
        config.pop("broker_url")
    kept = ("task_default_queue", "task_queues", "task_default_exchange_type", "timezone",
            "enable_utc")  # fmt: skip
    for key in kept:
        if _set(app, key):
            config.pop(key, None)
    own_queues = _chosen(app, "task_queues")
    if own_queues:
        # The team's queues stay; the fleet's control queue joins them.
        control = control_queue(settings.queue)
        names = {q.name for q in own_queues}
        config["task_queues"] = [
            *own_queues,
            *([] if control in names else [fleet_queue(settings, control)]),
        ]
    options = dict(_chosen(app, "broker_transport_options") or {})
    config["broker_transport_options"] = {**options, **config["broker_transport_options"]}
    return config


def init_app(
    app: Celery,
    settings: Settings | None = None,
    *,
    modules: list[str] | None = None,
    beat_schedule: dict[str, Any] | None = None,
    migrations: str | None = None,
) -> Fleet:
    """Make ``app`` a fleet app and return its :class:`~fleetworks.agent.Fleet`.

    ``settings`` default to the ``FLEET_*`` environment; when the app already
    names its broker and ``FLEET_BROKER_URL`` is unset, the app's broker is
    kept (and is the lock store too, when it is Redis), and so is its default
    queue unless ``FLEET_QUEUE`` is set. ``modules`` are task
    modules the worker imports besides the app's own ``include``;
    ``beat_schedule`` entries are added to the app's; ``migrations`` is the
    folder of the deployment's own Alembic revisions (its tables), upgraded
    with the runtime's by ``fleetworks db upgrade``.
    """
    from fleetworks.agent import Fleet

    settings = settings or Settings()
    broker = _chosen(app, "broker_url")
    if broker and settings.broker_url is None:
        settings = settings.model_copy(update={"broker_url": str(broker)})
    queue = _chosen(app, "task_default_queue")
    if queue and "queue" not in settings.model_fields_set:
        # The app's own default queue is the one its fleet's workers consume.
        settings = settings.model_copy(update={"queue": str(queue)})
    check_guarantees(app, settings)
    app.conf.update(_merged(app, settings))
    logs.use(settings.log_format)
    extra = [*(modules or ()), *settings.modules]
    if extra:
        app.conf.include = list(dict.fromkeys([*(app.conf.include or ()), *extra]))
    schedule = {**(app.conf.beat_schedule or {}), **(beat_schedule or {})}
    if not any(entry.get("task") == REAP_TASK for entry in schedule.values()):
        # Every fleet's beat runs the reaper (fleetworks.reaper).
        schedule["fleet-reap-orphaned-claims"] = reaper_entry(settings.queue)
    if settings.outcomes_keep_days is not None and not any(
        entry.get("task") == retention.PRUNE_TASK for entry in schedule.values()
    ):
        schedule["fleet-prune-outcomes"] = retention.schedule_entry(settings.queue)
    app.conf.beat_schedule = schedule
    app.conf.task_routes = _with_batch_router(app, _chosen(app, "task_routes"))
    for step in (kombu_redis.PromptReap, holders.Snapshots):
        if step not in app.steps["worker"]:
            app.steps["worker"].add(step)
    for consumer_step in (kombu_redis.GuardTaskHandler, batch.BatchQueues):
        if consumer_step not in app.steps["consumer"]:
            app.steps["consumer"].add(consumer_step)
    timing.Timings.from_settings(settings).check()
    return Fleet(app, settings, migrations=migrations)


def _with_batch_router(app: Celery, routes: Any) -> list[Any]:
    """The app's own routes after the router of its batch agents' queues."""
    from fleetworks.agent import _FLEETS

    theirs: list[Any]
    if routes is None:
        theirs = []
    elif isinstance(routes, list | tuple):
        theirs = [r for r in routes if not getattr(r, "fleet_batch_router", False)]
    else:
        theirs = [routes]
    route = batch.router(lambda: _FLEETS.get(app))
    route.fleet_batch_router = True  # type: ignore[attr-defined]
    return [route, *theirs]


def create_app(
    settings: Settings | None = None,
    beat_schedule: dict[str, Any] | None = None,
    *,
    name: str = "fleetworks",
    modules: list[str] | None = None,
    migrations: str | None = None,
) -> Celery:
    """A new Celery app made a fleet by :func:`init_app` (its fleet: :func:`fleet_of`)."""
    app = Celery(name, task_cls=GuardedTask)
    init_app(app, settings, modules=modules, beat_schedule=beat_schedule, migrations=migrations)
    return app


def load_app(ref: str) -> Celery:
    """The Celery app at ``module[:attribute]``, found the way ``celery -A`` finds it
    (the working directory is on the import path, as for ``celery -A``)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = find_app(ref)
    except (ImportError, AttributeError, ValueError) as exc:
        # ValueError: a reference with an empty module name (``:``, ``:app``).
        raise LookupError(f"cannot load the Celery app {ref!r}: {exc}") from exc
    if not isinstance(found, Celery):
        raise LookupError(f"{ref!r} is a {type(found).__name__}, not a Celery app")
    return found


def fleet_of(app: Celery) -> Fleet:
    """The fleet bound to ``app`` by :func:`init_app`."""
    from fleetworks.agent import Fleet

    return Fleet.of(app)


def settings_of(app: Celery) -> Settings:
    """The fleet settings of ``app``."""
    return fleet_of(app).settings


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _after_fork(**_: Any) -> None:
    """A pool child must not reuse the parent's database or Redis sockets."""
    db.reset_after_fork()
    redisconn.reset_after_fork()


# Workers and beat: Celery sets up its handlers, fleetworks renders them.
after_setup_logger.connect(logs.celery_logger_ready, weak=False)
after_setup_task_logger.connect(logs.celery_logger_ready, weak=False)
celeryd_init.connect(logs.quiet_worker_banner, weak=False)


@before_task_publish.connect  # type: ignore[untyped-decorator]
def _stamp_sent_at(
    headers: dict[str, Any] | None = None,
    body: Any = None,
    routing_key: str | None = None,
    properties: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """When the message left (the depth probe reads the oldest waiting age from
    it, the outbox its time); then the outbox records an agent message before
    it leaves (:mod:`fleetworks.outbox`)."""
    if headers is None:
        return
    headers[c.SENT_AT_HEADER] = time.time()
    outbox.on_publish(headers, body, routing_key, properties or {})
