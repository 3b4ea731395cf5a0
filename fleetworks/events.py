"""Events between agents: an outbox in the results database, relayed to
subscribers as guarded tasks.

Why our own and not a message bus: Celery has no subscriptions (its signals
are in-process), and a kombu fanout exchange delivers only to consumers
connected when it is published and cannot commit with the database
transaction whose effect the event announces. fleetworks promises that an
event exists if and only if the effect it announces committed, and that
every subscriber's effect happens once per event. So:

* **Emitting** writes the event into ``events`` with the same connection as
  the run's effects and its ``succeeded`` row (:meth:`RunContext.emit
  <fleetworks.context.RunContext.emit>`): a run that fails, retries or is
  refused as stale rolls its events back with its effects. Its id is derived
  from the run's agent, idempotency key and the emit's index, so the same
  run cannot store an event twice. :func:`publish` does the same for
  application code, in the application's own transaction when it passes its
  connection; a publish with an id already stored is a no-op that says so.
* **Relaying** (:class:`Relay`, ``fleetworks relay``, started by ``up``)
  reads events not yet relayed, in the order they were stored, sends one
  task per matching subscriber and marks them relayed in one transaction.
  A relay killed after sending and before marking sends them again; each
  subscriber task's idempotency key is ``<subscriber>|<event id>``, so the
  second delivery is a counted duplicate, never a second effect. Any number
  of relays may run: on PostgreSQL they split the pending events
  (``FOR UPDATE SKIP LOCKED``); on SQLite the database's single writer
  serialises them. A relay wakes when an event commits: on PostgreSQL through
  ``LISTEN`` on :data:`PG_CHANNEL` (the storing transaction notifies it, an
  application's own included), and on any database through a Redis message
  on :data:`WAKE_CHANNEL` that a run which emitted publishes after its
  commit; it looks every ``poll_s`` anyway, so a lost wake-up costs
  latency, never an event. With tracing on, an event carries its emitter's
  trace context in ``data`` under a reserved key that :func:`to_event` takes
  out; the relay continues that trace (:mod:`fleetworks.tracing`).
* **Subscribing**: an agent declared with ``AgentSpec(on=[topics], where=...)``
  receives :class:`Event` payloads; runs of one event key are serialised by
  a lease on ``<subscriber>|<event key>``, and in order: a run whose key has
  an earlier event (by ``position``) the subscriber has not handled is put
  back with a short back-off (``deferred``), never given up, so the earlier
  one goes first.
* **Waiting**: a run that returns :meth:`RunContext.wait_for
  <fleetworks.context.RunContext.wait_for>` stores a wait (in its own
  transaction, like an emit) and holds no worker. The relay resolves it when
  it relays the first matching event stored after it, or when its deadline
  passes (checked at every relay pass, at least every ``poll_s``: a timer in
  the database, not a Celery ETA in a worker's memory, so it survives every
  process restarting). Both resolve with one conditional UPDATE (``WHERE
  state = 'waiting'``), so an event and a deadline that race resolve it
  once; the continuation, a run of the same agent with the same payload and
  ``ctx.resumed`` set, has the key ``<first key>|wait:<wait id>``, so a
  continuation sent twice runs once.

The lost-message window of kombu's Redis transport (a message popped by a
worker whose connection then drops) applies to subscriber tasks as to any
task; ``fleetworks events replay`` sends a subscriber its events again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import redis
from celery import Celery
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Connection, insert, select, text, update
from sqlalchemy.engine import make_url

from fleetworks import message, tracing
from fleetworks.db import is_postgres, transaction, upsert
from fleetworks.models import EVENTS, OUTCOMES, TERMINAL, WAITS

if TYPE_CHECKING:
    from fleetworks.agent import Fleet
    from fleetworks.context import AgentSpec

log = logging.getLogger(__name__)

#: Redis channel a committed emit publishes to, to wake the relays.
WAKE_CHANNEL: Final = "fleet:events:wake"
#: PostgreSQL channel every transaction that stores an event notifies.
PG_CHANNEL: Final = "fleet_events"
#: Topic names: dotted words (``ticket.escalated``), at most 200 characters.
TOPIC_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
MAX_TOPIC_CHARS: Final = 200
MAX_EVENT_KEY_CHARS: Final = 500
#: Characters: longest event id (the ``event_id`` column).
MAX_EVENT_ID_CHARS: Final = 200
#: Levels of nesting allowed in an event's data: a subscriber receives it
#: inside its message, which may nest at most ``MAX_PAYLOAD_DEPTH`` levels.
MAX_DATA_DEPTH: Final = message.MAX_PAYLOAD_DEPTH - 16
#: Namespace of the ids of events emitted by runs (uuid5 of agent, key, index).
_EMIT_NAMESPACE: Final = uuid.UUID("5f1c3c1e-7a4e-4c1b-9a55-2f0b8e6d4a10")
#: Count: events one relay transaction reads and sends.
RELAY_BATCH: Final = 500
#: Seconds a relay waits for a wake-up before it looks anyway.
RELAY_POLL_S: Final = 1.0


class Event(BaseModel):
    """What a subscriber receives: one stored event, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    topic: str
    key: str | None = None
    data: dict[str, Any]
    #: The agent whose run emitted it (None: application code) and that run's key.
    source_agent: str | None = None
    source_key: str | None = None
    #: When it was stored (ISO 8601, UTC).
    created_at: str
    #: Its place in the order events were stored: a key's events reach each
    #: subscriber in this order.
    position: int | None = None


