"""Agent state store: per-entity state kept outside the worker, versioned.

Consistency model. The results database is the record: a worker keeps no
state between runs, it reads the ``agent_state`` row of its entity and writes
it back with a compare-and-set. A write names the version it read and the
fencing token of the lock it holds; it succeeds only if the stored version is
still that version and the stored token is not higher than its own, and then
stores version + 1 and, in the same transaction, an immutable
``agent_state_history`` row (state, writer, fencing token, time) with that
version. So writes to one entity are totally ordered by version, the history
of an entity is its versions 1..n without gaps, the current row always equals
the latest history row, and a holder whose lease ran out cannot overwrite
what a newer holder wrote even if it read the same version. A failed
compare-and-set raises :class:`StateConflictError` (someone wrote first: read
again and retry, which :func:`update` does, locking the row to read once an
entity proves hot so that no writer starves) or
:class:`~fleetworks.claims.StaleWriteError` (a newer fencing token wrote: do
not retry). Reads are plain committed reads; a value read outside the writing
transaction may be old by the time it is used, and the version catches that.
On SQLite every transaction begins with ``BEGIN IMMEDIATE``, so writers
serialize and a read-modify-write in one transaction never conflicts; on
PostgreSQL (read committed) two writers can read the same version, and the
second ``UPDATE .. WHERE version = expected`` waits for the first, re-checks
the committed row and changes nothing: a conflict. Concurrent first writes
meet on the primary key. There is no guarantee across entities beyond what
the caller's own transaction gives.

No Redis cache in front: a read is one primary-key lookup in the same
transaction that writes, and the entity's lease already serializes its
writers, so a cache would save one indexed select per run while adding a
second copy to keep consistent across a Redis restart. It does not pay.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select
from sqlalchemy import update as sql_update

from fleetworks.claims import StaleWriteError, now
from fleetworks.db import transaction, upsert_for
from fleetworks.models import AGENT_STATE, AGENT_STATE_HISTORY

_state = AGENT_STATE
_history = AGENT_STATE_HISTORY

#: Seconds: first back-off of :func:`update` after a conflict. Doubles per
#: attempt, with full jitter, so writers that met once spread out.
_BACKOFF_BASE_S = 0.01

#: Seconds: ceiling of that back-off. A conflict means another write just
#: committed, so the entity is free again within one short transaction.
_BACKOFF_MAX_S = 0.2

#: Attempts :func:`update` makes without a row lock. Past them the entity is
#: hot and this writer keeps losing to others writing back to back: it reads
#: with ``for_update`` and waits its turn. Locking at the first conflict
#: instead makes the lock holders the cause of most conflicts.
_OPTIMISTIC_ATTEMPTS = 3


class StateConflictError(RuntimeError):
    """The stored version is not the one the write expected: someone wrote first."""

    def __init__(self, agent: str, entity: str, expected: int, found: int) -> None:
        super().__init__(
            f"state of {entity!r} for agent {agent!r} changed: "
            f"expected version {expected}, found version {found}"
        )
        self.agent, self.entity, self.expected, self.found = agent, entity, expected, found


@dataclass(frozen=True, slots=True)
class Versioned:
    """A state and the version it is; version 0 (and ``{}``) when never written."""

    state: dict[str, Any]
    version: int
    #: The highest fencing token that wrote it; None when never written.
    fencing_token: int | None


@dataclass(frozen=True, slots=True)
class Revision:
    """One history row: a version as it was written."""

    version: int
    state: dict[str, Any]
    fencing_token: int
    writer: str | None
    written_at: datetime


# The statements are built once, with bound parameters, and executed with each
# call's values: building a Core statement per call (and its cache key) cost
# more than running it on a hot path such as a batch of reprices.
_AT = _state.c.agent == bindparam("p_agent")
_KEY = _AT & (_state.c.entity_key == bindparam("p_entity"))
_READ = select(_state.c.state, _state.c.version, _state.c.fencing_token).where(_KEY)
_READ_LOCKED = _READ.with_for_update()
_NEW_VALUES = {
    "version": bindparam("p_version"),
    "state": bindparam("p_state", type_=_state.c.state.type),
    "fencing_token": bindparam("p_token"),
    "writer": bindparam("p_writer"),
    "updated_at": bindparam("p_at", type_=_state.c.updated_at.type),
}
_CAS = (
    sql_update(_state)
    .where(_KEY & (_state.c.version == bindparam("p_expected")))
    .where(_state.c.fencing_token <= bindparam("p_token"))
    .values(_NEW_VALUES)
)
_FIRST: dict[str, Any] = {}
_HISTORY = insert(_history).values(
    agent=bindparam("p_agent"),
    entity_key=bindparam("p_entity"),
    version=bindparam("p_version"),
    state=bindparam("p_state", type_=_history.c.state.type),
    fencing_token=bindparam("p_token"),
    writer=bindparam("p_writer"),
    written_at=bindparam("p_at", type_=_history.c.written_at.type),
)


def _first_write(dialect: str) -> Any:
    """INSERT .. ON CONFLICT DO NOTHING RETURNING version, for ``dialect``."""
    stmt = _FIRST.get(dialect)
    if stmt is None:
        new = upsert_for(dialect, _state).values(
            agent=bindparam("p_agent"), entity_key=bindparam("p_entity"), **_NEW_VALUES
        )
        keys = [_state.c.agent, _state.c.entity_key]
        stmt = _FIRST[dialect] = new.on_conflict_do_nothing(index_elements=keys).returning(
            _state.c.version
        )
    return stmt


def read(conn: Connection, agent: str, entity: str, *, for_update: bool = False) -> Versioned:
    """The current state of ``entity`` for ``agent``; ``for_update`` also locks
    its row until the transaction ends (PostgreSQL; SQLite's writer already
    holds the database)."""
    stmt = _READ_LOCKED if for_update else _READ
    row = conn.execute(stmt, {"p_agent": agent, "p_entity": entity}).first()
    if row is None:
        return Versioned({}, 0, None)
    return Versioned(dict(row.state), int(row.version), int(row.fencing_token))


def write(
    conn: Connection,
    agent: str,
    entity: str,
    *,
    state: dict[str, Any],
    expected_version: int,
    fencing_token: int,
    writer: str | None,
) -> Versioned:
    """Store ``state`` as version ``expected_version + 1`` if the stored version
    is ``expected_version`` (0: never written) and the stored fencing token is
    not higher than ``fencing_token``; record it in the history.

    Raises :class:`StateConflictError` or :class:`StaleWriteError`, having
    changed nothing; the caller's transaction stays usable.
    """
    if expected_version < 0:
        raise ValueError(f"expected_version must be >= 0, not {expected_version}")
    version = expected_version + 1
    values = {
        "p_agent": agent, "p_entity": entity, "p_version": version, "p_state": state,
        "p_token": fencing_token, "p_writer": writer, "p_at": now(),
    }  # fmt: skip
    if expected_version == 0:
        # ON CONFLICT DO NOTHING, not a caught unique violation: on PostgreSQL
        # an error would abort the caller's whole transaction. RETURNING, not
        # rowcount, tells whether it inserted: the driver may report -1.
        done = len(conn.execute(_first_write(conn.dialect.name), values).all())
    else:
        done = conn.execute(_CAS, values | {"p_expected": expected_version}).rowcount
    if done != 1:
        _refuse(conn, agent, entity, expected_version, fencing_token)
    conn.execute(_HISTORY, values)
    return Versioned(dict(state), version, fencing_token)


def _refuse(conn: Connection, agent: str, entity: str, expected: int, token: int) -> None:
    """Raise why a compare-and-set changed nothing: a newer token, else a newer version."""
    found = read(conn, agent, entity)
    if found.fencing_token is not None and found.fencing_token > token:
        raise StaleWriteError(
            f"state of {entity!r} for agent {agent!r} refused: fencing token {token} "
            f"is older than {found.fencing_token} (version {found.version})"
        )
    raise StateConflictError(agent, entity, expected, found.version)


def update_in(
    conn: Connection,
    agent: str,
    entity: str,
    fn: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    fencing_token: int,
    writer: str | None,
    attempts: int = 10,
) -> tuple[Versioned, int]:
    """Read, apply ``fn``, write, inside the caller's transaction ``conn``;
    again on a conflict. Returns the version written and the conflicts met.

    For a behaviour whose state write must commit with its other effects. A
    conflict changes nothing, so the transaction stays usable; each retry
    reads the newest committed version (read committed), the later ones with
    the row locked. No back-off: the row is read again, not raced for.
    """
    _check_attempts(attempts)
    for attempt in range(1, attempts + 1):
        try:
            written = _apply(
                conn, agent, entity, fn, fencing_token=fencing_token, writer=writer, attempt=attempt
            )
        except StateConflictError:
            if attempt == attempts:
                raise
            continue
        return written, attempt - 1
    raise AssertionError("unreachable")  # pragma: no cover


def update(
    url: str,
    agent: str,
    entity: str,
    fn: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    fencing_token: int,
    writer: str | None,
    attempts: int = 10,
) -> Versioned:
    """Read, apply ``fn`` to the state, write: one short transaction per attempt.

    Retries on :class:`StateConflictError` after a short jittered back-off and
    raises the last one after ``attempts``; :class:`StaleWriteError` is raised
    at once. The first attempts are optimistic; later ones lock the row while
    they read, so a writer cannot starve on a hot entity. ``fn`` may run
    several times, on different states: keep it pure.
    """
    _check_attempts(attempts)
    for attempt in range(1, attempts + 1):
        try:
            with transaction(url) as conn:
                return _apply(
                    conn,
                    agent,
                    entity,
                    fn,
                    fencing_token=fencing_token,
                    writer=writer,
                    attempt=attempt,
                )
        except StateConflictError:
            if attempt == attempts:
                raise
            time.sleep(random.uniform(0, min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2**attempt)))
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class Change:
    """One entity's read-modify-write in :func:`update_many_in`."""

    entity: str
    fn: Callable[[dict[str, Any]], dict[str, Any]]
    fencing_token: int


