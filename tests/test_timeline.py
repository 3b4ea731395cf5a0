"""``fleetworks timeline KEY``: a key retried, refused as stale, then done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetworks.agent import Fleet
from fleetworks.timeline import timeline

REPO = Path(__file__).resolve().parent.parent


def test_the_timeline_of_a_key_retried_refused_as_stale_then_succeeded(
    fleet: Fleet, run_agent: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from fleetworks.proving import probe

    # Given a key whose first attempt fails,
    payload = {"id": "tl", "fail_attempts": 1}
    assert run_agent("probe.run", payload).retry is not None
    # whose second attempt loses its lease before it commits,
    real = probe.SqlProbeSink.record

    def record_then_lose(self: Any, effect_key: str, token: int, *, unique: bool = True) -> None:
        real(self, effect_key, token, unique=unique)
        self._ctx.lease.lost.set()

    with monkeypatch.context() as patched:
        patched.setattr(probe.SqlProbeSink, "record", record_then_lose)
        assert run_agent("probe.run", payload).event_kinds == ["stale_write"]
    # and whose third attempt succeeds
    done = run_agent("probe.run", payload)
    assert done.status == "succeeded"
    # When its timeline is read
    entries = timeline(fleet.settings.database, "probe:tl")
    # Then it shows each step, in order, with tokens
    kinds = [e.what for e in entries]
    assert kinds == ["attempt_failed", "stale_write", "claimed (attempt 3)", "succeeded"], kinds
    failed, stale, claimed, succeeded = entries
    assert "ProbeFailure" in (failed.detail or "") and "token 1" in (failed.detail or "")
    assert "lost" in (stale.detail or "")
    assert claimed.token == succeeded.token == done.outcome["fencing_token"]
    assert [e.at for e in entries] == sorted(e.at or "" for e in entries)
    # And the command prints the same, as JSON
    env = dict(os.environ, FLEET_DATABASE_URL=fleet.settings.database, PYTHONPATH=str(REPO))
    shown = subprocess.run(
        [sys.executable, "-m", "fleetworks", "timeline", "probe:tl", "--json"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert [e["what"] for e in json.loads(shown.stdout)["entries"]] == kinds
