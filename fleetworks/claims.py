"""The claim ledger: one ``outcomes`` row per idempotency key, a state machine.

::

    (none) --claim--> claimed --finish--> succeeded | failed | rejected
                      claimed --claim (higher fencing token)--> claimed
                      failed  --claim (retry)--> claimed

A claim is a single ``INSERT .. ON CONFLICT DO UPDATE .. WHERE .. RETURNING``
statement, so deciding "first run", "retry" or "already done" costs one round
trip and is atomic on SQLite and PostgreSQL alike. The update only happens
while the row is ``claimed`` or ``failed`` and the stored fencing token is
lower than the new one: a stale holder can neither re-claim nor finish a key.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, CursorResult, Dialect, bindparam, insert, select, update

from fleetworks import constants as c
from fleetworks.db import upsert, upsert_for
from fleetworks.message import encodable
from fleetworks.models import GUARD_EVENTS, OUTCOMES, TERMINAL, EventKind, Status

_outcomes = OUTCOMES
_events = GUARD_EVENTS


class ClaimVerdict(StrEnum):
    RUN = "run"
    DUPLICATE = "duplicate"
    STALE = "stale"


@dataclass(frozen=True, slots=True)
class Claim:
    verdict: ClaimVerdict
    attempts: int = 0
    #: For STALE and DUPLICATE: the fencing token already stored for the key.
    stored_token: int | None = None
    #: For DUPLICATE: the terminal status found.
    status: str | None = None


class StaleWriteError(RuntimeError):
    """A write carried a fencing token older than the one on record."""


def now() -> datetime:
    return datetime.now(UTC)


_CLAIM_COLUMNS = (
    "agent",
    "entity_key",
    "idempotency_key",
    "fencing_token",
    "task_id",
    "worker",
    "queue",
    "queued_at",
)


@lru_cache(maxsize=4)
def _claim_statement(dialect: str) -> Any:
    """The claim upsert for ``dialect``, built once: bind parameters only, so
    its compiled form is cached and a claim costs no statement building."""
    return _claim_upsert(dialect).returning(_outcomes.c.attempts)


@lru_cache(maxsize=256)
def _claim_many_statement(dialect: str, rows: int) -> Any:
    """The claim upsert of ``rows`` rows as one multi-row ``VALUES``, returning
    the key too; its parameters are ``<column>_<row>``. Built and compiled once
    per row count (SQLAlchemy does not send an upsert with RETURNING as one
    statement when executed with many parameter sets)."""
    values = [
        {name: bindparam(f"{name}_{i}") for name in _CLAIM_COLUMNS}
        | {
            "status": Status.CLAIMED,
            "attempts": 1,
            "started_at": bindparam(f"started_at_{i}"),
            "payload": bindparam(f"payload_{i}", type_=_outcomes.c.payload.type),
        }
        for i in range(rows)
    ]
    return _claim_upsert(dialect, upsert_for(dialect, _outcomes).values(values)).returning(
        _outcomes.c.idempotency_key, _outcomes.c.attempts
    )


#: The columns whose values are converted before the driver gets them, as
#: SQLAlchemy converts them (JSON to text; on SQLite, times to its text form).
_CONVERTED = ("payload", "result", "started_at", "finished_at", "queued_at")


@dataclass(frozen=True, slots=True)
class Compiled:
    """A statement compiled once for a dialect and sent as the driver's SQL.

    SQLAlchemy's execution path (its compiled-cache lookup, parameter
    processing, result set-up) costs more than a short upsert on SQLite
    itself, and a multi-row ``VALUES`` is compiled anew at every execution.
    The values are converted here as SQLAlchemy would convert them, so the
    rows are the same either way; the statement events still fire."""

    sql: str
    #: The parameter order of a positional driver; None for a named one.
    order: tuple[str, ...] | None
    constants: dict[str, Any]
    #: Parameter name -> the conversion its column's type makes on the dialect.
    converters: dict[str, Callable[[Any], Any]]

    def driver_params(self, params: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        """``params`` with the constants, converted, in the driver's order."""
        values = self.constants | params
        for name, convert in self.converters.items():
            values[name] = convert(values[name])
        if self.order is not None:
            return tuple(values[name] for name in self.order)
        return values

    def send(self, conn: Connection, params: dict[str, Any]) -> CursorResult[*tuple[Any, ...]]:
        return conn.exec_driver_sql(self.sql, self.driver_params(params))


