"""Everything fleetworks reads of Celery's and kombu's private internals.

fleetworks relies on six things that neither Celery nor kombu publishes as
an API. They live here, and only here, so an upgrade that changes them fails
in one place: ``tests/test_kombu_contract.py`` exercises each of them against
the installed versions and fails loudly, naming what moved.

1. kombu's Redis channel keeps each delivered, unacknowledged message in a
   hash (``unacked_key``: tag -> JSON ``[message, exchange, routing_key]``)
   and a sorted set of delivery times (``unacked_index_key``), and gives a
   message back with ``qos.restore_by_tag``. The reaper restores a message a
   lost worker stranded there (:func:`stranded_messages`, :func:`restore`).
2. A Redis queue with priorities is several lists, named by the channel's
   ``_q_for_pri`` over its ``priority_steps`` (:func:`priority_lists`); each
   is pushed on the left and popped on the right, so its right end is the
   oldest message (:func:`oldest_waiting`, which the outbox relies on).
3. A Redis message body is base64 of the JSON ``[args, kwargs, embed]``
   (:func:`decode_body`).
4. Celery's worker ``Request`` is built from the message's ``headers`` and
   ``body`` (``decoded`` when it is already Python data), passed to it as
   keyword arguments, and keeps its delivery fields in ``_delivery_info``;
   the guarded request passes a small decoded body in place of one the pool
   cannot take (:mod:`fleetworks.request`). A kombu ``Message`` keeps its
   decoded body in ``_decoded_cache``.
5. Celery's prefork pool learns that a child died when the child's sentinel
   pipe becomes readable, and reaps it then; the pipe closes while the child
   is still exiting, so that reap can come too early (``waitpid`` finds it
   still running), and the pool then notices only at its next 5 s
   ``maintain_pool`` timer. Until it does, the killed task's message is not
   given back and its lease is not freed. :class:`PromptReap`, a worker
   bootstep, runs the pool's own ``maintain_pool`` every
   :data:`REAP_CHILDREN_EVERY_S` so a dead child is noticed within that.
6. Celery's consumer hands every task message to the callback its
   ``create_task_handler`` makes; an exception out of it (a ``task`` header
   that is a list, a time limit Celery cannot add up) ends the whole worker,
   and the message, restored, ends the next one too. :class:`GuardTaskHandler`,
   a consumer bootstep, wraps that callback: such a message is logged and
   dropped (:func:`guard_task_handler`). A message of a guarded task whose
   body is not ``[args, kwargs, embed]`` gets a body naming the problem
   before Celery unpacks it, so the guard records it as ``rejected``.
7. What a Redis channel pushes for a task message published to the default
   (nameless, direct) exchange: ``Channel.prepare_message`` and
   ``basic_publish`` make a JSON object of the base64 body, content type and
   encoding, headers and properties (with ``delivery_info``, ``body_encoding``
   and a fresh ``delivery_tag``), and ``_put`` pushes it on the left of the
   queue's list with ``LPUSH`` (:func:`raw_message`, :func:`broker_client`).
   ``enqueue_many`` builds its messages so (:mod:`fleetworks.enqueue`);
   Celery's ``before_task_publish``/``after_task_publish`` receivers are
   read to know whether any but fleetworks' and the tracing's would be
   skipped (:func:`only_known_publish_receivers`).
"""

from __future__ import annotations

import base64
import inspect
import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, bootsteps, signals
from celery.worker.consumer import Consumer
from kombu.message import Message

from fleetworks.message import body_problem, unrunnable
from fleetworks.request import GuardedTask

log = logging.getLogger(__name__)

#: How often the worker's main process looks for dead pool children.
REAP_CHILDREN_EVERY_S = 0.2


@dataclass(frozen=True, slots=True)
class Unacked:
    """One message held unacknowledged by some worker."""

    tag: str
    headers: dict[str, Any]
    body: Any
    queue: str


def is_redis(app: Celery) -> bool:
    return str(app.conf.broker_url or "").startswith(("redis://", "rediss://"))


def priority_lists(channel: Any, queue: str) -> list[str]:
    """The Redis lists that hold ``queue``'s waiting messages, in priority order."""
    return list(dict.fromkeys(channel._q_for_pri(queue, p) for p in channel.priority_steps))


def unacked_key(channel: Any) -> str:
    return str(channel.unacked_key)


