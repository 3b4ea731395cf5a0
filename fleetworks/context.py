"""What an agent is (:class:`AgentSpec`) and what one of its runs sees (:class:`RunContext`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from celery import Celery
from sqlalchemy import Connection

from fleetworks.db import get_engine
from fleetworks.events import (
    Event,
    Resumed,
    Waiting,
    emitted_id,
    store,
    store_wait,
    subscription_key,
)
from fleetworks.events import check as check_event
from fleetworks.locks import Lease
from fleetworks.timing import lock_ttl_s

#: Seconds: default hard time limit of an agent task. The lock TTL and the
#: broker visibility timeout are derived from it, never set on their own.
DEFAULT_TIME_LIMIT_S: Final = 30.0

#: Count: default retries of a behaviour that raised, per agent.
DEFAULT_MAX_RETRIES: Final = 3

#: Count: default claims of one key before it is declared ``dead``.
DEFAULT_MAX_DELIVERIES: Final = 5


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a payload is: its idempotency key and the entity its lease is on."""

    key: str
    entity: str


#: The savepoint of one batch item's effects in the batch's transaction.
_SAVEPOINT: Final = "fleet_item"

#: A batch agent's behaviour for a whole batch: one result per run context.
BatchBehaviour = Callable[[Sequence["RunContext"]], Sequence[Any]]

#: Count: the most messages one batch run may take (one ``IN`` list, one
#: multi-row claim, one transaction).
MAX_BATCH_SIZE: Final = 1000


@dataclass(frozen=True, slots=True)
class Batch:
    """How a batch agent's worker takes its messages (:mod:`fleetworks.batch`).

    A run takes the message Celery delivered and up to ``size - 1`` more of
    the agent's queue, waiting at most ``wait_s`` for them to arrive.

    ``together``, when given, is the agent's behaviour for a whole batch:
    called with the run context of every key that reached its behaviour
    (each with its own payload, fencing token and attempts; all of them
    writing to the batch's one transaction through ``ctx.db``), it returns
    one result per context, in order, so it can read and write the batch with
    set-based statements. Its effects are one savepoint: if it raises, or any
    key's lease or fencing token turns out lost, they roll back and every key
    runs alone through the agent's per-item behaviour, so a bad item fails
    (or is refused) alone. The two behaviours must do the same thing.
    """

    #: The most messages one run takes, the delivered one included.
    size: int = 100
    #: Seconds a run waits for more messages before it starts with fewer.
    wait_s: float = 0.0
    #: The behaviour for the whole batch (see above); None runs it per item.
    together: BatchBehaviour | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch size must be in [1, {MAX_BATCH_SIZE}], not {self.size}")
        if not 0 <= self.wait_s <= 5:
            raise ValueError(f"batch wait_s must be in [0, 5] seconds, not {self.wait_s}")
        if self.together is not None and not callable(self.together):
            raise ValueError("batch together= takes a function of a list of run contexts")


@dataclass(frozen=True)
class AgentSpec:
    """How one agent behaviour runs under the guard."""

    name: str
    payload: type[Any]
    #: Idempotency key of a payload: the effect happens once per key. A
    #: subscriber's is ``<name>|<event id>`` unless given.
    key: Callable[[Any], str] | None = None
    #: Entity the lock is taken on; defaults to the idempotency key (for a
    #: subscriber, ``<name>|<event key>``: one event key's runs one at a time).
    entity: Callable[[Any], str] | None = None
    #: On lock contention: ``retry`` later with back-off, or ``skip`` and record.
    on_contention: str = "retry"
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    #: Retries of a behaviour that raised, with exponential back-off and jitter.
    max_retries: int = DEFAULT_MAX_RETRIES
    #: Claims of one key (deliveries that reached the behaviour) before it is
    #: declared ``dead``: a message that kills its worker every time stops here.
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    #: Topics this agent subscribes to (:mod:`fleetworks.events`); its payload
    #: is then :class:`fleetworks.events.Event` (or a subclass).
    on: tuple[str, ...] = ()
    #: Which of those events it wants: a predicate on the event, run by the relay.
    where: Callable[[Event], bool] | None = None
    #: Take many messages per run (:class:`Batch`); None runs one per message.
    batch: Batch | None = None

    def __post_init__(self) -> None:
        self._check_limits()
        self._subscribe()
        if self.batch is not None and not isinstance(self.batch, Batch):
            raise ValueError(f"{self.name}: batch= takes fleetworks.Batch(size=, wait_s=)")

    def _subscribe(self) -> None:
        on = (self.on,) if isinstance(self.on, str) else tuple(self.on)
        object.__setattr__(self, "on", on)
        for topic in self.on:
            check_event(topic, {})
        if self.on and not (isinstance(self.payload, type) and issubclass(self.payload, Event)):
            raise ValueError(f"{self.name}: a subscriber's payload must be fleetworks.events.Event")
        if self.where is not None and not self.on:
            raise ValueError(f"{self.name}: where= filters events; give on=[topics] too")
        if self.key is None:
            if not self.on:
                raise ValueError(f"{self.name}: key= is required (unless the agent subscribes)")
            name = self.name
            object.__setattr__(self, "key", lambda e: subscription_key(name, e.id))
            if self.entity is None:
                object.__setattr__(self, "entity", lambda e: f"{name}|{e.key or e.id}")

    def _check_limits(self) -> None:
        if self.on_contention not in ("retry", "skip"):
            raise ValueError(f"on_contention must be 'retry' or 'skip', not {self.on_contention!r}")
        if self.max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        if self.max_retries < 0:
            raise ValueError("max_retries must be at least 0")
        if self.time_limit_s <= 0:
            raise ValueError("time_limit_s must be positive")

    @property
    def lock_ttl_s(self) -> float:
        return lock_ttl_s(self.time_limit_s)

    def identify(self, payload: Any, explicit_key: str | None = None) -> Identity:
        """The key (``explicit_key`` when given) and entity of a parsed payload."""
        assert self.key is not None  # set in __post_init__
        key = explicit_key if explicit_key is not None else self.key(payload)
        entity = self.entity(payload) if self.entity else key
        return Identity(key, entity)


