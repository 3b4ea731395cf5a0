"""The Celery app of a fleet, configured for the guarantees fleetworks makes.

JSON only (pickle is never accepted), late acks, requeue when a worker
process is lost, one message prefetched per process, no result backend (the
results database is the record of every outcome).
"""

from __future__ import annotations

import ssl
import time
from typing import Any

from celery import Celery
from celery.signals import before_task_publish, worker_process_init
from kombu.entity import Queue

from fleetworks import constants as c
from fleetworks import db, redisconn
from fleetworks.request import GuardedTask
from fleetworks.settings import Settings


def celery_config(settings: Settings, beat_schedule: dict[str, Any]) -> dict[str, Any]:
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
        "task_queues": [Queue(settings.queue)],  # type: ignore[no-untyped-call]
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
        "beat_schedule": beat_schedule,
        "beat_scheduler": "fleetworks.beat:FleetScheduler",
        "beat_max_loop_interval": c.BEAT_LOOP_S,
        # The settings object itself, for code that gets only the app (the
        # scheduler); a Celery conf key, so every process of the app has it.
        "fleet_settings": settings,
        "timezone": "UTC",
        "enable_utc": True,
    }


def visibility_timeout_s(settings: Settings) -> float:
    """How long the broker waits before handing an unacked message to another
    worker: longer than any task may run plus its longest retry wait."""
    return settings.max_time_limit_s + c.RETRY_BACKOFF_MAX_S + c.VISIBILITY_SLACK_S


def transport_options(settings: Settings) -> dict[str, Any]:
    return {
        "visibility_timeout": visibility_timeout_s(settings),
        "unacked_restore_interval": c.UNACKED_RESTORE_INTERVAL_S,
        "unacked_restore_throttle": 1,
    }


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


def create_app(settings: Settings, beat_schedule: dict[str, Any]) -> Celery:
    app = Celery("fleetworks", include=settings.modules, task_cls=GuardedTask)
    app.conf.update(celery_config(settings, beat_schedule))
    return app


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _after_fork(**_: Any) -> None:
    """A pool child must not reuse the parent's database or Redis sockets."""
    db.reset_after_fork()
    redisconn.reset_after_fork()


@before_task_publish.connect  # type: ignore[untyped-decorator]
def _stamp_sent_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """When the message left: the depth probe reads the oldest waiting age from it."""
    if headers is not None:
        headers.setdefault(c.SENT_AT_HEADER, time.time())
