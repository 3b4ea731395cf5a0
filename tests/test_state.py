"""The agent state store: compare-and-set, fencing, history, on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from fleetworks import db, state
from fleetworks.claims import StaleWriteError
from fleetworks.models import AGENT_STATE_HISTORY
from fleetworks.state import StateConflictError, Versioned
from tests.conftest import truncate

AGENT = "counter"
ENTITY = "counter:c-1"

PROCESSES = 4
INCREMENTS = 250


def write(url: str, data: dict[str, Any], expected: int, token: int, writer: str = "w-1") -> Any:
    """Write ``data`` over version ``expected`` in its own transaction."""
    with db.transaction(url) as conn:
        return state.write(
            conn,
            AGENT,
            ENTITY,
            state=data,
            expected_version=expected,
            fencing_token=token,
            writer=writer,
        )


def read(url: str) -> Versioned:
    with db.transaction(url) as conn:
        return state.read(conn, AGENT, ENTITY)


def history(url: str) -> list[state.Revision]:
    with db.transaction(url) as conn:
        return state.history(conn, AGENT, ENTITY)


def history_rows(url: str) -> int:
    with db.transaction(url) as conn:
        return int(conn.execute(select(func.count()).select_from(AGENT_STATE_HISTORY)).scalar_one())


def plus_one(current: dict[str, Any]) -> dict[str, Any]:
    return {"count": current.get("count", 0) + 1}


def increment_many(url: str, times: int, start: Any) -> None:
    """A child process: its own engine, then ``times`` increments through ``update``."""
    db.get_engine(url)
    start.wait(60)
    writer = f"p-{os.getpid()}"
    for _ in range(times):
        state.update(url, AGENT, ENTITY, plus_one, fencing_token=1, writer=writer)
    db.dispose_all()


def test_absent_entity_reads_as_version_zero(database_url: str) -> None:
    assert read(database_url) == Versioned({}, 0, None)
    assert history(database_url) == []


def test_write_read_roundtrip_keeps_every_version(database_url: str) -> None:
    first = write(database_url, {"seen": ["a"]}, expected=0, token=3, writer="w-1")
    second = write(database_url, {"seen": ["a", "b"]}, expected=1, token=4, writer="w-2")

    assert first == Versioned({"seen": ["a"]}, 1, 3)
    assert second == Versioned({"seen": ["a", "b"]}, 2, 4)
    assert read(database_url) == second
    revisions = history(database_url)
    assert [(r.version, r.state, r.fencing_token, r.writer) for r in revisions] == [
        (1, {"seen": ["a"]}, 3, "w-1"),
        (2, {"seen": ["a", "b"]}, 4, "w-2"),
    ]
    assert revisions[0].written_at <= revisions[1].written_at


def test_stale_expected_version_is_a_clear_conflict(database_url: str) -> None:
    write(database_url, {"n": 1}, expected=0, token=1)
    write(database_url, {"n": 2}, expected=1, token=1)

    with pytest.raises(StateConflictError) as first_write:
        write(database_url, {"n": 99}, expected=0, token=1)
    with pytest.raises(StateConflictError) as stale:
        write(database_url, {"n": 99}, expected=1, token=1)
    with pytest.raises(StateConflictError):
        write(database_url, {"n": 99}, expected=5, token=1)

    assert str(first_write.value) == (
        f"state of {ENTITY!r} for agent {AGENT!r} changed: expected version 0, found version 2"
    )
    assert (stale.value.expected, stale.value.found) == (1, 2)
    assert "expected version 1, found version 2" in str(stale.value)
    assert read(database_url) == Versioned({"n": 2}, 2, 1)
    assert history_rows(database_url) == 2


def test_stale_fencing_token_is_refused_without_history(database_url: str) -> None:
    write(database_url, {"owner": "new"}, expected=0, token=5)

    with pytest.raises(StaleWriteError, match="fencing token 4 is older than 5"):
        write(database_url, {"owner": "old"}, expected=1, token=4)
    with pytest.raises(StaleWriteError):
        write(database_url, {"owner": "old"}, expected=0, token=4)

    assert read(database_url) == Versioned({"owner": "new"}, 1, 5)
    assert history_rows(database_url) == 1
    assert write(database_url, {"owner": "newer"}, expected=1, token=6).version == 2


def test_many_entities_are_written_at_once_each_as_a_single_write_would(
    database_url: str,
) -> None:
    # Given entities e-0 and e-1 written before (tokens 3), e-2 and e-3 never
    for i in range(2):
        with db.transaction(database_url) as conn:
            state.write(conn, AGENT, f"e-{i}", state={"count": 10}, expected_version=0,
                        fencing_token=3, writer="w-0")  # fmt: skip
    changes = [state.Change(f"e-{i}", plus_one, fencing_token=4) for i in range(4)]
    # When all four are updated in one call
    with db.transaction(database_url) as conn:
        written = state.update_many_in(conn, AGENT, changes, writer="w-1")
    # Then each got its next version and state, as update_in would have written
    assert written == [
        Versioned({"count": 11}, 2, 4), Versioned({"count": 11}, 2, 4),
        Versioned({"count": 1}, 1, 4), Versioned({"count": 1}, 1, 4),
    ]  # fmt: skip
    with db.transaction(database_url) as conn:
        for i, expected in enumerate(written):
            assert state.read(conn, AGENT, f"e-{i}") == expected
            revisions = state.history(conn, AGENT, f"e-{i}")
            assert [(r.version, r.fencing_token, r.writer) for r in revisions][-1] == (
                expected.version, 4, "w-1",
            )  # fmt: skip
    # and a batch with one stale token is refused whole, naming it, writing nothing
    stale = [state.Change("e-0", plus_one, 5), state.Change("e-1", plus_one, 2)]
    refused = r"'e-1'.*fencing token 2 is older than 4"
    with pytest.raises(StaleWriteError, match=refused), db.transaction(database_url) as conn:
        state.update_many_in(conn, AGENT, stale, writer="w-2")
    with db.transaction(database_url) as conn:
        assert state.read(conn, AGENT, "e-0").version == 2
    # and an entity given twice is a clear error
    twice = [state.Change("e-0", plus_one, 5), state.Change("e-0", plus_one, 5)]
    with pytest.raises(ValueError, match=r"given twice: \['e-0'\]"):  # noqa: SIM117
        with db.transaction(database_url) as conn:
            state.update_many_in(conn, AGENT, twice, writer="w-2")


def interfering(url: str, times: int, calls: list[int]) -> Any:
    """``plus_one``, but on its first ``times`` calls another writer commits an
    increment between the read it was given and its write."""

    def fn(current: dict[str, Any]) -> dict[str, Any]:
        calls.append(current.get("count", 0))
        if len(calls) <= times:
            state.update(url, AGENT, ENTITY, plus_one, fencing_token=1, writer="other")
        return plus_one(current)

    return fn


@pytest.fixture
def concurrent_url(postgresql_url: str) -> Iterator[str]:
    """PostgreSQL only: SQLite serializes writers (BEGIN IMMEDIATE), so an update
    there never meets a conflict to retry."""
    truncate(postgresql_url)
    yield postgresql_url
    truncate(postgresql_url)


@pytest.mark.postgres
def test_update_retries_conflicts_then_locks_and_wins(concurrent_url: str) -> None:
    database_url = concurrent_url
    calls: list[int] = []
    optimistic = state._OPTIMISTIC_ATTEMPTS
    fn = interfering(database_url, optimistic, calls)

    done = state.update(database_url, AGENT, ENTITY, fn, fencing_token=1, writer="me")

    assert calls == list(range(optimistic + 1))
    assert done == Versioned({"count": optimistic + 1}, optimistic + 1, 1)
    assert [r.writer for r in history(database_url)] == ["other"] * optimistic + ["me"]


@pytest.mark.postgres
def test_update_raises_the_last_conflict_after_its_attempts(concurrent_url: str) -> None:
    database_url = concurrent_url
    # Within the optimistic attempts: a locked read would wait for the
    # interfering writer, which would wait for it.
    assert state._OPTIMISTIC_ATTEMPTS >= 2
    write(database_url, {"count": 4}, expected=0, token=1)
    calls: list[int] = []
    fn = interfering(database_url, 2, calls)

    with pytest.raises(StateConflictError, match="expected version 2, found version 3"):
        state.update(database_url, AGENT, ENTITY, fn, fencing_token=1, writer="me", attempts=2)

    assert calls == [4, 5]
    assert read(database_url) == Versioned({"count": 6}, 3, 1)
    assert [r.writer for r in history(database_url)] == ["w-1", "other", "other"]


def test_counter_incremented_from_several_processes_ends_exact(database_url: str) -> None:
    """A counter incremented 1,000 times from several processes ends at 1,000."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(PROCESSES)
    children = [
        ctx.Process(target=increment_many, args=(database_url, INCREMENTS, start))
        for _ in range(PROCESSES)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    for child in children:
        if child.is_alive():
            child.kill()
            child.join()
    assert [child.exitcode for child in children] == [0] * PROCESSES

    total = PROCESSES * INCREMENTS
    assert read(database_url) == Versioned({"count": total}, total, 1)
    revisions = history(database_url)
    assert history_rows(database_url) == total
    assert [r.version for r in revisions] == list(range(1, total + 1))
    assert [r.state["count"] for r in revisions] == list(range(1, total + 1))
    assert len({r.writer for r in revisions}) == PROCESSES


def test_a_sqlite_writer_waits_for_the_write_lock_within_its_budget(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``BEGIN IMMEDIATE`` waits for another writer in short steps, gives up
    with SQLite's own ``database is locked`` past the budget; the busy timeout
    is off while the connection writes and on again for a read."""
    import threading

    from sqlalchemy.exc import OperationalError

    from fleetworks import constants as c

    url = f"sqlite:///{tmp_path / 'lock.db'}"
    engine = db.get_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (n INTEGER)")
    holder = engine.connect()
    holder.begin()
    holder.exec_driver_sql("INSERT INTO t VALUES (1)")
    # Given a writer holding the lock: a second one, with a budget of 0.2 s, fails
    monkeypatch.setattr(c, "SQLITE_BUSY_TIMEOUT_MS", 200)
    with pytest.raises(OperationalError, match="locked"), engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (2)")
    # and with its full budget, it gets the lock once the first commits
    monkeypatch.setattr(c, "SQLITE_BUSY_TIMEOUT_MS", 30_000)
    threading.Timer(0.3, holder.commit).start()
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (3)")
        raw = conn.connection.dbapi_connection
        assert raw is not None
        # (a writer holding the lock waits for nothing in WAL mode)
        assert raw.execute("PRAGMA busy_timeout").fetchone() == (0,)
    holder.close()
    # A read on that connection waits with SQLite's busy timeout again.
    with db.reading(url) as conn:
        assert conn.connection.dbapi_connection is raw
        assert raw.execute("PRAGMA busy_timeout").fetchone() == (30_000,)
    with engine.begin() as conn:
        assert [r[0] for r in conn.exec_driver_sql("SELECT n FROM t ORDER BY n")] == [1, 3]
