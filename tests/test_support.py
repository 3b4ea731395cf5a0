"""The support agents: triage emits, escalation assigns and waits, a person
acknowledges through an event or the wait times out and re-escalates once.

In process through the plugin's ``fleet`` (real Redis, SQLite migrated with
the deployment's branch), a real worker of its app and the relay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from agents.support import on_call
from config.settings import support as support_settings
from fleetworks import events
from fleetworks.agent import Fleet
from fleetworks.db import transaction
from fleetworks.events import Relay
from fleetworks.migrate import upgrade
from fleetworks.models import EVENTS
from tasks.schema import SUPPORT_ASSIGNMENTS, SUPPORT_TICKETS
from tests.conftest import wait_for

MIGRATIONS = str(Path(__file__).resolve().parent.parent / "config" / "migrations")
ANGRY = {"id": "T-1", "customer": "c-1", "text": "broken", "sentiment": -0.9, "priority": "high"}
CALM = {"id": "T-2", "customer": "c-2", "text": "thanks", "sentiment": 0.5, "priority": "high"}


@pytest.fixture
def support(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Fleet:
    upgrade(fleet.settings.database, MIGRATIONS)
    monkeypatch.setattr(support_settings, "ack_timeout_s", 30.0)
    return fleet


def assignments(fleet: Fleet) -> list[tuple[int, str, str, str | None]]:
    a = SUPPORT_ASSIGNMENTS.c
    with transaction(fleet.settings.database) as conn:
        rows = conn.execute(
            select(a.attempt, a.person, a.status, a.acknowledged_by).order_by(a.attempt)
        ).all()
    return [(int(n), str(p), str(s), b) for n, p, s, b in rows]


def topics(fleet: Fleet) -> list[str]:
    with transaction(fleet.settings.database) as conn:
        return [
            str(t)
            for t in conn.execute(select(EVENTS.c.topic).order_by(EVENTS.c.position)).scalars()
        ]


def test_triage_escalates_only_very_negative_high_priority_tickets(
    support: Fleet, run_agent: Any
) -> None:
    assert run_agent("support.triage", ANGRY).returned == {"ticket": "T-1", "escalated": True}
    assert run_agent("support.triage", CALM).returned == {"ticket": "T-2", "escalated": False}
    assert topics(support) == ["ticket.escalated"]
    with transaction(support.settings.database) as conn:
        flags = dict(
            conn.execute(select(SUPPORT_TICKETS.c.ticket_id, SUPPORT_TICKETS.c.escalated)).all()
        )
    assert flags == {"T-1": True, "T-2": False}


def test_an_escalation_waits_and_is_closed_by_the_acknowledgement(
    support: Fleet, run_agent: Any, fleet_worker: Any
) -> None:
    run_agent("support.triage", ANGRY)
    relay = Relay(support)
    relay.relay_once()
    first = on_call("T-1", 1)
    wait_for(lambda: assignments(support) == [(1, first, "assigned", None)], 30, "assignment")
    events.publish("ticket.acknowledged", {"ticket": "T-1", "by": first}, app=support.app)
    relay.relay_once()
    wait_for(lambda: assignments(support) == [(1, first, "acknowledged", first)], 30, "the ack")
    assert relay.resolved == 1 and relay.fire_timers() == 0


def test_an_unacknowledged_escalation_moves_on_once_then_closes(
    support: Fleet, run_agent: Any, fleet_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(support_settings, "ack_timeout_s", 0.3)
    run_agent("support.triage", ANGRY)
    relay = Relay(support)
    relay.relay_once()
    first, second = on_call("T-1", 1), on_call("T-1", 2)
    assert first != second
    wait_for(lambda: len(assignments(support)) == 1, 30, "the first assignment")
    # Nobody answers: the timer re-escalates to the next person on call
    wait_for(lambda: relay.fire_timers() == 1, 10, "the first deadline")
    wait_for(lambda: len(assignments(support)) == 2, 30, "the re-escalation")
    # and nobody answers again: the escalation is closed unacknowledged
    wait_for(lambda: relay.fire_timers() == 1, 10, "the second deadline")
    wait_for(
        lambda: (
            assignments(support) == [(1, first, "timed_out", None), (2, second, "timed_out", None)]
        ),
        30,
        "both attempts closed",
    )
    assert relay.fire_timers() == 0
