"""``fleetworks demo``: a bounded end-to-end run of the mentions agent.

Starts what ``up`` starts minus Flower (the broker if embedded, a worker,
beat), feeds ``mentions`` distinct mentions with duplicate deliveries mixed
in and a few malformed payloads, publishing from two threads at once so
duplicates race each other onto the two pool processes. It waits until every
task it sent has settled in the results database, then counts, from the
durable record only: tasks settled and lost, effects (mentions answered or
ignored, response rows), effects duplicated, duplicates skipped, rejections.
"Effects duplicated" counts ``duplicate_effect`` events: the agent's tables
are UNIQUE on what must happen once, so a second commit of an effect cannot
happen and a run that tries is recorded as one (the chaos run counts doubles
in a ledger without a UNIQUE key instead).

The demo runs this repository's seed agents (the reference deployment at the
repository root: ``agents.mentions``, ``tasks.mentions``): it needs their feed
to know what to expect, so it imports them when it runs, and refuses an app
that does not have them.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from celery import Celery
from sqlalchemy import func, select

from fleetworks import progress, reports
from fleetworks.db import transaction
from fleetworks.models import EventKind
from fleetworks.procs import wait_workers
from fleetworks.services import FleetProcesses, echo
from fleetworks.settings import Settings

AGENT = "mentions.respond"
#: Malformed payloads mixed into a run, each of a different kind of wrong.
INVALID_PAYLOADS: tuple[Any, ...] = (
    {"mention_id": "", "brand": "acme"},
    {"mention_id": "bad id with spaces", "brand": "a", "author": "b", "text": "t",
     "sentiment": 0, "followers": 1},
    {"mention_id": "x1", "brand": "a", "author": "b", "text": "t", "sentiment": 7,
     "followers": 1},
    ["not", "an", "object"],
    "a plain string",
    {"mention_id": "x2", "brand": "a", "author": "b", "text": "t", "sentiment": 0,
     "followers": -5, "extra": True},
)  # fmt: skip


@dataclass
class DemoReport:
    mentions: int
    tasks_enqueued: int
    duplicates_injected: int
    tasks_settled: int
    tasks_lost: int
    effects: int
    responses: int
    ignored: int
    effects_duplicated: int
    skipped_duplicate: int
    lock_contended: int
    rejected: int
    failed: int
    wall_s: float
    tasks_per_s: float
    ok: bool


def mentions_seed() -> int:
    """The seed the deployment's mentions feed uses (``FLEET_MENTIONS_SEED``)."""
    from config.settings import MentionsSettings

    return MentionsSettings().seed


