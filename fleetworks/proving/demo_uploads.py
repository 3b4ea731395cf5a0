"""The upload-scanner part of ``fleetworks demo``: a file-drop trigger.

It starts a worker and the events relay, and watches a fresh folder in this
process (:func:`fleetworks.filedrop.watch`). It drops ``files`` files into
it over a second or two: most clean, some carrying the EICAR test string,
some copies of earlier files under new names, some empty, some past the
scanner's size limit. Each distinct content must be scanned once
(``uploads.scan``, one ``file_scans`` row, UNIQUE on the digest), each
infected one announced (``file.quarantined``) and moved aside
(``uploads.quarantine``). Counted from the results database and the disk:
files dropped, distinct contents, events stored and copies recognised,
verdicts, files quarantined, tasks lost (contents never scanned) and
effects duplicated (``duplicate_effect`` events).

The scenario runs this repository's upload agents (``agents.uploads``,
``tasks.uploads``), imported when it runs.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import func, select

from fleetworks import progress
from fleetworks.agent import Fleet
from fleetworks.db import transaction
from fleetworks.filedrop import Dropped, watch
from fleetworks.models import EVENTS, GUARD_EVENTS, EventKind
from fleetworks.procs import wait_workers
from fleetworks.services import FleetProcesses, echo
from fleetworks.settings import Settings

#: The scanner's size limit in the demo: small, so oversized files stay small.
MAX_BYTES = 64 * 1024


@dataclass
class UploadsReport:
    files_dropped: int
    distinct_contents: int
    events_stored: int
    #: Files the watcher found already stored (copies, or a file seen twice).
    already_stored: int
    verdicts: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
    tasks_lost: int = 0
    effects_duplicated: int = 0
    wall_s: float = 0.0
    ok: bool = False


def _files(run: str, n: int, seed: int) -> list[tuple[str, bytes, str]]:
    """``(name, content, expected verdict)`` of ``n`` files, copies included."""
    from agents.uploads import EICAR

    rng = random.Random(seed)
    out: list[tuple[str, bytes, str]] = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.10 and out:
            name, content, verdict = rng.choice(out)
            out.append((f"copy-{i}-{name}", content, verdict))
            continue
        tag = f"{run} file {i}\n".encode()
        if roll < 0.25:
            out.append((f"invoice-{i}.txt", tag + EICAR + b"\n", "infected"))
        elif roll < 0.28:
            out.append((f"empty-{i}.bin", b"", "empty"))
        elif roll < 0.30:
            out.append((f"video-{i}.bin", tag + b"\0" * (MAX_BYTES + 1), "oversized"))
        else:
            out.append((f"report-{i}.txt", tag + rng.randbytes(rng.randrange(64, 4096)), "clean"))
    return out


def run_uploads(
    app: Celery, settings: Settings, *, files: int, timeout_s: float, seed: int = 13
) -> UploadsReport:
    from tasks.schema import FILE_SCANS

    run = f"up{uuid.uuid4().hex[:6]}"
    folder = (settings.home / "uploads" / run).resolve()
    quarantine = (settings.home / "quarantine" / run).resolve()
    folder.mkdir(parents=True)
    planned = _files(run, files, seed)
    contents = {c: v for _, c, v in planned}
    env = {
        "FLEET_UPLOADS_DIR": str(folder),
        "FLEET_UPLOADS_QUARANTINE_DIR": str(quarantine),
        "FLEET_UPLOADS_MAX_BYTES": str(MAX_BYTES),
        "FLEET_PRICING_PRODUCTS": "0",
        "FLEET_MENTIONS_PER_POLL": "0",
    }
    fleet = FleetProcesses(settings, env=env)
    stop = threading.Event()
    seen: list[Dropped] = []
    watcher = threading.Thread(
        target=lambda: seen.append(watch(Fleet.of(app), folder, stop)), daemon=True
    )
    started = time.monotonic()
    # (the empty content is the same in every run: an earlier run may have scanned it)
    digests = {hashlib.sha256(c).hexdigest(): v for c, v in contents.items()}
    try:
        fleet.worker("uploads-worker")
        fleet.relay("uploads-relay")
        wait_workers(app, [f"uploads-worker@{fleet.hostname}"], timeout_s=60)
        watcher.start()
        echo(f"demo {run}: dropping {files} files ({len(contents)} distinct) into {folder}")
        for name, content, _ in planned:
            (folder / name).write_bytes(content)
            time.sleep(0.01)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with transaction(settings.database) as conn:
                scanned = conn.execute(
                    select(func.count()).where(FILE_SCANS.c.sha256.in_(list(digests)))
                ).scalar_one()
            infected = sum(1 for v in digests.values() if v == "infected")
            moved = len(list(quarantine.glob("*"))) if quarantine.exists() else 0
            progress.update("uploads: contents scanned", scanned, len(digests))
            if scanned >= len(digests) and moved >= infected:
                break
            time.sleep(0.25)
        wall = time.monotonic() - started
    finally:
        stop.set()
        watcher.join(10)
        fleet.stop()
    return _report(settings.database, planned=planned, digests=digests, quarantine=quarantine,
                   seen=seen, wall_s=wall)  # fmt: skip


def _report(
    url: str,
    *,
    planned: list[tuple[str, bytes, str]],
    digests: dict[str, str],
    quarantine: Path,
    seen: list[Dropped],
    wall_s: float,
) -> UploadsReport:
    from tasks.schema import FILE_SCANS

    with transaction(url) as conn:
        verdicts = dict(
            conn.execute(
                select(FILE_SCANS.c.sha256, FILE_SCANS.c.verdict).where(
                    FILE_SCANS.c.sha256.in_(list(digests))
                )
            ).all()
        )
        events = conn.execute(
            select(func.count()).where(
                EVENTS.c.event_id.in_([f"file.uploaded:{d}" for d in digests])
            )
        ).scalar_one()
        duplicated = conn.execute(
            select(func.count()).where(
                (GUARD_EVENTS.c.kind == EventKind.DUPLICATE_EFFECT)
                & GUARD_EVENTS.c.agent.in_(["uploads.scan", "uploads.quarantine"])
            )
        ).scalar_one()
    counts: dict[str, int] = {}
    for verdict in verdicts.values():
        counts[verdict] = counts.get(verdict, 0) + 1
    quarantined = len(list(quarantine.glob("*"))) if quarantine.exists() else 0
    lost = len(digests) - len(verdicts)
    right = all(verdicts.get(d) == v for d, v in digests.items())
    infected = sum(1 for v in digests.values() if v == "infected")
    dropped = seen[0] if seen else Dropped()
    report = UploadsReport(
        files_dropped=len(planned),
        distinct_contents=len(digests),
        events_stored=int(events),
        already_stored=dropped.already,
        verdicts=counts,
        quarantined=quarantined,
        tasks_lost=lost,
        effects_duplicated=int(duplicated),
        wall_s=round(wall_s, 1),
    )
    report.ok = lost == 0 and report.effects_duplicated == 0 and right and quarantined == infected
    return report


def as_dict(report: UploadsReport) -> dict[str, Any]:
    return asdict(report)


def render(r: UploadsReport) -> str:
    return "\n".join(
        [
            f"uploads: {'OK' if r.ok else 'NOT OK'}",
            f"  files      {r.files_dropped} dropped, {r.distinct_contents} distinct, "
            f"{r.events_stored} events, {r.already_stored} found already stored",
            f"  verdicts   {r.verdicts}; quarantined {r.quarantined}",
            f"  lost {r.tasks_lost}, duplicated {r.effects_duplicated}; {r.wall_s} s",
        ]
    )