_READ_MANY = select(
    _state.c.entity_key, _state.c.state, _state.c.version, _state.c.fencing_token
).where(_AT & _state.c.entity_key.in_(bindparam("p_entities", expanding=True)))
_READ_MANY_LOCKED = _READ_MANY.with_for_update()
_INSERT = insert(_state).values(
    agent=bindparam("p_agent"), entity_key=bindparam("p_entity"), **_NEW_VALUES
)


def update_many_in(
    conn: Connection, agent: str, changes: list[Change], *, writer: str | None
) -> list[Versioned]:
    """:func:`update_in` for many entities at once (a batch behaviour's state),
    inside the caller's transaction: one read of every row, locked
    (``FOR UPDATE`` on PostgreSQL; SQLite's writer holds the database), then
    one executemany each of the updates, the first writes and the history.
    Returns the version written of each change, in order.

    Raises :class:`StaleWriteError` if a stored token is newer than its
    change's, and :class:`StateConflictError` if an entity appears twice or a
    write did not apply; the caller rolls the batch back (a savepoint) and
    writes its entities one at a time. ``fn`` runs once per change.
    """
    entities = [change.entity for change in changes]
    if len(set(entities)) < len(entities):
        twice = sorted({e for e in entities if entities.count(e) > 1})
        raise ValueError(f"update_many_in: entities given twice: {twice}")
    if not changes:
        return []
    stmt = _READ_MANY_LOCKED if conn.dialect.name != "sqlite" else _READ_MANY
    found = {
        str(row.entity_key): Versioned(dict(row.state), int(row.version), int(row.fencing_token))
        for row in conn.execute(stmt, {"p_agent": agent, "p_entities": entities})
    }
    at, written = now(), []
    updates: list[dict[str, Any]] = []
    firsts: list[dict[str, Any]] = []
    for change in changes:
        current = found.get(change.entity, Versioned({}, 0, None))
        if current.fencing_token is not None and current.fencing_token > change.fencing_token:
            raise StaleWriteError(
                f"state of {change.entity!r} for agent {agent!r} refused: fencing token "
                f"{change.fencing_token} is older than {current.fencing_token}"
            )
        state = change.fn(current.state)
        values = {
            "p_agent": agent, "p_entity": change.entity, "p_version": current.version + 1,
            "p_state": state, "p_token": change.fencing_token, "p_writer": writer, "p_at": at,
        }  # fmt: skip
        if current.version == 0:
            firsts.append(values)
        else:
            updates.append(values | {"p_expected": current.version})
        written.append(Versioned(dict(state), current.version + 1, change.fencing_token))
    if updates:
        applied = conn.execute(_CAS, updates).rowcount
        if conn.dialect.supports_sane_multi_rowcount and applied != len(updates):
            _conflicted(conn, agent, updates)
    if firsts:
        conn.execute(_INSERT, firsts)  # a concurrent first write: IntegrityError
    conn.execute(_HISTORY, updates + firsts)
    return written


