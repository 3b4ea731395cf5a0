"""Tables of the results database (SQLAlchemy 2, declarative ``Mapped``).

``outcomes`` is the claim ledger and the record of every run: one row per
idempotency key. ``guard_events`` records what the guard did instead of
running (duplicates skipped, lock contention, duplicate effects caught).
``probe_effects`` is the effect ledger of the probe agent the proving rigs
send (:mod:`fleetworks.proving.probe`), UNIQUE on its key;
``probe_effect_log`` its second ledger, deliberately without one, where a
key that ran twice shows as two rows. ``events`` is the outbox of events
between agents (:mod:`fleetworks.events`). An agent's own tables belong to its
deployment, on the deployment's metadata and Alembic branch. ``agent_state``
holds each entity's current state with its version, and
``agent_state_history`` every version ever written (:mod:`fleetworks.state`).
``leader_terms`` the highest leader term accepted per group
(:mod:`fleetworks.leadership`).
Every other effect table has a UNIQUE constraint on what must happen once, so a
duplicate effect fails loudly instead of hiding.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql import func


class Base(DeclarativeBase):
    pass


class Status(StrEnum):
    """States of an outcome row: ``claimed`` -> ``succeeded | failed | rejected | dead``.

    ``failed`` may be claimed again (a retry); ``succeeded`` and ``rejected``
    are terminal; ``dead`` (deliveries or retries exhausted) is terminal until
    an operator replays it.
    """

    CLAIMED = "claimed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    DEAD = "dead"


#: States in which a key is done: a new delivery of it is a duplicate.
TERMINAL = (Status.SUCCEEDED, Status.REJECTED, Status.DEAD)


class EventKind(StrEnum):
    SKIPPED_DUPLICATE = "skipped_duplicate"
    SKIPPED_LOCKED = "skipped_locked"
    SKIPPED_DEAD = "skipped_dead"
    REPUBLISHED = "republished"
    REPLAYED = "replayed"
    LOCK_CONTENDED = "lock_contended"
    DUPLICATE_EFFECT = "duplicate_effect"
    STALE_WRITE = "stale_write"
    #: A subscriber's run put back behind an earlier event of its key.
    DEFERRED = "deferred"
    #: A run that raised and will be retried (its error; the key stays ``failed``).
    ATTEMPT_FAILED = "attempt_failed"


class Ended(dict[str, str]):
    """What a guarded run returns when a guard stage ended it before or instead
    of the behaviour: ``{"status": <Status or EventKind>, "detail": ...}``.

    A plain dict to compare and serialise; its type tells the task apart from
    a behaviour's own result that happens to look the same.
    """


class Outcome(Base):
    __tablename__ = "outcomes"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    agent: Mapped[str] = mapped_column(String(200))
    entity_key: Mapped[str] = mapped_column(String(500))
    idempotency_key: Mapped[str] = mapped_column(String(500), unique=True)
    status: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    fencing_token: Mapped[int | None] = mapped_column(BigInteger)
    task_id: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: When the claiming delivery's message was published (its queue wait
    #: is ``started_at - queued_at``); None when the message did not say.
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[Any | None] = mapped_column(JSON)
    #: The validated payload and the queue it came from: what the reaper and
    #: ``fleetworks replay`` need to publish the task again.
    payload: Mapped[Any | None] = mapped_column(JSON)
    queue: Mapped[str | None] = mapped_column(String(200))
    #: When the reaper last republished this key (None: never).
    reaped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_outcomes_agent_status", "agent", "status"),
        Index("ix_outcomes_status_started", "status", "started_at"),
        Index("ix_outcomes_task_id", "task_id"),
    )


class GuardEvent(Base):
    __tablename__ = "guard_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))
    agent: Mapped[str] = mapped_column(String(200))
    idempotency_key: Mapped[str] = mapped_column(String(500))
    task_id: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    detail: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_guard_events_kind_agent", "kind", "agent"),
        Index("ix_guard_events_task_id", "task_id"),
    )


class ProbeEffect(Base):
    __tablename__ = "probe_effects"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    effect_key: Mapped[str] = mapped_column(String(500), unique=True)
    fencing_token: Mapped[int] = mapped_column(BigInteger)
    worker: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ProbeEffectLog(Base):
    """A probe effect with no UNIQUE key: doubles are counted, not prevented."""

    __tablename__ = "probe_effect_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    effect_key: Mapped[str] = mapped_column(String(500), index=True)
    fencing_token: Mapped[int] = mapped_column(BigInteger)
    worker: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StoredEvent(Base):
    """One event (:mod:`fleetworks.events`): immutable once stored.

    ``position`` orders events as they were stored; ``relayed_at`` is set
    when the relay has sent it to its subscribers (NULL: not yet).
    """

    __tablename__ = "events"

    position: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True
    )
    event_id: Mapped[str] = mapped_column(String(200), unique=True)
    topic: Mapped[str] = mapped_column(String(200))
    key: Mapped[str | None] = mapped_column(String(500))
    data: Mapped[Any] = mapped_column(JSON)
    #: Who emitted it: an agent and the idempotency key of its run, or
    #: ``source_agent`` NULL for application code.
    source_agent: Mapped[str | None] = mapped_column(String(200))
    source_key: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    relayed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_events_relayed_position", "relayed_at", "position"),
        Index("ix_events_topic_key", "topic", "key"),
    )


class StoredWait(Base):
    """A run that ended waiting for an event (:meth:`RunContext.wait_for
    <fleetworks.context.RunContext.wait_for>`): resolved once, by a matching
    event or by its deadline, whichever comes first."""

    __tablename__ = "waits"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    agent: Mapped[str] = mapped_column(String(200))
    #: The key of the run that waited, and of the first run of its chain.
    key: Mapped[str] = mapped_column(String(500))
    root_key: Mapped[str] = mapped_column(String(500))
    payload: Mapped[Any] = mapped_column(JSON)
    queue: Mapped[str | None] = mapped_column(String(200))
    topic: Mapped[str] = mapped_column(String(200))
    #: Fields the event's data must equal (top level).
    match: Mapped[Any] = mapped_column(JSON)
    deadline: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: ``waiting``, then ``resolved`` (by ``event_id``) or ``timed_out``.
    state: Mapped[str] = mapped_column(String(20))
    event_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_waits_state_topic", "state", "topic"),
        Index("ix_waits_state_deadline", "state", "deadline"),
    )


class LeaderTerm(Base):
    """The highest leader term a resource accepted per group
    (:class:`fleetworks.leadership.TermFence`): an action carrying a lower one
    is refused, and the next election's term is seeded above it."""

    __tablename__ = "leader_terms"

    group: Mapped[str] = mapped_column(String(200), primary_key=True)
    highest_term: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


