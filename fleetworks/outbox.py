"""The outbox: every agent message is recorded until a run leases its entity.

Celery's Redis transport pops a message (``BRPOP``) and only then records it
as unacknowledged (kombu's ``unacked`` hash). A connection that closes
between the two, or a worker killed between them, loses the message: it is
in no queue, in no ``unacked`` entry, and no claim names it (kombu#1733,
celery#4354). Neither Celery nor kombu closes that window; this module does,
for the messages of agent tasks on a Redis broker.

**Recording.** Before an agent message is published, whatever publishes it
(``enqueue``, ``enqueue_many``, beat, the events relay, the reaper, a retry
from a worker: they all go through Celery's ``before_task_publish``), its
task name, id, arguments, queue and delivery options are written to the lock
store: ``fleet:outbox`` (task id -> the message) and ``fleet:outbox:at``
(task id -> publish time). ``enqueue_many`` writes each pipeline's records
in one round trip just before that pipeline's messages leave.

**Forgetting.** The record goes when a run takes the entity's lease (in the
same Lua script as the lease and the fencing token: no extra round trip), or
when a run ends before any lease (the payload is refused, the key is already
done, the policy gives up). From that moment the run's in-flight record
(:mod:`fleetworks.inflight`), its claim row, or kombu's ``unacked`` entry is
what the reaper sees instead.

**Recovering.** Each reaper tick looks at records older than
:attr:`~fleetworks.timing.Timings.outbox_after_s` (one ``ZRANGEBYSCORE``; in
steady state it finds none). A record is republished, with the same task id,
only when its message is:

- not queued: Redis queues are first in, first out (``LPUSH``, ``BRPOP``), so
  a message published at *t* can still be waiting only if the oldest message
  waiting in its queue was published at or before *t* (a message the reaper
  puts back at the far end of its queue is dated anew first, see
  :func:`touch`); and, where the queue is short enough to read
  (:data:`SCAN_LIMIT` messages), its id is in none of them;
- not unacknowledged: no ``unacked`` entry carries its task id;
- not claimed or settled: the results database has no ``claimed`` or final
  row for its key;
- still recorded, unchanged, after those reads (a run that leased it
  meanwhile removed it).

Why the record is safe at every crash point:

- recorded, never published (the publisher died, or the broker refused the
  publish after the record was written): after the bound nothing queued,
  unacknowledged, claimed or settled matches it, so the reaper publishes it;
- published, lost in the pop-to-unacked window: the same;
- published twice (the reaper raced a slow publisher, a clock skew made a
  queued message look older than it is, or the caller retried a publish that
  had in fact gone through): both copies carry the same key, the claim lets
  one run and counts the other as a duplicate; nothing runs twice.

The bound covers the time from recording to the message's ``LPUSH`` (one
pipeline) and clock skew between the publisher and the reaper; a bound that
is too short costs a duplicate message, never a duplicate effect.

RabbitMQ brokers are not recorded: AMQP keeps a delivered message
unacknowledged on the broker until the consumer acks it and requeues it when
the consumer's connection closes, so that window does not exist there.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import redis

from fleetworks import constants as c
from fleetworks import kombu_redis

if TYPE_CHECKING:
    from celery import Celery

    from fleetworks.agent import Fleet

log = logging.getLogger(__name__)

#: Hash: task id -> JSON of the message (name, args, kwargs, queue, options).
OUTBOX_KEY: Final = c.OUTBOX_KEY
#: Sorted set: task id -> publish time (epoch seconds, the publisher's clock).
OUTBOX_AT_KEY: Final = c.OUTBOX_AT_KEY

#: Celery message headers kept with a record, to publish the message again as it was.
_KEPT_HEADERS: Final = ("retries", "eta", "expires", "root_id", "parent_id")


@dataclass
class _Pending:
    """Where the records of the messages published now go (the fleet the
    caller named), and, with ``hold``, those held back to go out in one round
    trip with a publish batch."""

    client: redis.Redis
    hold: bool = True
    entries: list[tuple[str, str, float]] = field(default_factory=list)

    def add(self, task_id: str, raw: str, at: float) -> None:
        """Hold one record back until :meth:`flush`."""
        self.entries.append((task_id, raw, at))

    def flush(self) -> None:
        if not self.entries:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(OUTBOX_KEY, mapping={tid: raw for tid, raw, _ in self.entries})
        pipe.zadd(OUTBOX_AT_KEY, {tid: at for tid, _, at in self.entries})
        pipe.execute()
        self.entries.clear()


#: Queues up to this many messages are read through to confirm a message is
#: not waiting in them before it is taken for lost; longer ones are trusted
#: to the first-in, first-out reading alone.
SCAN_LIMIT: Final = 5000

_pending: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar(
    "fleetworks_outbox_pending", default=None
)


def _fleet_for(task_name: str, app: Celery | None = None) -> Fleet | None:
    """The fleet (on a Redis broker) whose agent ``task_name`` is: ``app``'s
    if given, else the current Celery app's (a worker's, beat's), else the
    newest that has it."""
    from celery import current_app

    from fleetworks.agent import fleets

    found = fleets()
    if app is not None:
        found = [f for f in found if f.app is app]
    current = current_app._get_current_object()
    for fleet in sorted(found, key=lambda f: f.app is not current):
        if task_name in fleet.agents and kombu_redis.is_redis(fleet.app):
            return fleet
    return None


def entry(
    headers: dict[str, Any], body: Any, routing_key: str | None, properties: dict[str, Any]
) -> str:
    """The JSON record of one message about to be published."""
    args, kwargs = ([], {})
    if isinstance(body, list | tuple) and len(body) >= 2:
        args, kwargs = body[0], body[1]
    record = {
        "task": headers.get("task"),
        "args": list(args or []),
        "kwargs": dict(kwargs or {}),
        "queue": routing_key,
        "priority": properties.get("priority"),
        **{name: headers.get(name) for name in _KEPT_HEADERS if headers.get(name) is not None},
    }
    return json.dumps(record, separators=(",", ":"), default=str)


def on_publish(
    headers: dict[str, Any], body: Any, routing_key: str | None, properties: dict[str, Any]
) -> None:
    """Record an agent message before it is published (``before_task_publish``)."""
    name, task_id = headers.get("task"), headers.get("id")
    if not isinstance(name, str) or not isinstance(task_id, str):
        return
    pending = _pending.get()
    sent_at = headers.get(c.SENT_AT_HEADER)
    at = float(sent_at) if isinstance(sent_at, int | float) else time.time()
    if pending is not None:
        raw = entry(headers, body, routing_key, properties)
        if pending.hold:
            pending.entries.append((task_id, raw, at))
        else:
            pending.entries = [(task_id, raw, at)]
            pending.flush()
        return
    fleet = _fleet_for(name)
    if fleet is None:
        return
    raw = entry(headers, body, routing_key, properties)
    pipe = fleet.locks.client.pipeline(transaction=False)
    pipe.hset(OUTBOX_KEY, task_id, raw)
    pipe.zadd(OUTBOX_AT_KEY, {task_id: at})
    pipe.execute()


@contextlib.contextmanager
def collecting(app: Celery, agent: str, *, hold: bool = True) -> Iterator[_Pending | None]:
    """Record the messages of ``agent`` published inside in ``app``'s lock
    store; with ``hold``, hold the records back and the caller calls
    ``flush()`` before the messages themselves leave. None if ``agent``'s
    messages are not recorded (not an agent of ``app``, or not a Redis broker)."""
    fleet = _fleet_for(agent, app)
    if fleet is None or fleet.app is not app:
        yield None
        return
    pending = _Pending(fleet.locks.client, hold=hold)
    token = _pending.set(pending)
    try:
        yield pending
    finally:
        _pending.reset(token)


def forget(client: redis.Redis, task_id: str) -> None:
    """Drop a message's record: a run ended it before taking any lease."""
    if not task_id:
        return
    pipe = client.pipeline(transaction=False)
    pipe.hdel(OUTBOX_KEY, task_id)
    pipe.zrem(OUTBOX_AT_KEY, task_id)
    pipe.execute()


