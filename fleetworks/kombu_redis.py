"""Everything fleetworks reads of Celery's and kombu's private internals.

fleetworks relies on five things that neither Celery nor kombu publishes as
an API. They live here, and only here, so an upgrade that changes them fails
in one place: ``tests/test_kombu_contract.py`` exercises each of them against
the installed versions and fails loudly, naming what moved.

1. kombu's Redis channel keeps each delivered, unacknowledged message in a
   hash (``unacked_key``: tag -> JSON ``[message, exchange, routing_key]``)
   and a sorted set of delivery times (``unacked_index_key``), and gives a
   message back with ``qos.restore_by_tag``. The reaper restores a message a
   lost worker stranded there (:func:`stranded_messages`, :func:`restore`).
2. A Redis queue with priorities is several lists, named by the channel's
   ``_q_for_pri`` over its ``priority_steps`` (:func:`priority_lists`).
3. A Redis message body is base64 of the JSON ``[args, kwargs, embed]``
   (:func:`decode_body`).
4. Celery's worker ``Request`` keeps the decoded body in a name-mangled slot
   (``_Request__payload``) besides ``_args``, ``_kwargs`` and
   ``_request_dict``; the guarded request swaps a body the pool cannot take
   for a small one (:func:`replace_request_body`).
5. Celery's prefork pool learns that a child died when the child's sentinel
   pipe becomes readable, and reaps it then; the pipe closes while the child
   is still exiting, so that reap can come too early (``waitpid`` finds it
   still running), and the pool then notices only at its next 5 s
   ``maintain_pool`` timer. Until it does, the killed task's message is not
   given back and its lease is not freed. :class:`PromptReap`, a worker
   bootstep, runs the pool's own ``maintain_pool`` every
   :data:`REAP_CHILDREN_EVERY_S` so a dead child is noticed within that.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery, bootsteps

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


def restore(app: Celery, tag: str) -> None:
    """Give the unacked message ``tag`` back to the head of its queue (kombu's own restore)."""
    with app.connection_for_write() as conn:
        conn.default_channel.qos.restore_by_tag(tag, leftmost=True)


def replace_request_body(
    request: Any, args: list[Any], kwargs: dict[str, Any], decoded: bool
) -> None:
    """Make a Celery worker ``Request`` carry ``(args, kwargs)`` in place of its body."""
    payload: tuple[list[Any], dict[str, Any], dict[str, Any]] = (args, kwargs, {})
    body: Any = payload
    if not decoded:
        body = json.dumps(payload).encode()
        request._content_type, request._content_encoding = "application/json", "utf-8"
    request._body = body
    request._Request__payload = payload
    # The decoded arguments also travel to the child inside the request dict.
    request._request_dict["args"] = request._args = args
    request._request_dict["kwargs"] = request._kwargs = kwargs


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
    slots = set(getattr(request_cls, "__slots__", ()))
    for name in ("_Request__payload", "_args", "_kwargs", "_request_dict", "_body", "_decoded"):
        if name not in slots and not hasattr(request_cls, name):
            missing.append(f"celery Request has no slot {name}")
    return missing