#: Core ``Table`` handles, typed, for statements on hot paths.
OUTCOMES = cast(Table, Outcome.__table__)
GUARD_EVENTS = cast(Table, GuardEvent.__table__)
PROBE_EFFECTS = cast(Table, ProbeEffect.__table__)
PROBE_EFFECT_LOG = cast(Table, ProbeEffectLog.__table__)
EVENTS = cast(Table, StoredEvent.__table__)
WAITS = cast(Table, StoredWait.__table__)
LEADER_TERMS = cast(Table, LeaderTerm.__table__)


class AgentState(Base):
    """The current state of one entity as one agent sees it: the latest version.

    ``fencing_token`` is the highest token that wrote it; a write carrying a
    lower one is refused.
    """

    __tablename__ = "agent_state"

    agent: Mapped[str] = mapped_column(String(200), primary_key=True)
    entity_key: Mapped[str] = mapped_column(String(500), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    fencing_token: Mapped[int] = mapped_column(BigInteger)
    writer: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AgentStateHistory(Base):
    """Every version ever written of an ``agent_state`` row, immutable."""

    __tablename__ = "agent_state_history"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    agent: Mapped[str] = mapped_column(String(200))
    entity_key: Mapped[str] = mapped_column(String(500))
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    fencing_token: Mapped[int] = mapped_column(BigInteger)
    writer: Mapped[str | None] = mapped_column(String(200))
    written_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ux_agent_state_history_version", "agent", "entity_key", "version", unique=True),
    )


AGENT_STATE = cast(Table, AgentState.__table__)
AGENT_STATE_HISTORY = cast(Table, AgentStateHistory.__table__)
