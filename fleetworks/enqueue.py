"""Enqueueing agent work from application code.

``enqueue`` sends one task through Celery's ``send_task``. ``enqueue_many``
sends one task per payload, and on a Redis broker it does not pay Celery's
per-message cost for each of them.

**Why not ``send_task`` per message.** A ``send_task`` builds the message
(routing, ``saferepr`` of the arguments), fires the publish signals (the
tracing instrumentation opens a span per message), publishes a ``task-sent``
event and goes through kombu's publish: a few hundred microseconds per
message in Python, so a fan-out from one process tops out at a few thousand
messages per second however its round trips are batched
(``fleetworks bench fanout`` measures both in the same run).

**What ``enqueue_many`` does on Redis.** The first message goes through
``send_task`` like any other: it declares the queue, fires every signal and
is the template. Each further message is built from that template in
Python (a new task id, the payload's keyword arguments, their ``repr``
where Celery writes a ``saferepr``, the send time, the fan-out span's trace
context) in the exact form kombu's Redis channel pushes
(:func:`fleetworks.kombu_redis.raw_message`, checked against kombu in
``tests/test_kombu_contract.py``), and each chunk of
:data:`~fleetworks.constants.PUBLISH_BATCH` messages goes out as one
``LPUSH`` of all of them. A worker cannot tell the messages apart from
``send_task``'s. What they do not get: a ``task-sent`` event each (Flower
shows them from ``task-received`` on), and a publish span each (their
trace parent is the ``enqueue_many`` span). When a ``before_task_publish``
or ``after_task_publish`` receiver other than fleetworks' and the tracing
instrumentation's is connected, or the first message was routed anywhere
but a plain queue (an exchange, a priority), every message goes through
``send_task``, pipelined in kombu's ``Producer.batch``; on AMQP too.

**Nothing lost.** Each chunk's outbox records (:mod:`fleetworks.outbox`)
are written in one round trip before its ``LPUSH`` leaves, so a message
lost between the broker's pop and its acknowledgement record is published
again by the reaper, fast path or not.

A batch is all or nothing only up to a chunk: if the connection breaks
mid-batch, the chunks already pushed are in the queue and the rest is not,
and the error propagates. Callers re-run the whole fan-out; the keys make
the messages that did get through run once.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from celery.signals import before_task_publish
from kombu.entity import maybe_delivery_mode
from kombu.utils import json as kombu_json

from fleetworks import constants as c
from fleetworks import kombu_redis, message, outbox, tracing

#: Celery's limit on the ``argsrepr``/``kwargsrepr`` headers.
REPR_MAX = 1024


def _chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _options(app: Celery, agent: str, queue: str | None) -> dict[str, Any]:
    """The publish options of ``agent``'s messages: its queue, a batch agent's
    own queue beside it (:mod:`fleetworks.batch`)."""
    from fleetworks.app import fleet_of

    queue = fleet_of(app).queue_for(agent, queue)
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
        sent = app.send_task(
            agent, kwargs=message.pack(payload, key), **_options(app, agent, queue)
        )
    return str(sent.id)


@dataclass(frozen=True, slots=True)
class _Published:
    """What ``before_task_publish`` saw of one message."""

    headers: dict[str, Any]
    properties: dict[str, Any]
    exchange: Any
    routing_key: str | None


_seen: contextvars.ContextVar[list[_Published] | None] = contextvars.ContextVar(
    "fleetworks_enqueue_seen", default=None
)


@before_task_publish.connect(weak=False)  # type: ignore[untyped-decorator]
def _see_publish(
    headers: dict[str, Any] | None = None,
    properties: dict[str, Any] | None = None,
    exchange: Any = None,
    routing_key: str | None = None,
    **_: Any,
) -> None:
    seen = _seen.get()
    if seen is not None and headers is not None:
        seen.append(_Published(dict(headers), dict(properties or {}), exchange, routing_key))


@contextlib.contextmanager
def _seeing() -> Iterator[list[_Published]]:
    seen: list[_Published] = []
    token = _seen.set(seen)
    try:
        yield seen
    finally:
        _seen.reset(token)


class _Template:
    """Messages like a first one ``send_task`` published, built without it."""

    def __init__(self, app: Celery, first: _Published, routing_key: str) -> None:
        # The first message's headers, in their order; each message overwrites
        # its own id, root, arguments' repr, send time and trace context.
        self.headers = dict(first.headers)
        self.own_root = first.headers.get("root_id") == first.headers.get("id")
        self.routing_key = routing_key
        self.reply_to = str(first.properties.get("reply_to") or "")
        queue = app.amqp.queues.get(routing_key)
        mode = getattr(getattr(queue, "exchange", None), "delivery_mode", None)
        self.delivery_mode = int(
            maybe_delivery_mode(mode or app.conf.task_default_delivery_mode)  # type: ignore[no-untyped-call]
            or 2
        )

    @classmethod
    def of(cls, app: Celery, first: _Published) -> _Template | None:
        """A template, or None where the first message was routed beyond a plain queue."""
        exchange = getattr(first.exchange, "name", first.exchange)
        if exchange or not first.routing_key or first.properties.get("priority"):
            return None
        if first.headers.get("eta") or first.headers.get("expires"):
            return None
        return cls(app, first, first.routing_key)

    def build(
        self, kwargs: dict[str, Any], sent_at: float, trace: dict[str, str]
    ) -> tuple[str, str, str]:
        """``(task id, raw message, outbox record)`` for one message."""
        task_id = str(uuid.uuid4())
        headers = dict(self.headers)
        headers["id"] = task_id
        if self.own_root:
            headers["root_id"] = task_id
        text = repr(kwargs)
        headers["kwargsrepr"] = text if len(text) <= REPR_MAX else text[: REPR_MAX - 3] + "..."
        headers[c.SENT_AT_HEADER] = sent_at
        headers.update(trace)
        body = [[], kwargs, _EMBED]
        raw = kombu_redis.raw_message(
            kombu_json.dumps(body).encode(),  # type: ignore[no-untyped-call]
            headers,
            correlation_id=task_id,
            reply_to=self.reply_to,
            delivery_mode=self.delivery_mode,
            routing_key=self.routing_key,
        )
        record = outbox.entry(headers, body, self.routing_key, {})
        return task_id, raw, record


#: Celery's ``embed`` part of a protocol 2 body for a task with no callbacks.
_EMBED: dict[str, Any] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _push(
    client: redis.Redis, records: outbox._Pending | None, template: _Template,
    kwargs_list: list[dict[str, Any]], ids: list[str],
) -> None:  # fmt: skip
    """One chunk: its outbox records in one round trip, then one LPUSH."""
    trace = tracing.current_carrier()
    raws: list[str] = []
    for kwargs in kwargs_list:
        # Each its own time, in queue order: the outbox reads a queue's head
        # against these (a tie would keep a lost message waiting for its chunk).
        sent_at = time.time()
        task_id, raw, record = template.build(kwargs, sent_at, trace)
        ids.append(task_id)
        raws.append(raw)
        if records is not None:
            records.add(task_id, record, sent_at)
    if records is not None:
        records.flush()
    client.lpush(template.routing_key, *raws)


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
    options = _options(app, agent, queue)
    fast = kombu_redis.is_redis(app) and kombu_redis.only_known_publish_receivers(agent)
    template: _Template | None = None

    def pack(payload: Any) -> dict[str, Any]:
        return message.pack(payload, None if key is None else key(payload))

    with tracing.fan_out(agent) as span, app.producer_or_acquire() as producer:
        items = iter(payloads)
        if fast:
            first = list(itertools.islice(items, 1))
            with outbox.collecting(app, agent, hold=False), _seeing() as seen:
                for payload in first:
                    sent = app.send_task(agent, kwargs=pack(payload), producer=producer, **options)
                    ids.append(str(sent.id))
            if seen:
                template = _Template.of(app, seen[0])
        for chunk in _chunks(items, c.PUBLISH_BATCH):
            if template is not None:
                with outbox.collecting(app, agent) as records:
                    client = kombu_redis.broker_client(producer)
                    _push(client, records, template, [pack(p) for p in chunk], ids)
                continue
            # The chunk's outbox records go out in one round trip, then its
            # messages in one pipeline: a message never leaves unrecorded.
            with outbox.collecting(app, agent) as records, producer.batch(len(chunk) + 1):
                for payload in chunk:
                    sent = app.send_task(agent, kwargs=pack(payload), producer=producer, **options)
                    ids.append(str(sent.id))
                if records is not None:
                    records.flush()
        span.set_attribute("fleetworks.enqueued", len(ids))
    return ids