def _compile(statement: Any, dialect: Dialect, columns: dict[str, str]) -> Compiled:
    """``statement`` compiled for ``dialect``; ``columns`` maps each parameter
    whose value needs converting to the ``outcomes`` column it writes."""
    compiled = statement.compile(dialect=dialect)
    constants = {
        name: _plain(bind.effective_value)
        for name, bind in compiled.binds.items()
        if not bind.required
    }
    converters: dict[str, Callable[[Any], Any]] = {}
    for param, column in columns.items():
        convert = _outcomes.c[column].type.dialect_impl(dialect).bind_processor(dialect)
        if convert is not None:
            converters[param] = convert
    order = tuple(compiled.positiontup) if compiled.positiontup is not None else None
    return Compiled(str(compiled), order, constants, converters)


@lru_cache(maxsize=256)
def _compiled_claim_many(dialect: Dialect, rows: int) -> Compiled:
    """The many-row claim compiled once per row count for ``dialect``."""
    columns = {
        f"{name}_{i}": name for name in ("payload", "started_at", "queued_at") for i in range(rows)
    }
    return _compile(_claim_many_statement(dialect.name, rows), dialect, columns)


@lru_cache(maxsize=8)
def _compiled_claim(dialect: Dialect) -> Compiled:
    columns = {name: name for name in ("payload", "started_at", "queued_at")}
    return _compile(_claim_statement(dialect.name), dialect, columns)


@lru_cache(maxsize=8)
def compiled_settle(dialect: Dialect) -> Compiled:
    """The outcome upsert of a run that claimed nothing first (:func:`settle`)."""
    return _compile(settle_statement(dialect.name), dialect, {name: name for name in _CONVERTED})


def _plain(value: Any) -> Any:
    """A constant as the driver takes it (a status is text)."""
    return str(value) if isinstance(value, StrEnum) else value


def _claim_upsert(dialect: str, stmt: Any = None) -> Any:
    if stmt is None:
        stmt = upsert_for(dialect, _outcomes).values(
            {name: bindparam(name) for name in _CLAIM_COLUMNS}
            | {
                "status": Status.CLAIMED,
                "attempts": bindparam("attempts"),
                "started_at": bindparam("started_at"),
                "payload": bindparam("payload", type_=_outcomes.c.payload.type),
            }
        )
    return stmt.on_conflict_do_update(
        index_elements=[_outcomes.c.idempotency_key],
        set_={
            "status": Status.CLAIMED,
            "attempts": _outcomes.c.attempts + 1,
            "fencing_token": stmt.excluded.fencing_token,
            "task_id": stmt.excluded.task_id,
            "worker": stmt.excluded.worker,
            "started_at": stmt.excluded.started_at,
            "payload": stmt.excluded.payload,
            "queue": stmt.excluded.queue,
            "queued_at": stmt.excluded.queued_at,
            "finished_at": None,
            "result": None,
            "reaped_at": None,
            # ``error`` is kept: while a retry runs, it is the last error seen.
        },
        # Two comparisons, not IN: an IN list is expanded per execution,
        # which a many-row claim (one statement) cannot take.
        where=((_outcomes.c.status == Status.CLAIMED) | (_outcomes.c.status == Status.FAILED))
        & (_outcomes.c.fencing_token < stmt.excluded.fencing_token),
    )


@lru_cache(maxsize=4)
def settle_statement(dialect: str) -> Any:
    """The one-statement outcome of a run that claimed nothing beforehand:
    insert the key's final row, or move a ``claimed``/``failed`` row held with
    a lower fencing token to it; a row already final, or held with a token as
    high, is left as it is (no row returned)."""
    stmt = upsert_for(dialect, _outcomes).values(
        {name: bindparam(name) for name in _CLAIM_COLUMNS}
        | {
            "status": bindparam("status"),
            "attempts": 1,
            "started_at": bindparam("started_at"),
            "finished_at": bindparam("finished_at"),
            "payload": bindparam("payload", type_=_outcomes.c.payload.type),
            "result": bindparam("result", type_=_outcomes.c.result.type),
            "error": bindparam("error"),
        }
    )
    return stmt.on_conflict_do_update(
        index_elements=[_outcomes.c.idempotency_key],
        set_={
            "status": stmt.excluded.status,
            "attempts": _outcomes.c.attempts + 1,
            "fencing_token": stmt.excluded.fencing_token,
            "task_id": stmt.excluded.task_id,
            "worker": stmt.excluded.worker,
            "started_at": stmt.excluded.started_at,
            "finished_at": stmt.excluded.finished_at,
            "payload": stmt.excluded.payload,
            "queue": stmt.excluded.queue,
            "queued_at": stmt.excluded.queued_at,
            "result": stmt.excluded.result,
            "error": stmt.excluded.error,
            "reaped_at": None,
        },
        where=((_outcomes.c.status == Status.CLAIMED) | (_outcomes.c.status == Status.FAILED))
        & (_outcomes.c.fencing_token < stmt.excluded.fencing_token),
    ).returning(_outcomes.c.attempts)


