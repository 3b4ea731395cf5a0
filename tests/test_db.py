"""The results database's connection pool on PostgreSQL (:mod:`fleetworks.db`)."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from fleetworks import constants as c
from fleetworks import db

pytestmark = pytest.mark.postgres


def _own_engine_url(postgresql_url: str) -> str:
    """An engine of this test's own (the cache is by URL)."""
    return f"{postgresql_url}?application_name=fleet-pool-{uuid.uuid4().hex[:8]}"


def _backend_pid(url: str) -> int:
    with db.transaction(url) as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(postgresql_url: str, pid: int) -> None:
    dsn = postgresql_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_connection_gone_while_idle_is_replaced_before_use(
    postgresql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a pooled connection whose server process ends while it sits idle
    monkeypatch.setattr(c, "DB_PING_IDLE_S", 0.0)
    url = _own_engine_url(postgresql_url)
    first = _backend_pid(url)
    _terminate(postgresql_url, first)
    # Then the next transaction is tested first and runs on a new connection
    assert _backend_pid(url) != first
    db.get_engine(url).dispose()


def test_a_connection_in_steady_use_is_not_pinged_and_a_break_costs_one_error(
    postgresql_url: str,
) -> None:
    # Given a connection in use moments ago (under DB_PING_IDLE_S), not tested
    # on checkout: a guarded task's two transactions cost no extra round trip
    assert c.DB_PING_IDLE_S >= 1.0
    url = _own_engine_url(postgresql_url)
    first = _backend_pid(url)
    _terminate(postgresql_url, first)
    # When it is used after its server process ended, that one use fails
    with pytest.raises(OperationalError):
        _backend_pid(url)
    # And the pool was invalidated with it: the next use connects anew
    assert _backend_pid(url) != first
    db.get_engine(url).dispose()
