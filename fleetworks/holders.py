"""Which live worker holds which delivery, so a dead worker's messages come back in seconds.

kombu's Redis transport keeps a delivered, unacknowledged message in its
``unacked`` hash until the consumer acks it, and says nothing of which
consumer holds it. A worker killed whole (SIGKILL, OOM of the main process,
a lost node), or one whose broker connection dropped and that forgot what it
had received, leaves its messages there; kombu gives them back only after the
visibility timeout (more than a minute here, by design: a live worker must
never see its running task handed to another).

Each fleet worker therefore writes, from its main process every
:data:`SNAPSHOT_EVERY_S`, the delivery tags it holds (Celery's reserved
requests: prefetched and running) to the hash ``fleet:holders`` (worker name
-> ``{"at": epoch seconds, "tags": [...]}``). A snapshot older than
:data:`STALE_AFTER_S` is a worker that is gone or stalled. The reaper
(:func:`fleetworks.reaper.restore_stranded`) restores an unacked message that
no live snapshot holds, provided it was delivered before every live worker's
latest snapshot (less :data:`MARGIN_S`: a message that reached a live worker
is in that worker's reserved requests by then) and no lease taken by that
delivery is still alive (a running task renews its own lease, so a worker
draining its tasks in a warm shutdown keeps them). A misjudgement (a worker
stalled longer than the staleness bound) costs a duplicate delivery, which the
key's claim turns into a counted skip and the fencing token keeps from writing.

Why not Celery's own inspection (``inspect reserved``): it is a broadcast
with a reply timeout per tick, answered by the workers' consumers, and a
worker busy with its broker connection answers late or not at all; the
snapshot is one ``HSET`` a second and one ``HGETALL`` per reaper tick.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Final

import redis
from celery import bootsteps

from fleetworks import constants as c

log = logging.getLogger(__name__)

#: ``fleet:holders``: worker name -> JSON of its snapshot.
HOLDERS_KEY: Final = c.KEY_PREFIX + "holders"
#: Seconds between a worker's snapshots.
SNAPSHOT_EVERY_S: Final = 1.0
#: Seconds after which a worker's latest snapshot means it is gone or stalled.
STALE_AFTER_S: Final = 3.0
#: Seconds a delivery may take to show in its worker's reserved requests.
MARGIN_S: Final = 1.0
#: Seconds after which a snapshot is deleted by the reader (its worker is long gone).
FORGET_AFTER_S: Final = 3600.0


def held_tags() -> list[str]:
    """The delivery tags this worker process holds (reserved and running requests)."""
    from celery.worker import state

    tags: list[str] = []
    for request in list(state.reserved_requests):
        message = getattr(request, "message", None)
        tag = getattr(message, "delivery_tag", None)
        if tag:
            tags.append(str(tag))
    return tags


def write(client: redis.Redis, worker: str, tags: list[str], at: float | None = None) -> None:
    snapshot = {"at": time.time() if at is None else at, "tags": tags}
    client.hset(HOLDERS_KEY, worker, json.dumps(snapshot, separators=(",", ":")))


@dataclass(frozen=True, slots=True)
class Live:
    """What the live workers hold, and before when a delivery must have shown."""

    tags: frozenset[str]
    #: Deliveries before this (epoch s) are in their live holder's snapshot.
    settled_before: float
    workers: int


def live(client: redis.Redis, now: float | None = None) -> Live:
    """The live workers' held tags; a delivery made before ``settled_before``
    and in none of them is held by no live worker."""
    now = time.time() if now is None else now
    tags: set[str] = set()
    oldest = now
    workers = 0
    for name, raw in client.hgetall(HOLDERS_KEY).items():
        try:
            snapshot = json.loads(raw)
            at = float(snapshot["at"])
            held = [str(t) for t in snapshot.get("tags") or []]
        except (ValueError, KeyError, TypeError):
            client.hdel(HOLDERS_KEY, name)
            continue
        if at < now - FORGET_AFTER_S:
            client.hdel(HOLDERS_KEY, name)
            continue
        if at < now - STALE_AFTER_S:
            continue
        workers += 1
        tags.update(held)
        oldest = min(oldest, at)
    return Live(frozenset(tags), oldest - MARGIN_S, workers)


class Snapshots(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: writes this worker's held delivery tags every second."""

    requires = ("celery.worker.components:Hub",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._name = ""

    # No stop(): a worker shutting down warm may run its tasks for a while
    # yet; its snapshot goes stale by itself, and a running task's own lease
    # (renewed by its process) keeps the reaper off its message.

    def start(self, worker: Any) -> None:
        from fleetworks import kombu_redis

        if worker.hub is None or not kombu_redis.is_redis(worker.app):
            return
        self._name = str(worker.hostname)
        self._tick(worker)
        worker.hub.call_repeatedly(SNAPSHOT_EVERY_S, self._tick, worker)

    def _tick(self, worker: Any) -> None:
        try:
            write(_client(worker.app), self._name, held_tags())
        except Exception as exc:  # Redis away: the next tick tries again
            log.debug("holder snapshot not written: %s", exc)


def _client(app: Any) -> redis.Redis:
    from fleetworks.app import fleet_of

    return fleet_of(app).locks.client