_FINISH = (
    update(_outcomes)
    .where(
        (_outcomes.c.idempotency_key == bindparam("key"))
        & (_outcomes.c.fencing_token == bindparam("token"))
        & (_outcomes.c.status == Status.CLAIMED)
    )
    .values(
        status=bindparam("status"),
        finished_at=bindparam("finished_at"),
        result=bindparam("result", type_=_outcomes.c.result.type),
        error=bindparam("error"),
    )
)

_FOUND = select(_outcomes.c.status, _outcomes.c.fencing_token).where(
    _outcomes.c.idempotency_key == bindparam("key")
)


def claim(
    conn: Connection,
    *,
    agent: str,
    entity_key: str,
    idempotency_key: str,
    fencing_token: int,
    task_id: str | None,
    worker: str | None,
    payload: Any = None,
    queue: str | None = None,
    queued_at: datetime | None = None,
    deliveries: int = 1,
) -> Claim:
    """Claim ``idempotency_key`` for a run holding ``fencing_token``; ``queued_at``
    is when its message was published (the queue wait metric). A first claim
    counts ``deliveries`` (those before it that claimed nothing, and died);
    a later one adds one to the count stored."""
    params = _run_params(
        agent, entity_key, idempotency_key, fencing_token, task_id, worker, queue, queued_at
    )
    params |= {"attempts": max(1, deliveries), "payload": payload, "started_at": now()}
    return _upsert(conn, _compiled_claim(conn.dialect), params)


def _run_params(*values: Any) -> dict[str, Any]:
    """The columns of one run's row, in :data:`_CLAIM_COLUMNS` order."""
    params = dict(zip(_CLAIM_COLUMNS, values, strict=True))
    params["task_id"] = stored_task_id(params["task_id"])
    return params


def _upsert(conn: Connection, statement: Compiled, params: dict[str, Any]) -> Claim:
    """Run a fenced upsert of one key: ``RUN`` if it wrote the row, else what
    the row it left says (``DUPLICATE`` if final, ``STALE`` if held with a
    token as high)."""
    row = statement.send(conn, params).first()
    if row is not None:
        return Claim(ClaimVerdict.RUN, attempts=int(row[0]))
    found = conn.execute(_FOUND, {"key": params["idempotency_key"]}).one()
    if found.status in TERMINAL:
        return Claim(ClaimVerdict.DUPLICATE, status=found.status, stored_token=found.fencing_token)
    return Claim(ClaimVerdict.STALE, stored_token=found.fencing_token)


