"""The support-ticket part of ``fleetworks demo``: events between agents, a
trigger from outside and waits that hold no worker.

It starts a worker and the events relay, and serves the ingest route in
this process. It sends ``tickets`` simulated tickets to ``support.triage``
(one in ten delivered twice); triage escalates the very negative
high-priority ones by emitting ``ticket.escalated``; ``support.escalation``
assigns each to the person on call and waits for ``ticket.acknowledged``.
A simulated on-call team reads new assignments and acknowledges most of
them through ``POST /events/ticket.acknowledged`` (one in five sent twice,
with the same ``Idempotency-Key``); the rest time out and are re-escalated
once, to the next person. It waits until every escalation is closed and
counts from the results database: events emitted, deliveries, duplicates
suppressed, waits resolved by an event and by a timeout, the relay's lag
(from an escalation's commit to its subscriber's run), tasks lost and
effects duplicated (``duplicate_effect`` events; every effect table has a
UNIQUE key). ``ok`` also requires every escalated ticket to have exactly one
first assignment and, when that timed out, exactly one second.

The scenario runs this repository's support agents (``agents.support``,
``tasks.support``), imported when it runs.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from sqlalchemy import func, select

from fleetworks.agent import Fleet
from fleetworks.db import transaction
from fleetworks.enqueue import enqueue_many
from fleetworks.models import EVENTS, GUARD_EVENTS, OUTCOMES, TERMINAL, WAITS, EventKind
from fleetworks.procs import wait_workers
from fleetworks.services import FleetProcesses, echo
from fleetworks.settings import Settings

TRIAGE, ESCALATION = "support.triage", "support.escalation"


@dataclass
class SupportReport:
    tickets: int
    triage_deliveries: int
    escalated: int
    events_emitted: int
    escalation_deliveries: int
    acks_posted: int
    acks_resent: int
    waits_resolved_by_event: int
    waits_timed_out: int
    re_escalations: int
    unacknowledged: int
    duplicates_suppressed: int
    relay_lag_p50_ms: float
    relay_lag_p99_ms: float
    tasks_lost: int
    effects_duplicated: int
    wall_s: float
    ok: bool


def _acknowledges(ticket: str, attempt: int) -> bool:
    """Whether the on-call person answers this attempt: 70% of first ones, 50% of second."""
    roll = int(hashlib.sha256(f"{ticket}/{attempt}".encode()).hexdigest(), 16) % 100
    return roll < (70 if attempt == 1 else 50)


class OnCallTeam:
    """Acknowledges assignments through the ingest route, as people would."""

    def __init__(self, url: str, run: str, endpoint: str) -> None:
        self.url, self.run, self.endpoint = url, run, endpoint
        self.answered: set[tuple[str, int]] = set()
        self.posted = self.resent = 0
        self.stop = threading.Event()

    def _post(self, ticket: str, attempt: int, person: str) -> dict[str, Any]:
        body = json.dumps({"ticket": ticket, "by": person}).encode()
        request = urllib.request.Request(
            f"{self.endpoint}/events/ticket.acknowledged?key={ticket}", data=body,
            headers={"Content-Type": "application/json",
                     "Idempotency-Key": f"ack:{ticket}:{attempt}"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
        return answer

    def run_forever(self) -> None:
        from tasks.schema import SUPPORT_ASSIGNMENTS

        a = SUPPORT_ASSIGNMENTS.c
        while not self.stop.wait(0.2):
            with transaction(self.url) as conn:
                open_ = conn.execute(
                    select(a.ticket_id, a.attempt, a.person).where(
                        (a.status == "assigned") & a.ticket_id.like(f"{self.run}-%")
                    )
                ).all()
            for ticket, attempt, person in open_:
                if (ticket, attempt) in self.answered or not _acknowledges(ticket, attempt):
                    continue
                self.answered.add((ticket, attempt))
                self._post(ticket, attempt, person)
                self.posted += 1
                if self.posted % 5 == 0:
                    # A person who clicks twice: the same Idempotency-Key.
                    assert self._post(ticket, attempt, person)["stored"] is False
                    self.resent += 1


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 1)


def _closed(url: str, run: str, escalated: int) -> bool:
    """Every escalated ticket acknowledged, or its second attempt timed out."""
    from tasks.schema import SUPPORT_ASSIGNMENTS

    a = SUPPORT_ASSIGNMENTS.c
    with transaction(url) as conn:
        done = conn.execute(
            select(func.count(func.distinct(a.ticket_id))).where(
                a.ticket_id.like(f"{run}-%")
                & ((a.status == "acknowledged") | ((a.status == "timed_out") & (a.attempt == 2)))
            )
        ).scalar_one()
    return int(done) >= escalated


def run_support(
    app: Celery,
    settings: Settings,
    *,
    tickets: int,
    ack_timeout_s: float,
    timeout_s: float,
    seed: int = 5,
) -> SupportReport:
    from agents import support
    from fleetworks.ingest import serve

    run = f"sup{uuid.uuid4().hex[:6]}"
    stream = list(support.stream(tickets, seed, prefix=run))
    escalated = sum(support.should_escalate(t) for t in stream)
    env = {
        "FLEET_SUPPORT_ACK_TIMEOUT_S": str(ack_timeout_s),
        "FLEET_PRICING_PRODUCTS": "0",
        "FLEET_MENTIONS_PER_POLL": "0",
    }
    fleet = FleetProcesses(settings, env=env)
    server = serve(Fleet.of(app), "127.0.0.1", 0)
    host, port = server.server_address[:2]
    team = OnCallTeam(settings.database, run, f"http://{host!s}:{port}")
    watcher = threading.Thread(target=team.run_forever, daemon=True)
    started = time.monotonic()
    try:
        fleet.worker("support-worker")
        fleet.relay("support-relay")
        wait_workers(app, [f"support-worker@{fleet.hostname}"], timeout_s=60)
        watcher.start()
        payloads = [t.model_dump() for t in stream]
        deliveries = payloads + payloads[::10]
        echo(f"demo {run}: {tickets} tickets ({escalated} to escalate), "
             f"{len(deliveries)} deliveries, acks time out after {ack_timeout_s:g} s")  # fmt: skip
        task_ids = enqueue_many(app, TRIAGE, deliveries)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not _closed(settings.database, run, escalated):
            time.sleep(0.25)
        wall = time.monotonic() - started
    finally:
        team.stop.set()
        server.shutdown()
        fleet.stop()
    return _report(settings.database, run, tickets=tickets, escalated=escalated,
                   task_ids=task_ids, team=team, wall_s=wall)  # fmt: skip


def _report(
    url: str,
    run: str,
    *,
    tickets: int,
    escalated: int,
    task_ids: list[str],
    team: OnCallTeam,
    wall_s: float,
) -> SupportReport:
    from tasks.schema import SUPPORT_ASSIGNMENTS

    a, o, e, w = SUPPORT_ASSIGNMENTS.c, OUTCOMES.c, GUARD_EVENTS.c, WAITS.c
    mine = f"{run}-%"
    with transaction(url) as conn:
        emitted = dict(
            conn.execute(
                select(EVENTS.c.event_id, EVENTS.c.created_at).where(
                    (EVENTS.c.topic == "ticket.escalated") & EVENTS.c.key.like(mine)
                )
            ).all()
        )
        keys = {f"{ESCALATION}|{i}": i for i in emitted}
        first_runs = conn.execute(
            select(o.idempotency_key, o.started_at).where(o.idempotency_key.in_(list(keys)))
        ).all()
        mine_triaged = (o.agent == TRIAGE) & o.idempotency_key.like(f"ticket:{mine}")
        triage_settled = conn.execute(
            select(func.count()).where(mine_triaged & o.status.in_(TERMINAL))
        ).scalar_one()
        attempts = conn.execute(
            select(a.attempt, a.status, func.count())
            .where(a.ticket_id.like(mine))
            .group_by(a.attempt, a.status)
        ).all()
        waits: dict[str, int] = dict(
            conn.execute(
                select(w.state, func.count())
                .where(w.agent == ESCALATION)
                .where(w.key.in_(list(keys)) | w.root_key.in_(list(keys)))
                .group_by(w.state)
            ).all()
        )
        guard: dict[str, int] = dict(
            conn.execute(
                select(e.kind, func.count())
                .where(e.agent.in_([TRIAGE, ESCALATION]))
                .where(e.idempotency_key.like(f"ticket:{mine}") | e.idempotency_key.in_(list(keys)))
                .group_by(e.kind)
            ).all()
        )
    lags = [
        (_utc(start) - _utc(emitted[keys[k]])).total_seconds() * 1000 for k, start in first_runs
    ]
    by: dict[tuple[int, str], int] = {(int(n), str(s)): int(c) for n, s, c in attempts}
    firsts = sum(c for (n, _), c in by.items() if n == 1)
    seconds = sum(c for (n, _), c in by.items() if n == 2)
    duplicated = int(guard.get(EventKind.DUPLICATE_EFFECT, 0))
    lost = tickets - int(triage_settled)
    closed_ok = (
        len(emitted) == escalated
        and firsts == escalated
        and seconds == by.get((1, "timed_out"), 0)
        and by.get((1, "assigned"), 0) + by.get((2, "assigned"), 0) == 0
    )
    return SupportReport(
        tickets=tickets,
        triage_deliveries=len(task_ids),
        escalated=escalated,
        events_emitted=len(emitted),
        escalation_deliveries=len(first_runs),
        acks_posted=team.posted,
        acks_resent=team.resent,
        waits_resolved_by_event=int(waits.get("resolved", 0)),
        waits_timed_out=int(waits.get("timed_out", 0)),
        re_escalations=seconds,
        unacknowledged=by.get((2, "timed_out"), 0),
        duplicates_suppressed=int(guard.get(EventKind.SKIPPED_DUPLICATE, 0)),
        relay_lag_p50_ms=_percentile(lags, 0.5),
        relay_lag_p99_ms=_percentile(lags, 0.99),
        tasks_lost=lost,
        effects_duplicated=duplicated,
        wall_s=round(wall_s, 1),
        ok=lost == 0 and duplicated == 0 and closed_ok,
    )


def as_dict(report: SupportReport) -> dict[str, Any]:
    return asdict(report)


def render(r: SupportReport) -> str:
    return "\n".join(
        [
            f"support tickets: {'OK' if r.ok else 'NOT OK'}",
            f"  tickets    {r.tickets} ({r.triage_deliveries} deliveries), escalated "
            f"{r.escalated}, events emitted {r.events_emitted}",
            f"  waits      resolved by an acknowledgement {r.waits_resolved_by_event}, timed out "
            f"{r.waits_timed_out}; re-escalated {r.re_escalations}, unacknowledged "
            f"{r.unacknowledged}",
            f"  acks       posted {r.acks_posted}, resent {r.acks_resent} (no-ops); duplicates "
            f"suppressed {r.duplicates_suppressed}",
            f"  relay lag  p50 {r.relay_lag_p50_ms} ms, p99 {r.relay_lag_p99_ms} ms; lost "
            f"{r.tasks_lost}, duplicated {r.effects_duplicated}; {r.wall_s} s",
        ]
    )
