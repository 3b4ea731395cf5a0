"""The file-drop trigger: files in a folder become events, once per content."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import select

from fleetworks.agent import Fleet
from fleetworks.db import transaction
from fleetworks.filedrop import Dropped, watch
from fleetworks.models import EVENTS
from tests.conftest import wait_for


def stored(fleet: Fleet) -> list[Any]:
    with transaction(fleet.settings.database) as conn:
        return list(conn.execute(select(EVENTS).order_by(EVENTS.c.position)))


def watching(fleet: Fleet, folder: Path) -> tuple[threading.Event, threading.Thread, list[Dropped]]:
    stop, seen = threading.Event(), []
    thread = threading.Thread(target=lambda: seen.append(watch(fleet, folder, stop)), daemon=True)
    thread.start()
    return stop, thread, seen


def test_files_dropped_become_events_and_the_same_content_is_stored_once(
    fleet: Fleet, tmp_path: Path
) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    # Given a file already there when the watcher starts
    (folder / "early.txt").write_bytes(b"dropped while nobody watched")
    stop, thread, seen = watching(fleet, folder)
    try:
        wait_for(lambda: len(stored(fleet)) == 1, 10, "the file already there")
        # When files are dropped: new content, an empty file, and a copy of a
        # content already seen under another name
        (folder / "report.pdf").write_bytes(b"%PDF-1.7 report")
        (folder / "empty.bin").write_bytes(b"")
        (folder / "copy-of-early.txt").write_bytes(b"dropped while nobody watched")
        wait_for(lambda: len(stored(fleet)) == 3, 10, "the new files")
    finally:
        stop.set()
        thread.join(10)
    # Then one event per distinct content, keyed by path, id from the SHA-256
    rows = {r.key: r for r in stored(fleet)}
    assert set(rows) == {"early.txt", "report.pdf", "empty.bin"}
    sha = hashlib.sha256(b"%PDF-1.7 report").hexdigest()
    assert rows["report.pdf"].event_id == f"file.uploaded:{sha}"
    assert rows["report.pdf"].data == {"path": "report.pdf", "size": 15, "sha256": sha}
    assert rows["empty.bin"].data["size"] == 0
    assert seen[0].stored == 3 and seen[0].already == 1
    # And a watcher started again goes through the four files and stores nothing
    done = threading.Event()
    done.set()  # its first pass only
    again = watch(fleet, folder, done)
    assert (again.stored, again.already) == (0, 4)
    assert len(stored(fleet)) == 3


def test_a_file_dropped_before_the_watcher_listens_is_taken(
    fleet: Fleet, tmp_path: Path, monkeypatch: Any
) -> None:
    """A file written after the first pass and before the filesystem watcher
    listens raises no change; the pass made once it listens takes it."""
    from fleetworks import filedrop

    folder = tmp_path / "inbox"
    folder.mkdir()
    real = filedrop.watch_changes

    def late_listener(*args: Any, **kwargs: Any) -> Any:
        (folder / "in-between.txt").write_bytes(b"dropped in the window")
        return real(*args, **kwargs)

    monkeypatch.setattr(filedrop, "watch_changes", late_listener)
    stop, thread, seen = watching(fleet, folder)
    try:
        wait_for(lambda: len(stored(fleet)) == 1, 10, "the file dropped in the window")
    finally:
        stop.set()
        thread.join(10)
    assert [r.key for r in stored(fleet)] == ["in-between.txt"]
    assert (seen[0].stored, seen[0].already) == (1, 0)
