"""Outcome retention: old settled rows go, nothing in flight or awaiting a
person ever does, and beat prunes only when retention is set."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert, select

from fleetworks.db import transaction
from fleetworks.models import GUARD_EVENTS, OUTCOMES
from fleetworks.retention import PRUNE_TASK, prune
from tests.test_cli import embedded_env, fleetworks

NOW = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)  # any date: prune is told the time


def seed(url: str, now: datetime = NOW) -> None:
    """A row of every status, 40 days old and 1 day old; a claim started long
    ago and never finished; guard events of both ages."""
    rows = []
    for status in ("claimed", "succeeded", "failed", "rejected", "dead"):
        for age in (40, 1):
            at = now - timedelta(days=age)
            rows.append({
                "agent": "probe.run", "entity_key": f"e-{status}-{age}",
                "idempotency_key": f"k-{status}-{age}", "status": status, "attempts": 1,
                "started_at": at, "finished_at": None if status == "claimed" else at,
            })  # fmt: skip
    # Finished recently, started long ago: a long run is not old.
    rows.append({
        "agent": "probe.run", "entity_key": "e-long", "idempotency_key": "k-long-run",
        "status": "succeeded", "attempts": 1, "started_at": now - timedelta(days=40),
        "finished_at": now - timedelta(days=1),
    })  # fmt: skip
    events = [
        {"kind": "duplicate", "agent": "probe.run", "idempotency_key": f"k-{age}",
         "at": now - timedelta(days=age)}
        for age in (40, 1)
    ]  # fmt: skip
    with transaction(url) as conn:
        conn.execute(insert(OUTCOMES), rows)
        conn.execute(insert(GUARD_EVENTS), events)


def keys(url: str) -> set[str]:
    with transaction(url) as conn:
        return set(conn.execute(select(OUTCOMES.c.idempotency_key)).scalars())


def test_prune_deletes_only_old_settled_rows(database_url: str) -> None:
    seed(database_url)
    pruned = prune(database_url, 30, now=NOW, batch=1)  # one row per transaction
    assert (pruned.outcomes, pruned.guard_events) == (2, 1)
    assert keys(database_url) == {
        "k-claimed-40", "k-claimed-1", "k-succeeded-1", "k-failed-40", "k-failed-1",
        "k-rejected-1", "k-dead-40", "k-dead-1", "k-long-run",
    }  # fmt: skip
    with transaction(database_url) as conn:
        assert list(conn.execute(select(GUARD_EVENTS.c.idempotency_key)).scalars()) == ["k-1"]
    # Again: nothing left to prune.
    again = prune(database_url, 30, now=NOW)
    assert (again.outcomes, again.guard_events) == (0, 0)


def test_beat_prunes_only_when_retention_is_set(sqlite_url: str) -> None:
    from fleetworks.app import create_app
    from fleetworks.settings import Settings

    url = sqlite_url
    kept = create_app(Settings(database_url=url), name="retention-off")
    assert all(e["task"] != PRUNE_TASK for e in kept.conf.beat_schedule.values())
    pruning = create_app(Settings(database_url=url, outcomes_keep_days=7), name="retention-on")
    entries = [e for e in pruning.conf.beat_schedule.values() if e["task"] == PRUNE_TASK]
    assert len(entries) == 1 and entries[0]["options"]["queue"].endswith(".control")
    # The task the entry sends prunes with the fleet's setting.
    result = pruning.tasks[PRUNE_TASK].run()
    assert result["outcomes"] == 0 and result["before"] is not None


def test_db_prune_from_the_command_line(tmp_path: Path, database_url: str) -> None:
    env = embedded_env(tmp_path / ".fleet")
    env["FLEET_DATABASE_URL"] = database_url
    seed(database_url, datetime.now(UTC))
    refused = fleetworks("db", "prune", env=env, cwd=tmp_path)
    assert refused.returncode == 2 and "FLEET_OUTCOMES_KEEP_DAYS" in refused.stderr
    zero = fleetworks("db", "prune", "--keep-days", "0", env=env, cwd=tmp_path)
    assert zero.returncode == 2 and "--keep-days" in zero.stderr
    done = fleetworks("db", "prune", "--keep-days", "30", "--json", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (json.loads(done.stdout)["outcomes"], json.loads(done.stdout)["guard_events"]) == (2, 1)
    assert "k-succeeded-40" not in keys(database_url) and "k-dead-40" in keys(database_url)