def build_deliveries(seed: int, mentions: int, duplicate_rate: float, run: str) -> list[Any]:
    from agents.mentions import MentionFeed

    feed = MentionFeed(seed)
    payloads: list[Any] = [m.model_dump() for m in feed.stream(mentions, duplicate_rate, run)]
    step = max(1, len(payloads) // (len(INVALID_PAYLOADS) + 1))
    for i, bad in enumerate(INVALID_PAYLOADS):
        payloads.insert((i + 1) * step, bad)
    return payloads


def publish(app: Any, payloads: list[Any], threads: int = 2) -> list[str]:
    """Publish from ``threads`` threads at once (interleaved slices)."""
    from fleetworks.enqueue import enqueue_many

    ids: list[list[str]] = [[] for _ in range(threads)]

    def send(i: int) -> None:
        ids[i] = enqueue_many(app, AGENT, payloads[i::threads])

    workers = [threading.Thread(target=send, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return [task_id for chunk in ids for task_id in chunk]


def wait_settled(url: str, task_ids: list[str], timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    settled: dict[str, str] = {}
    while time.monotonic() < deadline:
        with transaction(url) as conn:
            settled = reports.settled_tasks(conn, task_ids)
        progress.update("mentions: tasks settled", len(settled), len(task_ids))
        if len(settled) == len(task_ids):
            break
        time.sleep(0.25)
    return settled


def count_effects(url: str, run: str) -> tuple[int, int, int]:
    """(mentions settled, response rows, mentions ignored)."""
    like = f"{run}-%"
    from tasks.schema import MENTIONS, RESPONSES

    m, r = MENTIONS.c, RESPONSES.c
    with transaction(url) as conn:
        by_status: dict[str, int] = dict(
            conn.execute(
                select(m.status, func.count()).where(m.mention_id.like(like)).group_by(m.status)
            ).all()
        )
        rows = conn.execute(select(func.count()).where(r.mention_id.like(like))).scalar_one()
    responded, ignored = int(by_status.get("responded", 0)), int(by_status.get("ignored", 0))
    return responded + ignored, int(rows), ignored


def run_demo(
    app: Celery,
    settings: Settings,
    *,
    mentions: int,
    duplicate_rate: float,
    timeout_s: float,
    with_beat: bool = True,
) -> DemoReport:
    run = f"demo{uuid.uuid4().hex[:8]}"
    # The pricing scenario runs on its own (fleetworks.proving.demo_pricing).
    fleet = FleetProcesses(settings, env={"FLEET_PRICING_PRODUCTS": "0"})
    try:
        fleet.worker("demo-worker")
        if with_beat:
            fleet.beat("demo-beat")
        wait_workers(app, [f"demo-worker@{fleet.hostname}"], timeout_s=60)
        payloads = build_deliveries(mentions_seed(), mentions, duplicate_rate, run)
        echo(f"demo {run}: publishing {len(payloads)} tasks ({mentions} mentions)")
        started = time.monotonic()
        task_ids = publish(app, payloads)
        settled = wait_settled(settings.database, task_ids, timeout_s)
        wall = time.monotonic() - started
    finally:
        fleet.stop()
    return summarize(
        settings.database, run, mentions=mentions, task_ids=task_ids, settled=settled, wall_s=wall
    )


def summarize(
    url: str,
    run: str,
    *,
    mentions: int,
    task_ids: list[str],
    settled: dict[str, str],
    wall_s: float,
) -> DemoReport:
    with transaction(url) as conn:
        events = reports.event_counts(conn, task_ids)
    effects, responses, ignored = count_effects(url, run)
    statuses = list(settled.values())
    lost = len(task_ids) - len(settled)
    duplicated = events.get(EventKind.DUPLICATE_EFFECT, 0)
    return DemoReport(
        mentions=mentions,
        tasks_enqueued=len(task_ids),
        duplicates_injected=len(task_ids) - mentions - len(INVALID_PAYLOADS),
        tasks_settled=len(settled),
        tasks_lost=lost,
        effects=effects,
        responses=responses,
        ignored=ignored,
        effects_duplicated=duplicated,
        skipped_duplicate=statuses.count(EventKind.SKIPPED_DUPLICATE),
        lock_contended=events.get(EventKind.LOCK_CONTENDED, 0),
        rejected=statuses.count("rejected"),
        failed=statuses.count("failed"),
        wall_s=round(wall_s, 2),
        tasks_per_s=round(len(task_ids) / wall_s, 1) if wall_s > 0 else 0.0,
        ok=lost == 0 and duplicated == 0 and effects == mentions,
    )


def render(report: DemoReport) -> str:
    d = asdict(report)
    verdict = "OK" if report.ok else "NOT OK"
    lines = [
        f"fleetworks demo: {verdict}",
        f"  tasks      {d['tasks_enqueued']} enqueued ({d['mentions']} mentions, "
        f"{d['duplicates_injected']} duplicate deliveries, {len(INVALID_PAYLOADS)} malformed)",
        f"  settled    {d['tasks_settled']}   lost {d['tasks_lost']}   in {d['wall_s']} s "
        f"({d['tasks_per_s']} tasks/s)",
        f"  effects    {d['effects']} mentions handled: {d['responses']} responses, "
        f"{d['ignored']} ignored; duplicated {d['effects_duplicated']}",
        f"  guard      {d['skipped_duplicate']} duplicates skipped, {d['lock_contended']} lock "
        f"waits, {d['rejected']} rejected, {d['failed']} failed",
    ]
    return "\n".join(lines)