def _conflicted(conn: Connection, agent: str, updates: list[dict[str, Any]]) -> None:
    """Raise the conflict of the first update of a batch that did not apply."""
    for values in updates:
        found = read(conn, agent, values["p_entity"])
        if found.version != values["p_version"] or found.fencing_token != values["p_token"]:
            raise StateConflictError(agent, values["p_entity"], values["p_expected"], found.version)
    raise AssertionError("an update of the batch did not apply, yet every row is as written")


def _apply(
    conn: Connection,
    agent: str,
    entity: str,
    fn: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    fencing_token: int,
    writer: str | None,
    attempt: int,
) -> Versioned:
    """One read-modify-write; from the attempt past the optimistic ones, the
    read locks the row."""
    current = read(conn, agent, entity, for_update=attempt > _OPTIMISTIC_ATTEMPTS)
    return write(
        conn,
        agent,
        entity,
        state=fn(current.state),
        expected_version=current.version,
        fencing_token=fencing_token,
        writer=writer,
    )


def _check_attempts(attempts: int) -> None:
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, not {attempts}")


def history(conn: Connection, agent: str, entity: str) -> list[Revision]:
    """Every version written of ``entity`` for ``agent``, oldest first."""
    key = (_history.c.agent == agent) & (_history.c.entity_key == entity)
    rows = conn.execute(select(_history).where(key).order_by(_history.c.version))
    return [
        Revision(int(r.version), dict(r.state), int(r.fencing_token), r.writer, r.written_at)
        for r in rows
    ]