def raw_message(
    body: bytes, headers: dict[str, Any], *, correlation_id: str, reply_to: str,
    delivery_mode: int, routing_key: str,
) -> str:  # fmt: skip
    """The JSON a Redis channel pushes for one JSON task message published to the
    nameless direct exchange with priority 0 (see 7. above)."""
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "correlation_id": correlation_id,
                "reply_to": reply_to,
                "delivery_mode": delivery_mode,
                "delivery_info": {"exchange": "", "routing_key": routing_key},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def broker_client(producer: Any) -> redis.Redis:
    """The Redis client of a producer's channel (its connection pool, its TLS)."""
    client: redis.Redis = producer.channel.client
    return client


#: Modules whose publish-signal receivers the fast fan-out does the work of.
_KNOWN_RECEIVERS = ("fleetworks.", "opentelemetry.instrumentation.celery")


def only_known_publish_receivers(task_name: str) -> bool:
    """Whether every live ``before_task_publish``/``after_task_publish`` receiver
    for ``task_name`` is fleetworks' own or the Celery instrumentation's."""
    for signal in (signals.before_task_publish, signals.after_task_publish):
        for receiver in signal._live_receivers(task_name):
            module = getattr(receiver, "__module__", None) or ""
            if not module.startswith(_KNOWN_RECEIVERS):
                return False
    return True


def decode_body(body: Any) -> tuple[list[Any], dict[str, Any]]:
    """The ``(args, kwargs)`` of a Redis message body; ValueError if it is not one."""
    try:
        args, kwargs, _embed = json.loads(base64.b64decode(body))
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"not a task body: {exc}") from exc
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError("not a task body: args or kwargs of the wrong type")
    return args, kwargs


def stranded_messages(app: Celery, delivered_before: float, limit: int) -> Iterator[Unacked]:
    """Unacked messages delivered before ``delivered_before`` (epoch s), oldest first."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        client = channel.client
        tags = client.zrangebyscore(channel.unacked_index_key, "-inf", delivered_before, 0, limit)
        for raw_tag in tags:
            tag = raw_tag.decode() if isinstance(raw_tag, bytes) else str(raw_tag)
            raw = client.hget(channel.unacked_key, tag)
            if raw is None:
                continue
            message, _exchange, routing_key = json.loads(raw)
            yield Unacked(tag, message.get("headers") or {}, message.get("body"), routing_key)


def oldest_waiting(app: Celery, queue: str, header: str) -> tuple[bool, float | None]:
    """Whether ``queue`` has messages waiting, and the oldest ``header`` stamp
    (epoch s) among the next message of each of its priority lists (kombu
    pushes on the left and pops on the right, so the right end is the oldest)."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        pipe = channel.client.pipeline(transaction=False)
        for name in priority_lists(channel, queue):
            pipe.lindex(name, -1)
        tails = pipe.execute()
    stamps: list[float] = []
    for raw in tails:
        if raw is None:
            continue
        try:
            stamp = (json.loads(raw).get("headers") or {}).get(header)
        except (ValueError, AttributeError):
            stamp = None
        # A waiting message without a stamp: its age is unknown, take it as old.
        stamps.append(float(stamp) if isinstance(stamp, int | float) else float("-inf"))
    return bool(stamps), min(stamps, default=None)


def waiting_ids(app: Celery, queue: str, ids: set[str], limit: int) -> set[str] | None:
    """Which of ``ids`` are waiting in ``queue`` (any priority list), or None
    if the queue holds more than ``limit`` messages (not read)."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        client = channel.client
        names = priority_lists(channel, queue)
        if sum(int(client.llen(name)) for name in names) > limit:
            return None
        wanted = {i.encode(): i for i in ids}
        found: set[str] = set()
        for name in names:
            for raw in client.lrange(name, 0, -1):
                found.update(i for b, i in wanted.items() if b in raw)
        return found


def unacked_task_ids(app: Celery) -> set[str]:
    """The task ids of every message some worker holds unacknowledged."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        ids: set[str] = set()
        for _, raw in channel.client.hscan_iter(channel.unacked_key, count=500):
            try:
                message = json.loads(raw)[0]
                task_id = (message.get("headers") or {}).get("id")
            except (ValueError, IndexError, AttributeError, TypeError):
                continue
            if isinstance(task_id, str):
                ids.add(task_id)
        return ids


