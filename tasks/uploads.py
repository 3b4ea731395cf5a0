"""Celery tasks of the upload scanner: one scan per file content.

``uploads.scan`` subscribes to ``file.uploaded`` (``fleetworks watch``
stores one per file content, id from its SHA-256). It records the verdict in
``file_scans`` (UNIQUE on the digest) and, for an infected file, emits
``file.quarantined`` in the same transaction. ``uploads.quarantine``
subscribes to that and moves the file into ``FLEET_UPLOADS_QUARANTINE_DIR``:
the move, on disk and outside any transaction, happens only once the
verdict has committed, and a repeat finds the file already moved. A file
gone before its scan is recorded as ``gone``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from sqlalchemy import insert

from agents import uploads
from config.settings import uploads as settings
from fleetworks import AgentSpec, RunContext, shared_agent
from fleetworks.claims import now
from fleetworks.events import Event
from tasks.schema import FILE_SCANS

SCAN = "uploads.scan"
UPLOADED = "file.uploaded"
QUARANTINED = "file.quarantined"
QUARANTINE = "uploads.quarantine"


@shared_agent(AgentSpec(name=SCAN, payload=Event, on=(UPLOADED,)))
def scan(ctx: RunContext, event: Event) -> dict[str, Any]:
    rel = str(event.data["path"])
    path = _inside(rel)
    verdict = uploads.scan(path, settings.max_bytes) if path.is_file() else "gone"
    ctx.db.execute(
        insert(FILE_SCANS).values(
            sha256=event.data["sha256"],
            path=rel,
            size=int(event.data["size"]),
            verdict=verdict,
            fencing_token=ctx.fencing_token,
            created_at=now(),
        )
    )
    if verdict == "infected":
        ctx.emit(QUARANTINED, {"path": rel, "sha256": event.data["sha256"]}, key=rel)
    return {"path": rel, "verdict": verdict}


def _inside(rel: str) -> Any:
    path = (settings.dir / rel).resolve()
    if settings.dir.resolve() not in path.parents:
        raise ValueError(f"path {rel!r} is outside {settings.dir}")
    return path


@shared_agent(AgentSpec(name=QUARANTINE, payload=Event, on=(QUARANTINED,)))
def quarantine(ctx: RunContext, event: Event) -> dict[str, Any]:
    path = _inside(str(event.data["path"]))
    settings.quarantine_dir.mkdir(parents=True, exist_ok=True)
    target = settings.quarantine_dir / f"{event.data['sha256']}-{path.name}"
    ctx.check_lease()
    moved = False
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, target)
        moved = True
    return {"path": event.data["path"], "moved": moved}
