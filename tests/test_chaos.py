"""`fleetworks chaos` end to end: real faults, nothing lost, nothing done twice.

A short run of every fault kind is part of the suite, on the embedded
default (SQLite) and on PostgreSQL; the long run is marked slow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete

from fleetworks.agent import Fleet
from fleetworks.db import transaction
from fleetworks.models import OUTCOMES
from fleetworks.proving.faults import KINDS
from tests.conftest import POSTGRES_URL, _require_postgres
from tests.test_cli import embedded_env, fleetworks

#: A database of its own: a db-pause fault refuses every connection to it.
CHAOS_DB = "fleet_chaos"


def chaos_postgres_url() -> str:
    """A fresh database for one run: what an earlier run (of any revision) left
    in it must not decide this one."""
    _require_postgres()
    import psycopg

    admin = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{CHAOS_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{CHAOS_DB}"')
    return POSTGRES_URL.rsplit("/", 1)[0] + f"/{CHAOS_DB}"


def run_chaos(tmp_path: Path, *args: str, database_url: str | None = None) -> dict[str, Any]:
    env = embedded_env(tmp_path / ".fleet")
    if database_url:
        env["FLEET_DATABASE_URL"] = database_url
    done = fleetworks("chaos", *args, "--json", env=env, cwd=tmp_path, timeout=1800)
    assert done.stdout, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    assert done.returncode == (0 if report["ok"] else 1)
    return report


def assert_nothing_lost_or_doubled(report: dict[str, Any], tasks: int, per_kind: int) -> None:
    assert report["ok"] is True, report
    assert report["tasks_lost"] == 0
    assert report["tasks_settled"] == tasks
    assert report["effects_duplicated"] == 0
    # No poison was sent: nothing may end dead, and every task took effect once.
    assert report["dead"] == 0
    # The ledger, counted apart from the outcome rows, has one row per success.
    assert report["effects"] == report["succeeded"] == tasks
    assert report["faults"] == {kind: per_kind for kind in KINDS}
    assert report["worker_restarts"] >= per_kind
    # Every fault hit work in flight, and that work recovered.
    for fault in report["fault_log"]:
        assert fault["in_flight"] > 0, fault
        assert fault["recovery_s"] is not None, fault
    # The holder paused past its lease was taken over, and its late write refused.
    assert report["stale_writes_refused"] >= 1
    # Every task announced its effect; each subscriber handled every
    # announcement once, through relay kills (counted without a UNIQUE key).
    assert set(report["subscribers"]) == {"probe.done_a", "probe.done_b"}
    for name, handled in report["subscribers"].items():
        assert handled == {"handled": tasks, "lost": 0, "duplicated": 0}, name
    assert report["relay_restarts"] >= per_kind


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_short_chaos_run_loses_and_doubles_nothing(tmp_path: Path, backend: str) -> None:
    """300 tasks through one fault of every kind: all settle, each effect once."""
    url = chaos_postgres_url() if backend == "postgresql" else None
    report = run_chaos(tmp_path, "--tasks", "300", "--seed", "3", database_url=url)
    assert_nothing_lost_or_doubled(report, 300, 1)
    assert report["database"] == backend


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_long_chaos_run(tmp_path: Path, backend: str) -> None:
    """2,000 tasks through three faults of every kind, recovering in under 30 s each
    (``FLEET_CHAOS_TASKS`` and ``FLEET_CHAOS_PER_KIND`` make it longer)."""
    url = chaos_postgres_url() if backend == "postgresql" else None
    tasks = int(os.environ.get("FLEET_CHAOS_TASKS", "2000"))
    per_kind = int(os.environ.get("FLEET_CHAOS_PER_KIND", "3"))
    args = ("--tasks", str(tasks), "--per-kind", str(per_kind), "--timeout", str(tasks))
    report = run_chaos(tmp_path, *args, database_url=url)
    assert_nothing_lost_or_doubled(report, tasks, per_kind)
    assert report["max_recovery_s"] < 30, report["fault_log"]


def test_the_chaos_count_sees_an_effect_committed_twice(fleet: Fleet, run_agent: Any) -> None:
    """The run's "duplicated" is counted, not constructed: with the guard's record
    of a key deleted (a guard that forgot it ran it), the key runs again and the
    report shows the double, from the ledger that has no UNIQUE key."""
    from fleetworks.proving import chaos

    url, run = fleet.settings.database, "chaosdouble"
    for i in (0, 1):
        run_agent("probe.run", {"id": f"{run}-{i}", "unique": False})
    report = chaos._report(url, run, tasks=2, faults=[], settled=chaos._settled(url, run),
                           restarts=0, wall_s=0)  # fmt: skip
    assert (report.effects, report.effects_duplicated) == (2, 0)
    with transaction(url) as conn:
        conn.execute(delete(OUTCOMES).where(OUTCOMES.c.idempotency_key == f"probe:{run}-0"))
    assert run_agent("probe.run", {"id": f"{run}-0", "unique": False}).status == "succeeded"
    report = chaos._report(url, run, tasks=2, faults=[], settled=chaos._settled(url, run),
                           restarts=0, wall_s=0)  # fmt: skip
    assert (report.effects, report.effects_duplicated, report.ok) == (3, 1, False)


def test_unknown_fault_kind_is_a_clear_error(tmp_path: Path) -> None:
    """A typo in --faults names the known kinds and exits 2."""
    env = embedded_env(tmp_path / ".fleet")
    done = fleetworks("chaos", "--faults", "child-kil", env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert "unknown fault kinds ['child-kil']" in done.stderr
    assert "worker-kill" in done.stderr