class EventError(ValueError):
    """An event that cannot be stored, naming what is wrong with it."""


@dataclass(frozen=True, slots=True)
class Published:
    """What :func:`publish` did: ``stored`` is False when the id was already stored."""

    event_id: str
    stored: bool


def id_problem(event_id: Any) -> str | None:
    """Why ``event_id`` cannot be an event's id, or None."""
    if (
        not isinstance(event_id, str)
        or not event_id
        or len(event_id) > MAX_EVENT_ID_CHARS
        or message.unstorable_text(event_id) is not None
    ):
        return f"must be a string of 1 to {MAX_EVENT_ID_CHARS} characters without NUL characters"
    return None


def check(topic: Any, data: Any, key: Any = None) -> None:
    """Raise :class:`EventError` naming the field if the event cannot be stored."""
    if not isinstance(topic, str) or not topic:
        raise EventError(f"topic: must be a non-empty string, got {type(topic).__name__}")
    if len(topic) > MAX_TOPIC_CHARS or not TOPIC_PATTERN.fullmatch(topic):
        raise EventError(
            f"topic: {topic[:60]!r} must be dotted words of letters, digits, '_' or '-' "
            f"(<= {MAX_TOPIC_CHARS} chars)"
        )
    if key is not None and (
        not isinstance(key, str)
        or not key
        or len(key) > MAX_EVENT_KEY_CHARS
        or message.unstorable_text(key) is not None
    ):
        raise EventError(
            f"key: must be a non-empty string of <= {MAX_EVENT_KEY_CHARS} chars "
            "without NUL characters"
        )
    if not isinstance(data, dict):
        raise EventError(f"data: must be a JSON object, got {type(data).__name__}")
    if tracing.EVENT_TRACE_KEY in data:
        raise EventError(f"data: the key {tracing.EVENT_TRACE_KEY!r} is reserved (trace context)")
    if message.too_deep(data, MAX_DATA_DEPTH) is not None:
        raise EventError(f"data: nested deeper than {MAX_DATA_DEPTH} levels")
    bad = message.unstorable_text(data)
    if bad is not None:
        raise EventError(f"data: {bad}: text must be valid Unicode without NUL characters")
    try:
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EventError(f"data: not JSON: {exc}") from None


def emitted_id(agent: str, idempotency_key: str, index: int) -> str:
    """The id of the ``index``-th event a run of ``agent`` on ``idempotency_key`` emits."""
    return str(uuid.uuid5(_EMIT_NAMESPACE, f"{agent}\x1f{idempotency_key}\x1f{index}"))


#: Built once; executed with each event's values.
_INSERT_EVENT = insert(EVENTS)


def store(
    conn: Connection,
    topic: str,
    data: dict[str, Any],
    *,
    event_id: str,
    key: str | None = None,
    source_agent: str | None = None,
    source_key: str | None = None,
    if_new: bool = False,
) -> bool:
    """Insert one event with ``conn`` (its transaction decides whether it exists).

    With ``if_new``, an id already stored is left alone and False returned;
    without, storing it again fails (an emitted event is an effect: a second
    one is a ``duplicate_effect``).
    """
    check(topic, data, key)
    values = {
        "event_id": event_id, "topic": topic, "key": key, "data": tracing.with_event_trace(data),
        "source_agent": source_agent, "source_key": source_key, "created_at": datetime.now(UTC),
    }  # fmt: skip
    if not if_new:
        conn.execute(_INSERT_EVENT, values)
        _notify(conn)
        return True
    stmt = upsert(conn, EVENTS).values(**values)
    stmt = stmt.on_conflict_do_nothing(index_elements=[EVENTS.c.event_id])
    # RETURNING, not rowcount: a driver may not report rows of an upsert.
    stored = conn.execute(stmt.returning(EVENTS.c.position)).first() is not None
    if stored:
        _notify(conn)
    return stored


