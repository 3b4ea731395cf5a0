"""The upload scanner: one verdict per file content, infected files moved
aside only once their verdict has committed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from agents.uploads import EICAR, scan
from config.settings import uploads as upload_settings
from fleetworks.agent import Fleet
from fleetworks.db import transaction
from fleetworks.events import Relay
from fleetworks.filedrop import offer
from fleetworks.migrate import upgrade
from tasks.schema import FILE_SCANS
from tests.conftest import wait_for

MIGRATIONS = str(Path(__file__).resolve().parent.parent / "config" / "migrations")


def test_a_verdict_per_kind_of_file(tmp_path: Path) -> None:
    cases = {"clean": b"hello", "infected": b"a" + EICAR, "empty": b"", "oversized": b"x" * 11}
    for verdict, content in cases.items():
        (tmp_path / verdict).write_bytes(content)
        assert scan(tmp_path / verdict, max_bytes=10 if verdict == "oversized" else 100) == (
            verdict
        )


@pytest.fixture
def uploads(fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    upgrade(fleet.settings.database, MIGRATIONS)
    folder = tmp_path / "inbox"
    folder.mkdir()
    monkeypatch.setattr(upload_settings, "dir", folder)
    monkeypatch.setattr(upload_settings, "quarantine_dir", tmp_path / "quarantine")
    return folder


def verdicts(fleet: Fleet) -> dict[str, str]:
    with transaction(fleet.settings.database) as conn:
        return dict(conn.execute(select(FILE_SCANS.c.path, FILE_SCANS.c.verdict)).all())


def test_each_content_is_scanned_once_and_an_infected_file_moved_after_its_verdict(
    fleet: Fleet, uploads: Path, fleet_worker: Any
) -> None:
    files = {"a.txt": b"fine", "b.txt": b"x" + EICAR, "copy-of-a.txt": b"fine"}
    for name, content in files.items():
        (uploads / name).write_bytes(content)
        offer(fleet, uploads, uploads / name)
    relay = Relay(fleet)
    relay.relay_once()
    wait_for(lambda: len(verdicts(fleet)) == 2, 30, "the scans")
    assert verdicts(fleet) == {"a.txt": "clean", "b.txt": "infected"}
    # The infected file is still there: only the committed verdict's
    # announcement moves it
    assert (uploads / "b.txt").exists()
    relay.relay_once()
    wait_for(lambda: not (uploads / "b.txt").exists(), 30, "the quarantine")
    moved = list((upload_settings.quarantine_dir).glob("*-b.txt"))
    assert len(moved) == 1 and moved[0].read_bytes() == b"x" + EICAR
    assert (uploads / "a.txt").exists() and (uploads / "copy-of-a.txt").exists()
