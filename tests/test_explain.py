"""Every query on the guard's hot path, the reaper's and the prune's reaches
``outcomes`` through an index on PostgreSQL: checked with ``EXPLAIN`` on a
table of 60,000 rows (mostly settled, as a fleet's table is), statistics
fresh, so the planner chooses as it would in production."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, event, select, text
from sqlalchemy.sql import ClauseElement

from fleetworks import claims
from fleetworks.db import get_engine
from fleetworks.models import OUTCOMES
from fleetworks.retention import BATCH, old_outcomes

pytestmark = pytest.mark.postgres

ROWS = 60_000
NOW = datetime(2030, 1, 1, tzinfo=UTC)  # any date: every query is given its times


@pytest.fixture
def filled(postgresql_url: str) -> Iterator[Connection]:
    """``outcomes`` with ROWS rows: 1% claimed, 1% failed, 1% dead, the rest settled."""
    from tests.conftest import truncate

    truncate(postgresql_url)
    with get_engine(postgresql_url).begin() as conn:
        conn.execute(
            text(
                """
                INSERT INTO outcomes (agent, entity_key, idempotency_key, status, attempts,
                    fencing_token, task_id, worker, started_at, finished_at, payload, queue)
                SELECT 'probe.run', 'probe:' || i, 'probe:' || i,
                    CASE WHEN i % 100 = 0 THEN 'claimed' WHEN i % 100 = 1 THEN 'failed'
                         WHEN i % 100 = 2 THEN 'dead' ELSE 'succeeded' END,
                    1, i, md5(i::text), 'w', :now - i * interval '1 second',
                    :now - i * interval '1 second' + interval '50 milliseconds',
                    '{"id": "x"}'::json, 'fleet'
                FROM generate_series(1, :rows) AS i
                """
            ),
            {"now": NOW, "rows": ROWS},
        )
        conn.exec_driver_sql("ANALYZE outcomes")
    with get_engine(postgresql_url).connect() as conn:
        yield conn
    truncate(postgresql_url)


def plan(conn: Connection, stmt: ClauseElement, values: dict[str, Any]) -> str:
    """The plan PostgreSQL makes for ``stmt`` as the code runs it (its
    parameters bound the same way), read with ``EXPLAIN``."""
    captured: list[str] = []

    def explain(_c: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> Any:
        cursor.execute(f"EXPLAIN {statement}", parameters)
        captured.extend(row[0] for row in cursor.fetchall())
        return "SELECT 1 WHERE false", ()

    event.listen(conn, "before_cursor_execute", explain, retval=True)
    try:
        conn.execute(stmt, values).close()
    finally:
        event.remove(conn, "before_cursor_execute", explain)
        conn.rollback()
    return "\n".join(captured)


def assert_indexed(found: str, index: str) -> None:
    assert "Seq Scan on outcomes" not in found, found
    assert index in found, found


def test_the_guard_reaches_its_row_by_the_idempotency_key(filled: Connection) -> None:
    key = {"key": "probe:4242", "token": 4242}
    unique = "outcomes_idempotency_key_key"
    assert_indexed(plan(filled, claims._FOUND, key), unique)
    finish = {**key, "status": "succeeded", "finished_at": NOW, "result": None, "error": None}
    assert_indexed(plan(filled, claims._FINISH, finish), unique)
    claim = {name: None for name in claims._CLAIM_COLUMNS} | {
        "agent": "probe.run", "entity_key": "probe:1", "idempotency_key": "probe:1",
        "fencing_token": 99, "started_at": NOW, "payload": None, "attempts": 1,
    }  # fmt: skip
    # An upsert finds its conflict through the unique index (its arbiter).
    found = plan(filled, claims._claim_statement("postgresql"), claim)
    assert f"Conflict Arbiter Indexes: {unique}" in found, found
    # So does a first delivery's outcome, written once with its effects.
    outcome = claim | {"status": "succeeded", "finished_at": NOW, "result": None, "error": None}
    settled = plan(filled, claims.settle_statement("postgresql"), outcome)
    assert f"Conflict Arbiter Indexes: {unique}" in settled, settled


def test_the_reaper_and_the_reports_use_their_indexes(filled: Connection) -> None:
    o = OUTCOMES.c
    stale = ((o.status == "claimed") & (o.started_at < NOW - timedelta(seconds=4))) | (
        (o.status == "failed") & (o.finished_at < NOW - timedelta(seconds=60))
    )
    fresh = o.reaped_at.is_(None) | (o.reaped_at < NOW)
    reapable = (
        select(OUTCOMES).where(stale & fresh & o.payload.is_not(None)).order_by(o.started_at)
    ).limit(100)
    assert_indexed(plan(filled, reapable, {}), "ix_outcomes_status_started")
    by_task = select(o.task_id, o.status).where(o.task_id.in_(["a", "b", "c"]))
    assert_indexed(plan(filled, by_task, {}), "ix_outcomes_task_id")
    dead = select(OUTCOMES).where(o.agent == "probe.run", o.status == "dead").limit(50)
    assert_indexed(plan(filled, dead, {}), "ix_outcomes_")


def test_the_prune_selects_through_the_status_index(filled: Connection) -> None:
    """With 1% of the rows past the cutoff (a prune every hour finds few), the
    prune's select goes through ``(status, started_at)``."""
    before = NOW - timedelta(seconds=ROWS - ROWS // 100)
    assert_indexed(plan(filled, old_outcomes(before, BATCH), {}), "ix_outcomes_status_started")
