"""What one guarded run is: the agent's spec, the run's context, and the two
control signals hooks use (:class:`Veto`, :class:`RetryRequested`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from fleetworks import constants as c
from fleetworks.db import get_engine
from fleetworks.locks import Lease, lock_ttl_s

REJECTED = "rejected"


@dataclass(frozen=True)
class AgentSpec:
    """How one agent behaviour runs under the guard."""

    name: str
    payload: type[Any]
    #: Idempotency key of a payload: the effect happens once per key.
    key: Callable[[Any], str]
    #: Entity the lock is taken on; defaults to the idempotency key.
    entity: Callable[[Any], str] | None = None
    #: On lock contention: ``retry`` later with back-off, or ``skip`` and record.
    on_contention: str = "retry"
    time_limit_s: float = c.DEFAULT_TIME_LIMIT_S
    #: Retries of a behaviour that raised, with exponential back-off and jitter.
    max_retries: int = c.DEFAULT_MAX_RETRIES
    #: Claims of one key (deliveries that reached the behaviour) before it is
    #: declared ``dead``: a message that kills its worker every time stops here.
    max_deliveries: int = c.DEFAULT_MAX_DELIVERIES

    def __post_init__(self) -> None:
        if self.on_contention not in ("retry", "skip"):
            raise ValueError(f"on_contention must be 'retry' or 'skip', not {self.on_contention!r}")
        if self.max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")

    @property
    def lock_ttl_s(self) -> float:
        return lock_ttl_s(self.time_limit_s)


class Veto(Exception):
    """Raised by a hook to stop a run. ``retry_after`` asks for a retry."""

    def __init__(self, kind: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.retry_after = retry_after


class RetryRequested(Exception):
    """The guard wants the task re-queued after ``countdown`` seconds."""

    def __init__(self, countdown: float, reason: str, exc: BaseException | None = None) -> None:
        super().__init__(reason)
        self.countdown = countdown
        self.exc = exc


def backoff(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential back-off with full jitter."""
    return random.uniform(0, min(cap_s, base_s * (2 ** max(0, attempt))))


@dataclass
class RunContext:
    """Everything one run knows; handed to the behaviour binding as ``ctx``."""

    spec: AgentSpec
    task_id: str
    worker: str
    raw_payload: Any
    explicit_key: str | None
    retries: int
    database_url: str
    #: Set when the task's arguments do not have the agent-task shape.
    shape_error: str | None = None
    #: The queue the message came from (the reaper republishes there).
    queue: str | None = None
    #: The broker's tag of this delivery: the owner prefix of the lease.
    delivery_tag: str = ""
    payload: Any = None
    idempotency_key: str = ""
    entity_key: str = ""
    lease: Lease | None = None
    attempts: int = 0
    _conn: Connection | None = field(default=None, repr=False)

    @property
    def fencing_token(self) -> int:
        if self.lease is None:
            raise RuntimeError("no lease: fencing token asked for before the lock was taken")
        return self.lease.fencing_token

    def check_lease(self) -> None:
        """Raise ``LeaseLostError`` if this run's lease is known to be lost.

        Call it before an effect outside the results database; effects through
        :attr:`db` are checked for you and fenced at commit.
        """
        if self.lease is not None:
            self.lease.check()

    @property
    def db(self) -> Connection:
        """The effect transaction, begun on first use, committed with the outcome.

        Open it as late as possible (write effects last): on SQLite it holds
        the database's write lock until the run ends.
        """
        if self._conn is None:
            self.check_lease()
            self._conn = get_engine(self.database_url).connect()
            self._conn.begin()
        return self._conn

    def close_db(self, *, commit: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if commit:
                conn.commit()
            else:
                conn.rollback()
        finally:
            conn.close()