def restore(app: Celery, tag: str) -> None:
    """Give the unacked message ``tag`` back to the head of its queue (kombu's own restore)."""
    with app.connection_for_write() as conn:
        conn.default_channel.qos.restore_by_tag(tag, leftmost=True)


def guard_task_handler(consumer: Any) -> None:
    """Make ``consumer`` (Celery's worker consumer) drop a message its task
    handler cannot take, instead of exiting (item 6 above). Idempotent: a
    consumer restarted after a lost connection keeps one guard."""
    if getattr(consumer, "_fleet_guarded", False):
        return
    make = consumer.create_task_handler

    def create() -> Any:
        handle = make()

        def on_task_received(message: Any) -> Any:
            problem = _header_problem(message.headers)
            if problem is not None:
                return _drop(consumer, message, problem)
            try:
                if _guarded(consumer.app, message.headers):
                    _unrunnable_if_misshapen(message)
                return handle(message)
            except consumer.connection_errors:
                raise
            except Exception as exc:
                return _drop(consumer, message, f"the worker could not take it ({exc!r})", exc)

        return on_task_received

    consumer.create_task_handler = create
    consumer._fleet_guarded = True


def _header_problem(headers: Any) -> str | None:
    """What makes Celery's task handler raise on a message's headers, or None."""
    if not isinstance(headers, dict):
        return None  # Celery itself drops it as an unknown message
    task = headers.get("task")
    if task is not None and not isinstance(task, str):
        return f"its 'task' header must be a string, got {type(task).__name__}"
    return None


def _guarded(app: Celery, headers: Any) -> bool:
    """Whether ``headers`` name a task of ``app`` that runs with the guarded request."""
    if not isinstance(headers, dict):
        return False
    return isinstance(app.tasks.get(headers.get("task")), GuardedTask)


def _unrunnable_if_misshapen(message: Any) -> None:
    """Give a guarded task's message whose body is not ``[args, kwargs, embed]``
    a body that says so, before Celery unpacks it: the guard rejects it."""
    try:
        body = message.payload
    except Exception:
        return  # Celery reports what it cannot decode
    problem = body_problem(body)
    if problem is not None:
        message._decoded_cache = [[], unrunnable(problem), {}]


def _drop(consumer: Any, message: Any, problem: str, exc: Exception | None = None) -> None:
    """Log ``problem`` with the message's headers and remove the message for good."""
    log.error(
        "Dropped an invalid task message: %s; headers: %s", problem, _short(message.headers),
        exc_info=exc,
    )  # fmt: skip
    if not message.acknowledged:
        message.reject_log_error(log, consumer.connection_errors)


def _short(value: Any, limit: int = 1000) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


class GuardTaskHandler(bootsteps.StartStopStep):  # type: ignore[misc]
    """A consumer step: :func:`guard_task_handler` on the worker's consumer."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, consumer: Any) -> None:
        guard_task_handler(consumer)


class PromptReap(bootsteps.StartStopStep):  # type: ignore[misc]
    """Reaps a dead prefork child within :data:`REAP_CHILDREN_EVERY_S` (item 5 above)."""

    requires = ("celery.worker.components:Pool",)

    def start(self, worker: Any) -> None:
        maintain = getattr(getattr(worker.pool, "_pool", None), "maintain_pool", None)
        if worker.hub is not None and callable(maintain):
            worker.hub.call_repeatedly(REAP_CHILDREN_EVERY_S, maintain)


def contract_problems(channel: Any, request_cls: type) -> Sequence[str]:
    """What this module relies on that ``channel`` (a kombu Redis channel) or
    Celery's ``request_cls`` no longer has."""
    missing = [
        f"kombu Redis channel has no {name}"
        for name in ("_q_for_pri", "priority_steps", "unacked_key", "unacked_index_key", "qos")
        if not hasattr(channel, name)
    ]
    if not hasattr(getattr(channel, "qos", None), "restore_by_tag"):
        missing.append("kombu Redis QoS has no restore_by_tag")
    taken = inspect.signature(request_cls).parameters
    missing += [
        f"celery Request takes no {name}=" for name in ("headers", "body", "decoded", "task")
        if name not in taken
    ]  # fmt: skip
    if "_decoded_cache" not in getattr(Message, "__slots__", ()):
        missing.append("kombu Message has no _decoded_cache")
    if not callable(getattr(Consumer, "create_task_handler", None)):
        missing.append("celery Consumer has no create_task_handler")
    return missing