def touch(client: redis.Redis, task_id: str, at: float | None = None) -> None:
    """Date a recorded message anew (if it is recorded): it is being put back
    at the far end of its queue (kombu's restore pushes on the left), where
    its old date would break the first-in, first-out reading."""
    if task_id:
        client.zadd(OUTBOX_AT_KEY, {task_id: time.time() if at is None else at}, xx=True)


def pending_count(client: redis.Redis) -> int:
    """How many messages are recorded now."""
    return int(client.zcard(OUTBOX_AT_KEY))


@dataclass(frozen=True, slots=True)
class Recorded:
    task_id: str
    raw: str
    at: float
    record: dict[str, Any]


def overdue(client: redis.Redis, older_than: float, limit: int) -> list[Recorded]:
    """Records published before ``older_than`` (epoch s), oldest first."""
    found: list[Any] = list(
        client.zrangebyscore(OUTBOX_AT_KEY, "-inf", older_than, 0, limit, withscores=True)
    )
    if not found:
        return []
    ids = [tid.decode() if isinstance(tid, bytes) else str(tid) for tid, _ in found]
    ats = [float(at) for _, at in found]
    raws = client.hmget(OUTBOX_KEY, ids)
    out: list[Recorded] = []
    for at, tid, raw in zip(ats, ids, raws, strict=True):
        if raw is None:
            client.zrem(OUTBOX_AT_KEY, tid)  # the hash entry went with a lease
            continue
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        try:
            record = json.loads(text)
        except ValueError:
            record = {}
        out.append(Recorded(tid, text, float(at), record if isinstance(record, dict) else {}))
    return out


def still_recorded(client: redis.Redis, item: Recorded) -> bool:
    """Whether ``item``'s record is still the one read: no run leased its entity
    and no new publish of the same task id replaced it meanwhile."""
    raw = client.hget(OUTBOX_KEY, item.task_id)
    text = raw.decode() if isinstance(raw, bytes) else raw
    return text == item.raw


def republish(app: Celery, item: Recorded) -> None:
    """Publish a recorded message again, same task id. The publish records it
    anew (a fresh time) before the message leaves, so the record is never
    missing while the message may be: a reaper that dies here leaves the old
    record, and the next tick tries again."""
    r = item.record
    options: dict[str, Any] = {"task_id": item.task_id}
    if r.get("queue"):
        options["queue"] = r["queue"]
    for name in ("retries", "eta", "expires", "priority", "root_id", "parent_id"):
        if r.get(name) is not None:
            options[name] = r[name]
    name = str(r.get("task"))
    with collecting(app, name, hold=False):
        app.send_task(name, args=r.get("args") or [], kwargs=r.get("kwargs") or {}, **options)
