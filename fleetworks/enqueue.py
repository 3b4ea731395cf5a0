"""Enqueueing agent work from application code.

``enqueue`` sends one task; ``enqueue_many`` publishes many over one
producer inside kombu's publish batch (``Producer.batch``): on Redis the
LPUSHes go out in pipelines of ``PUBLISH_BATCH`` messages, one round trip
each instead of one per message; on transports without batching (AMQP,
whose publishes are not acknowledged one by one anyway) it publishes at
once. Both send ``payload`` and the optional explicit idempotency ``key`` as
the agent task's keyword arguments.

Tracing (:mod:`fleetworks.tracing`): every message goes out through
``send_task``, so the Celery instrumentation writes the trace context into
its headers, pipelined or not; ``enqueue_many`` wraps its publishes in one
``enqueue_many <agent>`` span.

Each message is recorded in the outbox (:mod:`fleetworks.outbox`) before it
leaves, one round trip per pipeline, so a message lost between the broker's
pop and its acknowledgement record is published again by the reaper.

A batch is all or nothing only up to a pipeline: if the connection breaks
mid-batch, the pipelines already flushed are in the queue and the rest is
not, and the error propagates. Callers re-run the whole fan-out; the keys
make the messages that did get through run once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

from celery import Celery

from fleetworks import constants as c
from fleetworks import message, outbox, tracing


def _chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _options(queue: str | None) -> dict[str, Any]:
    return {"queue": queue} if queue else {}


def _known(app: Celery, agent: str) -> None:
    """Refuse a task name the app does not know, before anything is published:
    a worker would drop the message with only a log line."""
    from fleetworks.app import fleet_of

    fleet_of(app).require_task(agent)


def enqueue(
    app: Celery, agent: str, payload: Any, key: str | None = None, queue: str | None = None
) -> str:
    """Send one task to ``agent``; returns the task id.

    Raises :class:`~fleetworks.agent.UnknownAgentError` for a name the app does not know.
    """
    _known(app, agent)
    with outbox.collecting(app, agent, hold=False):
        sent = app.send_task(agent, kwargs=message.pack(payload, key), **_options(queue))
    return str(sent.id)


def enqueue_many(
    app: Celery,
    agent: str,
    payloads: Iterable[Any],
    queue: str | None = None,
    key: Callable[[Any], str] | None = None,
) -> list[str]:
    """Send one task per payload, pipelined; returns the task ids in order.

    ``key(payload)``, if given, is each task's explicit idempotency key.
    """
    _known(app, agent)
    ids: list[str] = []
    options = _options(queue)
    with tracing.fan_out(agent) as span, app.producer_or_acquire() as producer:
        for chunk in _chunks(payloads, c.PUBLISH_BATCH):
            # The chunk's outbox records go out in one round trip, then its
            # messages in one pipeline: a message never leaves unrecorded.
            with outbox.collecting(app, agent) as records, producer.batch(len(chunk) + 1):
                for payload in chunk:
                    kwargs = message.pack(payload, None if key is None else key(payload))
                    sent = app.send_task(agent, kwargs=kwargs, producer=producer, **options)
                    ids.append(str(sent.id))
                if records is not None:
                    records.flush()
        span.set_attribute("fleetworks.enqueued", len(ids))
    return ids
