"""The support-ticket agents' logic (no I/O): which tickets escalate, who is
on call, and a seeded stream of simulated tickets.

A very negative, high-priority ticket is escalated; an escalation is
assigned to the on-call person of its attempt (the roster in order, starting
at a place fixed by the ticket), and re-escalated once, to the next person,
when nobody acknowledges it in time.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: Sentiment at or below which a high-priority ticket is escalated.
ESCALATE_AT = -0.6
#: Escalations of one ticket: the first assignment and one re-escalation.
MAX_ATTEMPTS = 2
ROSTER = ("ana", "bo", "chen", "dara", "eli")


class Ticket(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=100)
    customer: str = Field(min_length=1, max_length=100)
    text: str = Field(max_length=5000)
    #: -1 (furious) .. 1 (delighted), from an upstream classifier.
    sentiment: float = Field(ge=-1.0, le=1.0)
    priority: Literal["low", "normal", "high"]


def should_escalate(ticket: Ticket) -> bool:
    return ticket.priority == "high" and ticket.sentiment <= ESCALATE_AT


def on_call(ticket_id: str, attempt: int) -> str:
    """The person an escalation's ``attempt`` (1-based) is assigned to."""
    start = int(hashlib.sha256(ticket_id.encode()).hexdigest(), 16) % len(ROSTER)
    return ROSTER[(start + attempt - 1) % len(ROSTER)]


def stream(n: int, seed: int, prefix: str = "T") -> Iterator[Ticket]:
    """``n`` simulated tickets; about one in five escalates."""
    rng = random.Random(seed)
    for i in range(n):
        angry = rng.random() < 0.3
        yield Ticket(
            id=f"{prefix}-{i:05d}",
            customer=f"customer-{rng.randrange(1000):03d}",
            text="this is broken again" if angry else "a question about my invoice",
            sentiment=round(rng.uniform(-1.0, -0.6) if angry else rng.uniform(-0.5, 1.0), 3),
            priority=rng.choice(["high", "high", "normal", "low"]) if angry else "normal",
        )