def _notify(conn: Connection) -> None:
    """On PostgreSQL, wake the relays when this transaction commits (NOTIFY is
    delivered at commit, once per transaction, and never on a rollback)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": PG_CHANNEL})


def publish(
    topic: str,
    data: dict[str, Any],
    *,
    key: str | None = None,
    event_id: str | None = None,
    connection: Connection | None = None,
    app: Celery | None = None,
) -> Published:
    """Store an event from application code; the relay sends it to its subscribers.

    With ``connection`` (a connection to the results database, inside the
    application's own transaction) the event commits or rolls back with that
    transaction. Without it, ``app``'s fleet (default: Celery's current app)
    stores it in a transaction of its own. ``event_id`` (default: a new UUID)
    makes a resend a no-op: ``Published.stored`` is then False.
    """
    from celery import current_app

    from fleetworks.agent import Fleet

    event_id = event_id or str(uuid.uuid4())
    problem = id_problem(event_id)
    if problem is not None:
        raise EventError(f"id: {problem}")
    if connection is not None:
        return Published(event_id, store(connection, topic, data, key=key,
                                         event_id=event_id, if_new=True))  # fmt: skip
    fleet = Fleet.of(app or current_app)
    with transaction(fleet.settings.database) as conn:
        stored = store(conn, topic, data, key=key, event_id=event_id, if_new=True)
    if stored:
        wake(fleet.locks.client)
    return Published(event_id, stored)


def wake(client: redis.Redis) -> None:
    """Tell the relays an event was committed (best effort: they also poll)."""
    try:
        client.publish(WAKE_CHANNEL, b"1")
    except redis.RedisError as exc:
        log.debug("could not wake the relays (%s); they poll", exc)


def to_event(row: Any) -> Event:
    created = row.created_at
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return Event(
        id=row.event_id, topic=row.topic, key=row.key, data=tracing.without_event_trace(row.data),
        source_agent=row.source_agent, source_key=row.source_key,
        created_at=created.isoformat(), position=row.position,
    )  # fmt: skip


#: States of a wait.
WAITING: Final = "waiting"
RESOLVED: Final = "resolved"
TIMED_OUT: Final = "timed_out"
#: Separator of a continuation's key: ``<first key>|wait:<wait id>``.
_WAIT_SEP: Final = "|wait:"
#: Longest wait a run may ask for (a week).
MAX_WAIT_S: Final = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Resumed:
    """What a continuation run resumes with: the matching event, or the timeout."""

    wait_id: int
    event: Event | None

    @property
    def timed_out(self) -> bool:
        return self.event is None


@dataclass(frozen=True, slots=True)
class Waiting:
    """What a behaviour returns to end its run waiting (the outcome's result)."""

    wait_id: int
    topic: str
    match: dict[str, Any]
    deadline: str

    def as_result(self) -> dict[str, Any]:
        return {"waiting": {"wait": self.wait_id, "topic": self.topic, "match": self.match,
                            "deadline": self.deadline}}  # fmt: skip


def root_key(key: str) -> str:
    """The key of the first run of a chain of waits."""
    return key.split(_WAIT_SEP, 1)[0]


def continuation_key(key: str, wait_id: int) -> str:
    return f"{root_key(key)}{_WAIT_SEP}{wait_id}"


def store_wait(
    conn: Connection,
    *,
    agent: str,
    key: str,
    payload: dict[str, Any],
    queue: str | None,
    topic: str,
    match: dict[str, Any],
    timeout_s: float,
) -> Waiting:
    """Store one wait with ``conn`` (it exists only if that transaction commits)."""
    check(topic, match)
    if not 0 < timeout_s <= MAX_WAIT_S:
        raise EventError(f"timeout_s: must be above 0 and at most {MAX_WAIT_S:g}, got {timeout_s}")
    now = datetime.now(UTC)
    deadline = now + timedelta(seconds=timeout_s)
    values = {
        "agent": agent, "key": key, "root_key": root_key(key), "payload": payload,
        "queue": queue, "topic": topic, "match": match, "deadline": deadline,
        "state": WAITING, "created_at": now,
    }  # fmt: skip
    wait_id = conn.execute(insert(WAITS).values(**values).returning(WAITS.c.id)).scalar_one()
    return Waiting(int(wait_id), topic, match, deadline.isoformat())


def resumed_from(resume: dict[str, Any] | None) -> Resumed | None:
    """The :class:`Resumed` a continuation message carries (ValueError if malformed)."""
    if resume is None:
        return None
    wait_id, event = resume.get("wait"), resume.get("event")
    if not isinstance(wait_id, int) or isinstance(wait_id, bool):
        raise ValueError("resume.wait: must be an integer")
    return Resumed(wait_id, None if event is None else Event.model_validate(event))


def resumed_for_key(url: str, key: str) -> Resumed | None:
    """What the continuation run with ``key`` resumes with, from the database:
    for a continuation republished without it (the reaper, a replay)."""
    _, sep, tail = key.rpartition(_WAIT_SEP)
    if not sep or not tail.isdigit():
        return None
    with transaction(url) as conn:
        wait = conn.execute(select(WAITS).where(WAITS.c.id == int(tail))).first()
        if wait is None or wait.state == WAITING:
            return None
        if wait.event_id is None:
            return Resumed(wait.id, None)
        row = conn.execute(select(EVENTS).where(EVENTS.c.event_id == wait.event_id)).first()
    return Resumed(wait.id, to_event(row) if row is not None else None)


def _matches_wait(match: dict[str, Any], event: Event) -> bool:
    return all(k in event.data and event.data[k] == v for k, v in match.items())


def _as_utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _resolve(
    conn: Connection, app: Celery, wait: Any, event: Event | None, producer: Any = None
) -> bool:
    """Resolve ``wait`` by ``event`` (None: its deadline) if still waiting, and
    send its continuation; False when it was already resolved."""
    state = RESOLVED if event is not None else TIMED_OUT
    won = conn.execute(
        update(WAITS)
        .where((WAITS.c.id == wait.id) & (WAITS.c.state == WAITING))
        .values(state=state, event_id=event.id if event else None, resolved_at=datetime.now(UTC))
    ).rowcount
    if won != 1:
        return False
    key = continuation_key(wait.key, wait.id)
    resume = {"wait": wait.id, "event": event.model_dump() if event else None}
    options = {"queue": wait.queue} if wait.queue else {}
    app.send_task(wait.agent, kwargs=message.pack(wait.payload, key, resume),
                  task_id=str(uuid.uuid5(_EMIT_NAMESPACE, key)), producer=producer,
                  **options)  # fmt: skip
    return True


def subscription_key(subscriber: str, event_id: str) -> str:
    """The idempotency key of one event's run in one subscriber."""
    return f"{subscriber}|{event_id}"


def earlier_unhandled(url: str, spec: AgentSpec, event: Event) -> str | None:
    """The id of the earliest event of ``event``'s key, stored before it, that
    ``spec`` subscribes to and has not handled yet; None when there is none."""
    if event.key is None or event.position is None:
        return None
    with transaction(url) as conn:
        rows = conn.execute(
            select(EVENTS)
            .where(
                (EVENTS.c.key == event.key)
                & (EVENTS.c.position < event.position)
                & EVENTS.c.topic.in_(spec.on)
            )
            .order_by(EVENTS.c.position)
        ).all()
        earlier = [e for e in (to_event(r) for r in rows) if matches(spec, e)]
        if not earlier:
            return None
        keys = {subscription_key(spec.name, e.id): e.id for e in earlier}
        done = set(
            conn.execute(
                select(OUTCOMES.c.idempotency_key).where(
                    OUTCOMES.c.idempotency_key.in_(list(keys)) & OUTCOMES.c.status.in_(TERMINAL)
                )
            ).scalars()
        )
    return next((keys[k] for k in keys if k not in done), None)


def earlier_unhandled_many(conn: Connection, spec: AgentSpec, batch: list[Event]) -> dict[str, str]:
    """:func:`earlier_unhandled` for many events at once (a batch subscriber's
    run), in two statements: event id -> the earlier event it must wait for."""
    keyed = [e for e in batch if e.key is not None and e.position is not None]
    if not keyed:
        return {}
    last = max(e.position for e in keyed if e.position is not None)
    rows = conn.execute(
        select(EVENTS)
        .where(
            EVENTS.c.key.in_(sorted({str(e.key) for e in keyed}))
            & (EVENTS.c.position < last)
            & EVENTS.c.topic.in_(spec.on)
        )
        .order_by(EVENTS.c.position)
    ).all()
    stored_ = [e for e in (to_event(r) for r in rows) if matches(spec, e)]
    if not stored_:
        return {}
    keys = {subscription_key(spec.name, e.id): e for e in stored_}
    done = set(
        conn.execute(
            select(OUTCOMES.c.idempotency_key).where(
                OUTCOMES.c.idempotency_key.in_(list(keys)) & OUTCOMES.c.status.in_(TERMINAL)
            )
        ).scalars()
    )
    open_ = [e for k, e in keys.items() if k not in done]
    waits: dict[str, str] = {}
    for event in keyed:
        assert event.position is not None
        first = next(
            (e for e in open_ if e.key == event.key and (e.position or 0) < event.position), None
        )
        if first is not None:
            waits[event.id] = first.id
    return waits


def subscribers(fleet: Fleet) -> list[AgentSpec]:
    return [spec for spec in fleet.agents.values() if spec.on]


def matches(spec: AgentSpec, event: Event) -> bool:
    if event.topic not in spec.on:
        return False
    if spec.where is None:
        return True
    try:
        return bool(spec.where(event))
    except Exception:
        log.exception("%s: filter raised on event %s; not delivered", spec.name, event.id)
        return False


def send(app: Celery, spec: AgentSpec, event: Event, producer: Any = None) -> str:
    """Send ``event`` to one subscriber; the task id is derived from both."""
    key = subscription_key(spec.name, event.id)
    task_id = str(uuid.uuid5(_EMIT_NAMESPACE, key))
    app.send_task(spec.name, kwargs=message.pack(event.model_dump(), key), task_id=task_id,
                  producer=producer)  # fmt: skip
    return task_id


class Relay:
    """Sends stored events to their subscribers; see the module docstring."""

    def __init__(self, fleet: Fleet, *, batch: int = RELAY_BATCH, poll_s: float = RELAY_POLL_S):
        fleet.import_task_modules()  # the subscribers live in the app's task modules
        self.fleet = fleet
        self.batch = batch
        self.poll_s = poll_s
        #: Subscriber tasks sent, waits resolved by an event, waits timed out.
        self.sent = 0
        self.resolved = 0
        self.timed_out = 0
        #: Set once the relay listens for wake-ups (Redis; PostgreSQL's NOTIFY).
        self.listening = threading.Event()
        self.listening_postgres = threading.Event()

    def relay_once(self) -> int:
        """Send one batch of pending events; returns how many events it relayed."""
        app, url = self.fleet.app, self.fleet.settings.database
        specs = subscribers(self.fleet)
        with transaction(url) as conn:
            query = (
                select(EVENTS)
                .where(EVENTS.c.relayed_at.is_(None))
                .order_by(EVENTS.c.position)
                .limit(self.batch)
            )
            if is_postgres(url):
                query = query.with_for_update(skip_locked=True)
            rows = conn.execute(query).all()
            if not rows:
                return 0
            with app.producer_or_acquire() as producer:
                for row in rows:
                    event = to_event(row)
                    with tracing.relaying(row.data, event.topic, event.id):
                        for spec in specs:
                            if matches(spec, event):
                                send(app, spec, event, producer)
                                self.sent += 1
                        self._resolve_waits(conn, event, row.created_at, producer)
            positions = [r.position for r in rows]
            conn.execute(
                update(EVENTS)
                .where(EVENTS.c.position.in_(positions))
                .values(relayed_at=datetime.now(UTC))
            )
        return len(rows)

    def _resolve_waits(
        self, conn: Connection, event: Event, stored_at: datetime, producer: Any
    ) -> None:
        """Resolve the waits on ``event``'s topic stored before it that it matches."""
        waiting = conn.execute(
            select(WAITS)
            .where((WAITS.c.state == WAITING) & (WAITS.c.topic == event.topic))
            .order_by(WAITS.c.id)
        ).all()
        for wait in waiting:
            if (
                _as_utc(wait.created_at) <= _as_utc(stored_at)
                and _matches_wait(wait.match, event)
                and _resolve(conn, self.fleet.app, wait, event, producer)
            ):
                self.resolved += 1

    def fire_timers(self) -> int:
        """Resolve every wait whose deadline has passed; returns how many."""
        fired = 0
        with transaction(self.fleet.settings.database) as conn:
            due = conn.execute(
                select(WAITS)
                .where((WAITS.c.state == WAITING) & (WAITS.c.deadline <= datetime.now(UTC)))
                .order_by(WAITS.c.deadline)
                .limit(self.batch)
            ).all()
            if not due:
                return 0
            with self.fleet.app.producer_or_acquire() as producer:
                for wait in due:
                    fired += _resolve(conn, self.fleet.app, wait, None, producer)
        self.timed_out += fired
        return fired

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set: at once on a wake-up, else every ``poll_s``."""
        woken = threading.Event()
        listeners = [self._listen_redis]
        if is_postgres(self.fleet.settings.database):
            listeners.append(self._listen_postgres)
        for listen in listeners:
            threading.Thread(target=listen, args=(stop, woken), daemon=True).start()
        while not stop.is_set():
            woken.clear()  # a wake-up during the pass below brings the next one at once
            try:
                while self.relay_once() == self.batch and not stop.is_set():
                    pass
                self.fire_timers()
            except Exception as exc:
                log.warning("relay: %s; trying again in %.1fs", exc, self.poll_s)
                stop.wait(self.poll_s)
                continue
            woken.wait(self.poll_s)

    def _listen_redis(self, stop: threading.Event, woken: threading.Event) -> None:
        """Wake-ups from runs that emitted and committed (any database)."""
        while not stop.is_set():
            pubsub: Any = None
            try:
                pubsub = self.fleet.locks.client.pubsub(  # type: ignore[no-untyped-call]
                    ignore_subscribe_messages=True
                )
                pubsub.subscribe(WAKE_CHANNEL)
                self.listening.set()
                while not stop.is_set():
                    if pubsub.get_message(timeout=1.0) is not None:
                        woken.set()
            except redis.RedisError:
                stop.wait(self.poll_s)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(redis.RedisError):
                        pubsub.close()

    def _listen_postgres(self, stop: threading.Event, woken: threading.Event) -> None:
        """PostgreSQL's own wake-up: every transaction that stored an event
        notifies :data:`PG_CHANNEL` as it commits, an application's too."""
        import psycopg

        dsn = make_url(self.fleet.settings.database).set(drivername="postgresql")
        while not stop.is_set():
            try:
                with psycopg.connect(dsn.render_as_string(hide_password=False),
                                     autocommit=True) as conn:  # fmt: skip
                    conn.execute(f"LISTEN {PG_CHANNEL}")
                    self.listening_postgres.set()
                    while not stop.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            woken.set()
            except psycopg.Error as exc:
                log.debug("relay: LISTEN %s failed (%s); polling meanwhile", PG_CHANNEL, exc)
                stop.wait(self.poll_s)


def replay(
    fleet: Fleet,
    subscriber: str,
    *,
    since: datetime | None = None,
    topics: Sequence[str] = (),
) -> int:
    """Send ``subscriber`` every stored event it matches again (``since`` a time,
    of ``topics``); effects already done are skipped and counted. Returns the
    number of events sent."""
    fleet.import_task_modules()
    spec = fleet.agents.get(subscriber)
    if spec is None or not spec.on:
        known = ", ".join(sorted(s.name for s in subscribers(fleet))) or "none"
        raise KeyError(f"no subscriber named {subscriber!r}; subscribers: {known}")
    sent = 0
    for event in stored(fleet.settings.database, topics=topics or spec.on, since=since):
        if matches(spec, event):
            send(fleet.app, spec, event)
            sent += 1
    return sent


def stored(
    url: str,
    *,
    topics: Iterable[str] = (),
    key: str | None = None,
    since: datetime | None = None,
    newest: int | None = None,
) -> list[Event]:
    """Stored events, oldest first, of ``topics`` (all when empty), ``key``, since
    a time; with ``newest``, only the newest that many."""
    query = select(EVENTS).order_by(EVENTS.c.position.desc())
    wanted = list(topics)
    if wanted:
        query = query.where(EVENTS.c.topic.in_(wanted))
    if key is not None:
        query = query.where(EVENTS.c.key == key)
    if since is not None:
        query = query.where(EVENTS.c.created_at >= since)
    if newest is not None:
        query = query.limit(newest)
    with transaction(url) as conn:
        return [to_event(r) for r in reversed(conn.execute(query).all())]


__all__ = [
    "Event",
    "EventError",
    "Published",
    "Relay",
    "check",
    "publish",
    "replay",
    "stored",
]
