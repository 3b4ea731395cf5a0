"""Queue depth as the broker stores it: what is waiting, what is running, and
how old the oldest waiting message is.

Redis: a Celery queue is several lists, the queue itself and one per
priority step (``name``, ``name\\x06\\x163``, ...); the backlog is the sum of
their LLENs, named by kombu's own channel (its separator, priority steps and
``global_keyprefix``), so what KEDA's Redis scaler misses (it reads one list)
is counted. Running is the messages in kombu's ``unacked`` hash whose routing
key is the queue: delivered to a worker and not yet acknowledged (with late
acks, running or reserved). The oldest waiting message is the tail of each
list; its age comes from the ``fleet_sent_at`` header the app stamps on every
message it publishes (messages from elsewhere have none and are ignored).

RabbitMQ: a passive declare gives the ready count; the unacked count comes
from the management API when ``FLEET_RABBITMQ_MANAGEMENT_URL`` is set, else
it is reported as 0. RabbitMQ gives no age without consuming: None.

A queue that does not exist counts 0.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from celery import Celery
from kombu.exceptions import ChannelError

from fleetworks import constants as c
from fleetworks import kombu_redis

#: Seconds an HTTP call to the RabbitMQ management API may take.
_MANAGEMENT_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class QueueDepth:
    queue: str
    backlog: int
    running: int
    #: Age of the oldest waiting message stamped by a fleet app; None if none.
    oldest_age_s: float | None


class DepthProbe(Protocol):
    def sample(self, queues: Sequence[str]) -> dict[str, QueueDepth]: ...

    def close(self) -> None: ...


def probe_for(app: Celery, management_url: str | None = None) -> DepthProbe:
    """The probe for the app's broker."""
    url = str(app.conf.broker_url or "")
    scheme = url.split("://", 1)[0]
    if scheme in ("redis", "rediss"):
        return RedisDepth(app)
    if scheme in ("amqp", "amqps", "pyamqp"):
        return AmqpDepth(app, management_url)
    raise ValueError(f"no queue depth probe for broker scheme {scheme!r}")


def _sent_at(raw: bytes | str | None) -> float | None:
    if raw is None:
        return None
    try:
        stamp = json.loads(raw).get("headers", {}).get(c.SENT_AT_HEADER)
    except (ValueError, AttributeError):
        return None
    return float(stamp) if isinstance(stamp, int | float) else None


def _routing_keys(values: Iterable[bytes | str]) -> list[str]:
    keys = []
    for raw in values:
        try:
            keys.append(str(json.loads(raw)[2]))
        except (ValueError, IndexError, TypeError):
            continue
    return keys


class _Connected:
    """A broker connection kept between samples, dropped after an error."""

    def __init__(self, app: Celery) -> None:
        self._app = app
        self._conn: Any = None

    def channel(self) -> Any:
        if self._conn is None:
            self._conn = self._app.connection_for_read()
            self._conn.ensure_connection(max_retries=1)
        return self._conn.default_channel

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.release()


class RedisDepth(_Connected):
    def sample(self, queues: Sequence[str]) -> dict[str, QueueDepth]:
        try:
            return self._sample(self.channel(), queues)
        except Exception:
            self.close()
            raise

    @staticmethod
    def _sample(ch: Any, queues: Sequence[str]) -> dict[str, QueueDepth]:
        lists = {q: kombu_redis.priority_lists(ch, q) for q in queues}
        with ch.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            for q in queues:
                for name in lists[q]:
                    pipe.llen(name)
                    pipe.lindex(name, -1)
            pipe.hvals(kombu_redis.unacked_key(ch))
            replies = pipe.execute()
        running = _routing_keys(replies[-1])
        now, at, out = time.time(), 0, {}
        for q in queues:
            backlog, stamps = 0, []
            for _ in lists[q]:
                backlog += int(replies[at])
                stamps.append(_sent_at(replies[at + 1]))
                at += 2
            known = [s for s in stamps if s is not None]
            age = max(0.0, now - min(known)) if known else None
            out[q] = QueueDepth(q, backlog, running.count(q), age)
        return out


class AmqpDepth(_Connected):
    def __init__(self, app: Celery, management_url: str | None) -> None:
        super().__init__(app)
        self._management = management_url

    def sample(self, queues: Sequence[str]) -> dict[str, QueueDepth]:
        out = {}
        for q in queues:
            out[q] = QueueDepth(q, self._ready(q), self._unacked(q), None)
        return out

    def _ready(self, queue: str) -> int:
        try:
            return int(self.channel().queue_declare(queue=queue, passive=True).message_count)
        except ChannelError:
            # NOT_FOUND closes the channel: a missing queue holds nothing.
            self.close()
            return 0
        except Exception:
            self.close()
            raise

    def _unacked(self, queue: str) -> int:
        if not self._management:
            return 0
        parts = urllib.parse.urlsplit(self._management)
        vhost = urllib.parse.quote(self._app.connection_for_read().virtual_host or "/", safe="")
        path = f"/api/queues/{vhost}/{urllib.parse.quote(queue, safe='')}"
        request = urllib.request.Request(
            f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}{path}"
        )
        if parts.username:
            token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=_MANAGEMENT_TIMEOUT_S) as reply:
                return int(json.load(reply).get("messages_unacknowledged", 0))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return 0
            raise