@dataclass
class RunContext:
    """What one claimed run knows; handed to the behaviour as ``ctx``."""

    spec: AgentSpec
    task_id: str
    worker: str
    payload: Any
    idempotency_key: str
    entity_key: str
    lease: Lease
    #: Deliveries of this key so far, this one included. A key's first
    #: delivery reads nothing from the database before its behaviour: 1 (a
    #: key republished after a failed attempt whose retry message was lost
    #: reads 1 too, and its outcome row keeps the true count).
    attempts: int
    database_url: str
    #: The queue the message came from.
    queue: str | None = None
    #: The Celery app running this run: publish follow-up work with it.
    app: Celery | None = None
    _conn: Connection | None = field(default=None, repr=False)
    #: In a batch run: the batch's one transaction; this run's effects are a
    #: savepoint in it, released or rolled back alone.
    shared: Connection | None = field(default=None, repr=False)
    #: One of the contexts handed to a batch behaviour (:attr:`Batch.together`):
    #: :attr:`db` is the shared transaction itself, under the batch's savepoint.
    joined: bool = field(default=False, repr=False)
    _savepoint: Any = field(default=None, repr=False)
    #: Events this run has emitted (stored in :attr:`db`, not yet committed).
    emitted: list[str] = field(default_factory=list)
    #: Set on a run that resumes from :meth:`wait_for`: the event, or the timeout.
    resumed: Resumed | None = None

    @property
    def fencing_token(self) -> int:
        return self.lease.fencing_token

    def check_lease(self) -> None:
        """Raise ``LeaseLostError`` if this run's lease is known to be lost.

        Call it before an effect outside the results database; effects through
        :attr:`db` are checked for you and fenced at commit.
        """
        self.lease.check()

    @property
    def db_opened(self) -> bool:
        """Whether this run has opened :attr:`db` (written or read an effect)."""
        return self._conn is not None

    @property
    def db(self) -> Connection:
        """The effect transaction, begun on first use, committed with the outcome.

        Open it as late as possible (write effects last): on SQLite it holds
        the database's write lock until the run ends.
        """
        if self._conn is None:
            self.check_lease()
            if self.shared is not None and self.joined:
                self._conn = self.shared
            elif self.shared is not None:
                # A plain SAVEPOINT: SQLAlchemy's nested transaction object
                # costs more than the statement, once per item of a batch.
                self.shared.exec_driver_sql(f"SAVEPOINT {_SAVEPOINT}")
                self._savepoint = True
                self._conn = self.shared
            else:
                self._conn = get_engine(self.database_url).connect()
                self._conn.begin()
        return self._conn

    def emit(self, topic: str, data: dict[str, Any], key: str | None = None) -> str:
        """Emit an event: stored in :attr:`db`, so it exists only if this run's
        effects and ``succeeded`` row commit. Returns its id, derived from the
        agent, the run's key and this emit's index. Raises
        :class:`fleetworks.events.EventError` naming what is wrong with it."""
        event_id = emitted_id(self.spec.name, self.idempotency_key, len(self.emitted))
        store(self.db, topic, data, key=key, event_id=event_id, source_agent=self.spec.name,
              source_key=self.idempotency_key)  # fmt: skip
        self.emitted.append(event_id)
        return event_id

    def wait_for(
        self, topic: str, match: dict[str, Any] | None = None, *, timeout_s: float
    ) -> Waiting:
        """End this run waiting for an event: return what this returns.

        The wait is stored in :attr:`db` (it exists only if this run commits)
        and holds no worker. Once, either the first event on ``topic`` whose
        data has every field of ``match`` arrives, or ``timeout_s`` passes; then
        this agent runs again with the same payload and :attr:`resumed` set
        (``resumed.event``, or ``resumed.timed_out``).
        """
        payload = self.payload
        if hasattr(payload, "model_dump"):
            payload = payload.model_dump(mode="json")
        return store_wait(
            self.db, agent=self.spec.name, key=self.idempotency_key, payload=payload,
            queue=self.queue, topic=topic, match=dict(match or {}), timeout_s=timeout_s,
        )  # fmt: skip

    def close_db(self, *, commit: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.shared is not None and self.joined:
            return  # the batch's savepoint is released or rolled back for all
        if self.shared is not None:
            self._savepoint = None
            if not commit:
                conn.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            conn.exec_driver_sql(f"RELEASE SAVEPOINT {_SAVEPOINT}")
            return
        try:
            if commit:
                conn.commit()
            else:
                conn.rollback()
        finally:
            conn.close()
