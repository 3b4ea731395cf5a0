"""Engines and sessions of the results database, one engine per process.

SQLite is the embedded default: WAL so readers never block the writer, a busy
timeout so concurrent workers queue instead of failing, and ``BEGIN
IMMEDIATE`` so a transaction takes the write lock up front (a deferred
transaction that reads and then writes can fail at once with
``database is locked`` instead of waiting); :func:`reading` opens a deferred
one for reads, which never wait for a writer.

PostgreSQL connections are pooled and tested before use only after sitting
idle for ``DB_PING_IDLE_S``: SQLAlchemy's ``pool_pre_ping`` pings on every
checkout, a round trip for each of a guarded task's transactions, while a
connection in steady use is the least likely to be gone (a server restart
or an idle timeout finds the idle ones). One that breaks in use raises an
``OperationalError``, which invalidates the pool and which the guard waits
out like any unreachable database.

Engines are never shared across ``fork()``: :func:`reset_after_fork` is
called from ``worker_process_init`` and drops the parent's pool without
closing its sockets.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, OperationalError

from fleetworks import constants as c

_engines: dict[str, tuple[int, Engine]] = {}
_READ_ONLY = "fleet_read_only"


def _sqlite_engine(url: str) -> Engine:
    path = make_url(url).database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"timeout": c.SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        mode = cur.execute("PRAGMA journal_mode=WAL").fetchone()
        record.info[_WAL] = mode is not None and str(mode[0]).lower() == "wal"
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={c.SQLITE_BUSY_TIMEOUT_MS}")
        record.info[_BUSY_OFF] = False
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        fairy = conn.connection
        raw = fairy.dbapi_connection
        assert raw is not None
        # A read takes no write lock: a writer stopped mid-transaction (SIGSTOP,
        # a partition) must not stop every reader with it.
        if conn.get_execution_options().get(_READ_ONLY, False):
            _busy_timeout(raw, fairy.info, on=True)
            _begin(raw, "BEGIN")
        else:
            _begin_immediate(raw, fairy.info)

    return engine


#: Keys of a driver connection's ``info``: its database is in WAL mode; its
#: busy timeout is off (a write transaction's, which waits in its own steps).
_WAL = "fleet_wal"
_BUSY_OFF = "fleet_busy_off"


def _busy_timeout(raw: Any, info: dict[str, Any], *, on: bool) -> None:
    """SQLite's busy timeout on or off, sent only when it changes."""
    if info.get(_BUSY_OFF) == on:
        raw.execute(f"PRAGMA busy_timeout={c.SQLITE_BUSY_TIMEOUT_MS if on else 0}")
        info[_BUSY_OFF] = not on


def _begin(raw: Any, statement: str) -> None:
    """``statement`` on the driver's connection, its error raised as SQLAlchemy's.

    The transaction starts here, not in the sqlite3 module (its handling is
    off); sent through SQLAlchemy, a ``BEGIN`` cost more than SQLite takes
    to run it. Statement counters count it from the ``begin`` event
    (:func:`sends_begin`).
    """
    try:
        raw.execute(statement)
    except sqlite3.Error as exc:
        raise OperationalError(statement, None, exc) from exc


def _begin_immediate(raw: Any, info: dict[str, Any]) -> None:
    """``BEGIN IMMEDIATE``, waiting for the write lock in short steps.

    SQLite's own busy handler sleeps 1, 2, 5, 10 ... up to 100 ms between
    looks at the lock: with writers whose transactions last tens of
    milliseconds (a batch's), a waiter slept on long after the lock was free,
    and the one writer the database allows sat idle. Here the wait is the
    same budget (``SQLITE_BUSY_TIMEOUT_MS``), looked at every
    :data:`~fleetworks.constants.SQLITE_LOCK_POLL_MAX_S` at most.

    The busy timeout is off for that, and stays off while the connection
    writes: once the write lock is held, nothing in a WAL database waits
    (a commit's checkpoint is a passive one), so the next write transaction
    on the connection sends no ``PRAGMA``; a read turns it back on. Out of
    WAL mode a commit waits for readers, and the timeout goes back on at once.
    """
    _busy_timeout(raw, info, on=False)
    try:
        deadline = time.monotonic() + c.SQLITE_BUSY_TIMEOUT_MS / 1000
        pause = c.SQLITE_LOCK_POLL_MIN_S
        while True:
            try:
                _begin(raw, "BEGIN IMMEDIATE")
                return
            except OperationalError as exc:
                if "locked" not in str(exc.orig) or time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, c.SQLITE_LOCK_POLL_MAX_S)
    finally:
        if not info.get(_WAL):
            _busy_timeout(raw, info, on=True)


def sends_begin(engine: Engine) -> bool:
    """Whether each transaction on ``engine`` starts with a ``BEGIN`` that
    SQLAlchemy's cursor events do not see (SQLite's, sent by this module): a
    statement counter counts one per ``begin`` event there."""
    return engine.dialect.name == "sqlite"


def get_engine(url: str) -> Engine:
    """The engine for ``url`` in this process (a new one after a fork)."""
    pid = os.getpid()
    cached = _engines.get(url)
    if cached is not None and cached[0] == pid:
        return cached[1]
    if url.startswith("sqlite"):
        engine = _sqlite_engine(url)
    else:
        engine = create_engine(url, pool_size=5, max_overflow=5)
        _ping_when_idle(engine)
    _engines[url] = (pid, engine)
    return engine


_IDLE_SINCE = "fleet_idle_since"


def _ping_when_idle(engine: Engine) -> None:
    """Test a pooled connection on checkout if it sat idle ``DB_PING_IDLE_S``."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop(_IDLE_SINCE, None)
        idle = time.monotonic() - since if since is not None else 0.0
        if idle < c.DB_PING_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            # The pool drops this connection and checks out another (a new one).
            raise DisconnectionError(f"a connection idle {idle:.0f} s is gone") from exc


def reset_after_fork() -> None:
    """Forget engines inherited from the parent; their sockets stay the parent's."""
    for _pid, engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()


def dispose_all() -> None:
    for _pid, engine in _engines.values():
        engine.dispose()
    _engines.clear()


@contextmanager
def transaction(url: str) -> Iterator[Connection]:
    """One short transaction: committed on success, rolled back on error."""
    with get_engine(url).begin() as conn:
        yield conn


@contextmanager
def reading(url: str) -> Iterator[Connection]:
    """One transaction that only reads: on SQLite a deferred ``BEGIN``, which in
    WAL mode neither takes nor waits for the write lock."""
    with get_engine(url).connect() as conn:
        conn.execution_options(**{_READ_ONLY: True})
        with conn.begin():
            yield conn


def is_postgres(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


def upsert_for(dialect: str, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT with ``on_conflict_do_*`` for ``dialect`` (postgresql or sqlite)."""
    if dialect == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def upsert(conn: Connection, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT with ``on_conflict_do_*`` for this connection's dialect."""
    return upsert_for(conn.dialect.name, table)