def settle(
    conn: Connection,
    *,
    agent: str,
    entity_key: str,
    idempotency_key: str,
    fencing_token: int,
    task_id: str | None,
    worker: str | None,
    started_at: datetime,
    status: Status = Status.SUCCEEDED,
    payload: Any = None,
    result: Any = None,
    error: str | None = None,
    queue: str | None = None,
    queued_at: datetime | None = None,
) -> Claim:
    """Record the outcome of a run that did not :func:`claim` first, in one
    statement, fenced as a claim is: ``RUN`` (with the key's deliveries so far)
    if it was written; ``DUPLICATE`` if the key was already final, ``STALE`` if
    its row is held with a token as high as this one. The caller's transaction
    (with the run's effects) commits only on ``RUN``."""
    params = _run_params(
        agent, entity_key, idempotency_key, fencing_token, task_id, worker, queue, queued_at
    )
    params |= {
        "status": str(status), "started_at": started_at, "finished_at": now(),
        "payload": payload, "result": result, "error": _clip(error),
    }  # fmt: skip
    return _upsert(conn, compiled_settle(conn.dialect), params)


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One key of a batch claim (the arguments of :func:`claim`)."""

    agent: str
    entity_key: str
    idempotency_key: str
    fencing_token: int
    task_id: str | None
    worker: str | None
    payload: Any = None
    queue: str | None = None
    queued_at: datetime | None = None


def claim_many(conn: Connection, wanted: list[ClaimRequest]) -> dict[str, Claim]:
    """:func:`claim` for many distinct keys: one upsert of all of them (one
    statement), then one read of the keys it did not take. By key."""
    if not wanted:
        return {}
    at = now()
    params: dict[str, Any] = {}
    for i, w in enumerate(wanted):
        params |= {
            f"agent_{i}": w.agent, f"entity_key_{i}": w.entity_key,
            f"idempotency_key_{i}": w.idempotency_key, f"fencing_token_{i}": w.fencing_token,
            f"task_id_{i}": stored_task_id(w.task_id), f"worker_{i}": w.worker,
            f"queue_{i}": w.queue, f"payload_{i}": w.payload, f"queued_at_{i}": w.queued_at,
            f"started_at_{i}": at,
        }  # fmt: skip
    got = {
        str(row[0]): Claim(ClaimVerdict.RUN, attempts=int(row[1]))
        for row in _compiled_claim_many(conn.dialect, len(wanted)).send(conn, params)
    }
    missing = [w.idempotency_key for w in wanted if w.idempotency_key not in got]
    if missing:
        found = conn.execute(
            select(_outcomes.c.idempotency_key, _outcomes.c.status, _outcomes.c.fencing_token)
            .where(_outcomes.c.idempotency_key.in_(missing))
        )  # fmt: skip
        for key, status, token in found:
            got[str(key)] = (
                Claim(ClaimVerdict.DUPLICATE, status=status) if status in TERMINAL
                else Claim(ClaimVerdict.STALE, stored_token=token)
            )  # fmt: skip
    return got


def terminal_statuses(conn: Connection, keys: list[str]) -> dict[str, str]:
    """The keys of ``keys`` that are done, with their terminal status."""
    if not keys:
        return {}
    rows = conn.execute(
        select(_outcomes.c.idempotency_key, _outcomes.c.status)
        .where(_outcomes.c.idempotency_key.in_(keys))
    )  # fmt: skip
    return {str(k): str(s) for k, s in rows if s in TERMINAL}


def terminal_status(conn: Connection, idempotency_key: str) -> str | None:
    """``succeeded``, ``rejected`` or ``dead`` if the key is done, else None."""
    status = conn.execute(
        select(_outcomes.c.status).where(_outcomes.c.idempotency_key == idempotency_key)
    ).scalar()
    return status if status in TERMINAL else None


def finish(
    conn: Connection,
    *,
    idempotency_key: str,
    fencing_token: int,
    status: Status,
    result: Any = None,
    error: str | None = None,
) -> None:
    """Move a claimed key to ``status``; refuse if the token is no longer current."""
    done = conn.execute(
        _FINISH,
        {
            "key": idempotency_key,
            "token": fencing_token,
            "status": status,
            "finished_at": now(),
            "result": result,
            "error": _clip(error),
        },
    )
    if done.rowcount != 1:
        raise StaleWriteError(
            f"outcome for {idempotency_key!r} refused: fencing token {fencing_token} "
            "is no longer the current claim"
        )


def finish_many(
    conn: Connection, done: list[tuple[str, int, Any]], status: Status = Status.SUCCEEDED
) -> set[str]:
    """:func:`finish` for many ``(key, fencing token, result)`` in one executemany;
    returns the keys refused (their token no longer the current claim)."""
    if not done:
        return set()
    at = now()
    params = [
        {"key": key, "token": token, "status": status, "finished_at": at, "result": result,
         "error": None}
        for key, token, result in done
    ]  # fmt: skip
    applied = conn.execute(_FINISH, params).rowcount
    if applied == len(done):
        return set()
    # Some were refused: the rows that now hold this status and token are ours.
    tokens = {key: token for key, token, _ in done}
    rows = conn.execute(
        select(_outcomes.c.idempotency_key, _outcomes.c.fencing_token, _outcomes.c.status)
        .where(_outcomes.c.idempotency_key.in_(list(tokens)))
    )  # fmt: skip
    ours = {str(k) for k, t, s in rows if s == status and t == tokens.get(str(k))}
    return set(tokens) - ours


def reapable(
    conn: Connection,
    *,
    claimed_before: datetime,
    failed_before: datetime,
    reaped_before: datetime,
    limit: int,
) -> list[Any]:
    """Claims whose holder may be gone: ``claimed`` since before ``claimed_before``,
    or ``failed`` with a retry overdue since ``failed_before``, and not republished
    since ``reaped_before``."""
    stale = ((_outcomes.c.status == Status.CLAIMED) & (_outcomes.c.started_at < claimed_before)) | (
        (_outcomes.c.status == Status.FAILED) & (_outcomes.c.finished_at < failed_before)
    )
    fresh = _outcomes.c.reaped_at.is_(None) | (_outcomes.c.reaped_at < reaped_before)
    return list(
        conn.execute(
            select(OUTCOMES)
            .where(stale & fresh & _outcomes.c.payload.is_not(None))
            .order_by(_outcomes.c.started_at)
            .limit(limit)
        )
    )


def mark_reaped(conn: Connection, row_id: int) -> None:
    conn.execute(update(_outcomes).where(_outcomes.c.id == row_id).values(reaped_at=now()))


def revive(conn: Connection, row_id: int) -> Any:
    """Turn a ``dead`` row back into ``failed`` with no attempts, for a replay."""
    row = conn.execute(select(OUTCOMES).where(_outcomes.c.id == row_id)).first()
    if row is None:
        raise LookupError(f"no outcome with id {row_id}")
    if row.status != Status.DEAD:
        raise ValueError(f"outcome {row_id} is {row.status}, not dead: only dead outcomes replay")
    conn.execute(
        update(_outcomes)
        .where(_outcomes.c.id == row_id)
        .values(status=Status.FAILED, attempts=0, reaped_at=None)
    )
    return row


def reject(
    conn: Connection,
    *,
    agent: str,
    entity_key: str,
    task_id: str,
    worker: str | None,
    error: str,
    payload: Any,
) -> None:
    """Record a payload that will never run. Keyed by task id: redelivery adds no row."""
    at = now()
    stmt = upsert(conn, _outcomes).values(
        agent=agent,
        entity_key=storable(entity_key, 500),
        idempotency_key=f"rejected:{storable(task_id, 400)}",
        status=Status.REJECTED,
        attempts=1,
        task_id=stored_task_id(task_id),
        worker=worker,
        started_at=at,
        finished_at=at,
        error=_clip(error),
        result={"payload": _jsonable_preview(payload)},
    )
    conn.execute(stmt.on_conflict_do_nothing(index_elements=[_outcomes.c.idempotency_key]))


def record_event(
    conn: Connection,
    kind: EventKind,
    *,
    agent: str,
    idempotency_key: str,
    task_id: str | None,
    worker: str | None,
    detail: str | None = None,
) -> None:
    conn.execute(
        insert(_events).values(
            kind=kind,
            agent=agent,
            idempotency_key=idempotency_key,
            task_id=stored_task_id(task_id),
            worker=worker,
            at=now(),
            detail=_clip(detail),
        )
    )


def storable(text: str, limit: int) -> str:
    """``text`` as any database column takes it: NUL and unpaired surrogates
    escaped (PostgreSQL refuses the one, UTF-8 the other), at most ``limit``
    characters."""
    if "\x00" in text or not encodable(text):
        text = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return text if len(text) <= limit else text[: limit - 15] + "... [truncated]"


def stored_task_id(task_id: str | None) -> str | None:
    """A message's task id as the ``task_id`` columns hold it (see :func:`storable`)."""
    return None if task_id is None else storable(task_id, c.MAX_TASK_ID_CHARS)


def _clip(text: str | None) -> str | None:
    return None if text is None else storable(text, c.MAX_ERROR_CHARS)


_PREVIEW = reprlib.Repr()
_PREVIEW.maxlevel, _PREVIEW.maxdict, _PREVIEW.maxlist = 4, 20, 20
_PREVIEW.maxstring = _PREVIEW.maxother = 200


def _jsonable_preview(payload: Any) -> str:
    """A bounded text copy of a rejected payload: kept for debugging, never re-parsed."""
    return storable(_PREVIEW.repr(payload), 1000)
