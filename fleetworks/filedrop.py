"""A file-drop trigger: files put in a folder become ``file.uploaded`` events.

``fleetworks watch DIR`` (or :func:`watch`) stores one event per file
content: its id is ``file.uploaded:<SHA-256>``, so the same content dropped
twice, under any name, is stored once and its subscribers run once; its
key is the file's path relative to the folder, its data the path, size and
SHA-256. On start it goes through the files already there (those dropped
while no watcher ran), then follows changes with ``watchfiles``, the
filesystem watcher the Python ecosystem already uses (uvicorn's reload), so
no polling loop is written here. A file still being written is hashed again
when it changes: each distinct content is its own event, and a subscriber
that needs the final one checks the size or waits for the writer's rename.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from watchfiles import Change
from watchfiles import watch as watch_changes

from fleetworks import events
from fleetworks.agent import Fleet

log = logging.getLogger(__name__)

TOPIC: Final = "file.uploaded"
#: Bytes read at a time while hashing.
_CHUNK: Final = 1 << 20


@dataclass
class Dropped:
    """What a watch did: events stored, files whose content was already stored."""

    stored: int = 0
    already: int = 0


def digest(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and size of ``path``'s content."""
    sha, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def offer(fleet: Fleet, folder: Path, path: Path, topic: str = TOPIC) -> bool | None:
    """Store the event for ``path``; True if new, False if its content was
    already stored, None if it is gone or not a regular file."""
    try:
        if not path.is_file():
            return None
        sha, size = digest(path)
    except OSError as exc:
        log.warning("watch: cannot read %s (%s); skipped", path, exc)
        return None
    name = path.relative_to(folder).as_posix()
    data = {"path": name, "size": size, "sha256": sha}
    published = events.publish(topic, data, key=name[:500], event_id=f"{topic}:{sha}",
                               app=fleet.app)  # fmt: skip
    return published.stored


def _files(folder: Path) -> Iterable[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


@dataclass
class _Taker:
    """Offers files, each content as it is now (size, modification time) once."""

    fleet: Fleet
    folder: Path
    topic: str
    seen: Dropped
    taken: dict[Path, tuple[int, int] | None]

    def take(self, path: Path) -> None:
        stamp = _stamp(path)
        if stamp is not None and self.taken.get(path) == stamp:
            return  # this very content was taken already, by a pass or a change
        self.taken[path] = stamp
        stored = offer(self.fleet, self.folder, path, self.topic)
        if stored is True:
            self.seen.stored += 1
        elif stored is False:
            self.seen.already += 1

    def take_all(self) -> None:
        for path in _files(self.folder):
            self.take(path)


def watch(fleet: Fleet, folder: Path, stop: threading.Event, *, topic: str = TOPIC) -> Dropped:
    """Store an event per file content in ``folder`` until ``stop`` is set.

    A file dropped after the first pass but before the filesystem watcher
    was listening raises no change: so once the watcher listens (its first
    tick), the folder is gone through again, taking only the files this
    watch has not taken as they are now."""
    folder = folder.resolve()
    taker = _Taker(fleet, folder, topic, Dropped(), {})
    taker.take_all()
    listening = False
    for changes in watch_changes(folder, stop_event=stop, rust_timeout=500, yield_on_timeout=True):
        if not listening:
            listening = True
            taker.take_all()
        for change, raw in sorted(changes, key=lambda c: c[1]):
            if change in (Change.added, Change.modified):
                taker.take(Path(raw))
    return taker.seen
