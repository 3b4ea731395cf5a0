"""Celery tasks of the support agents: triage emits escalations, escalation
assigns them and waits for an acknowledgement.

``support.triage`` records each ticket and, for a very negative
high-priority one, emits ``ticket.escalated`` in the same transaction.
``support.escalation`` subscribes to it: it assigns the ticket to the
person on call and ends its run waiting for ``ticket.acknowledged`` with the
ticket's id (sent by a person through ``POST /events/ticket.acknowledged``),
holding no worker. Acknowledged: the assignment is closed. Not in
``FLEET_SUPPORT_ACK_TIMEOUT_S``: it is re-escalated once, to the next
person, and waits again; a second timeout closes it as ``timed_out``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, insert, select, update

from agents import support
from config.settings import support as settings
from fleetworks import AgentSpec, RunContext, shared_agent
from fleetworks.claims import now
from fleetworks.events import Event
from tasks.schema import SUPPORT_ASSIGNMENTS, SUPPORT_TICKETS

TRIAGE = "support.triage"
ESCALATION = "support.escalation"
ESCALATED = "ticket.escalated"
ACKNOWLEDGED = "ticket.acknowledged"

_a = SUPPORT_ASSIGNMENTS.c


@shared_agent(AgentSpec(name=TRIAGE, payload=support.Ticket, key=lambda t: f"ticket:{t.id}"))
def triage(ctx: RunContext, ticket: support.Ticket) -> dict[str, Any]:
    escalate = support.should_escalate(ticket)
    ctx.db.execute(
        insert(SUPPORT_TICKETS).values(
            ticket_id=ticket.id,
            priority=ticket.priority,
            sentiment=ticket.sentiment,
            escalated=escalate,
            fencing_token=ctx.fencing_token,
            created_at=now(),
        )
    )
    if escalate:
        data = {"ticket": ticket.id, "customer": ticket.customer, "sentiment": ticket.sentiment}
        ctx.emit(ESCALATED, data, key=ticket.id)
    return {"ticket": ticket.id, "escalated": escalate}


def _assign(ctx: RunContext, ticket: str, attempt: int) -> Any:
    person = support.on_call(ticket, attempt)
    ctx.db.execute(
        insert(SUPPORT_ASSIGNMENTS).values(
            ticket_id=ticket,
            attempt=attempt,
            person=person,
            status="assigned",
            fencing_token=ctx.fencing_token,
            assigned_at=now(),
        )
    )
    return ctx.wait_for(ACKNOWLEDGED, {"ticket": ticket}, timeout_s=settings.ack_timeout_s)


def _close(ctx: RunContext, ticket: str, attempt: int, status: str, by: str | None) -> None:
    ctx.db.execute(
        update(SUPPORT_ASSIGNMENTS)
        .where((_a.ticket_id == ticket) & (_a.attempt == attempt) & (_a.status == "assigned"))
        .values(status=status, acknowledged_by=by, closed_at=now(), fencing_token=ctx.fencing_token)
    )


@shared_agent(AgentSpec(name=ESCALATION, payload=Event, on=(ESCALATED,)))
def escalation(ctx: RunContext, event: Event) -> Any:
    ticket = str(event.data["ticket"])
    if ctx.resumed is None:
        return _assign(ctx, ticket, 1)
    attempt = int(
        ctx.db.execute(select(func.max(_a.attempt)).where(_a.ticket_id == ticket)).scalar_one()
    )
    acknowledged = ctx.resumed.event
    if acknowledged is not None:
        by = str(acknowledged.data.get("by") or "someone")
        _close(ctx, ticket, attempt, "acknowledged", by)
        return {"ticket": ticket, "attempt": attempt, "acknowledged_by": by}
    _close(ctx, ticket, attempt, "timed_out", None)
    if attempt < support.MAX_ATTEMPTS:
        return _assign(ctx, ticket, attempt + 1)
    return {"ticket": ticket, "attempt": attempt, "unacknowledged": True}
