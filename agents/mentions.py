"""The mentions agent: watch a social feed for brand mentions and answer some.

A simulated feed stands in for a social-media API. Like a real polling API
it returns overlapping windows, so the same mention arrives more than once,
and two pollers (or a repeated poll) hand the same mention to two workers.
The behaviour decides respond or ignore; the sink it is given records the
mention's status (``processing`` -> ``responded | ignored``) and the response.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

BRANDS = ("acme", "globex", "initech", "umbrella")
AUTHORS = tuple(f"user{i:03d}" for i in range(200))
_QUESTIONS = ("does {b} ship to Canada?", "how do I reset my {b} password?")
_COMPLAINTS = ("{b} broke again, third time this week", "still waiting on {b} support")
_PRAISE = ("loving the new {b} release", "{b} just saved my afternoon")
_NOISE = ("saw a {b} billboard today", "{b} {b} {b}", "cheap {b} deals http://spam.example")


class Mention(BaseModel):
    """One mention of a brand, as the feed delivers it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mention_id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._:-]+$")
    brand: str = Field(min_length=1, max_length=100)
    author: str = Field(min_length=1, max_length=100)
    text: str = Field(max_length=2000)
    sentiment: float = Field(ge=-1.0, le=1.0)
    followers: int = Field(ge=0)


@dataclass(frozen=True, slots=True)
class Decision:
    action: Literal["respond", "ignore"]
    #: The reply for ``respond``, the reason for ``ignore``.
    text: str


class MentionSink(Protocol):
    """Where the behaviour's effects go. Every write carries the fencing token."""

    def processing(self, mention: Mention, fencing_token: int) -> None: ...

    def respond(self, mention: Mention, text: str, fencing_token: int) -> None: ...

    def ignore(self, mention: Mention, reason: str, fencing_token: int) -> None: ...


def decide(mention: Mention) -> Decision:
    """Respond to questions, complaints and loud praise; ignore spam and chatter."""
    text = mention.text.lower()
    if "http://" in text or "https://" in text:
        return Decision("ignore", "contains a link: likely spam")
    if mention.author.lower() == mention.brand.lower():
        return Decision("ignore", "our own account")
    if "?" in text:
        return Decision(
            "respond",
            f"@{mention.author} thanks for asking! A {mention.brand} "
            "specialist will DM you shortly.",
        )
    if mention.sentiment <= -0.3:
        return Decision(
            "respond",
            f"@{mention.author} sorry to hear that. We're on it; please DM us your order number.",
        )
    if mention.sentiment >= 0.5 and mention.followers >= 1000:
        return Decision("respond", f"@{mention.author} thank you, that means a lot!")
    return Decision("ignore", "neutral chatter")


def handle(mention: Mention, sink: MentionSink, fencing_token: int) -> dict[str, str]:
    """Mark the mention in progress, decide, and apply the decision to ``sink``."""
    sink.processing(mention, fencing_token)
    decision = decide(mention)
    if decision.action == "respond":
        sink.respond(mention, decision.text, fencing_token)
    else:
        sink.ignore(mention, decision.text, fencing_token)
    return {"mention_id": mention.mention_id, "action": decision.action}


class MentionFeed:
    """A deterministic, seedable stand-in for a social-media search API."""

    def __init__(self, seed: int, overlap: float = 0.25) -> None:
        if not 0.0 <= overlap < 1.0:
            raise ValueError("overlap must be in [0, 1)")
        self.seed = seed
        self.overlap = overlap

    def mention(self, ident: str, rng: random.Random) -> Mention:
        brand = rng.choice(BRANDS)
        kind = rng.random()
        if kind < 0.2:
            text, sentiment = rng.choice(_QUESTIONS), rng.uniform(-0.2, 0.3)
        elif kind < 0.45:
            text, sentiment = rng.choice(_COMPLAINTS), rng.uniform(-1.0, -0.3)
        elif kind < 0.7:
            text, sentiment = rng.choice(_PRAISE), rng.uniform(0.4, 1.0)
        else:
            text, sentiment = rng.choice(_NOISE), rng.uniform(-0.2, 0.2)
        return Mention(
            mention_id=ident,
            brand=brand,
            author=rng.choice(AUTHORS),
            text=text.format(b=brand),
            sentiment=round(sentiment, 3),
            followers=int(rng.paretovariate(1.2) * 50),
        )

    def fresh(self, slot: int, limit: int) -> list[Mention]:
        """The ``limit`` mentions first posted during ``slot``."""
        return [
            self.mention(f"m-{self.seed}-{slot}-{i}", random.Random(f"{self.seed}:{slot}:{i}"))
            for i in range(limit)
        ]

    def window(self, slot: int, limit: int) -> list[Mention]:
        """What a poll at ``slot`` returns: the slot's new mentions after a
        share of the previous slot's, as a search API with an overlapping
        time window re-reports recent results."""
        if slot <= 0:
            return self.fresh(slot, limit)
        repeat = self.fresh(slot - 1, limit)[: int(limit * self.overlap)]
        return repeat + self.fresh(slot, limit)

    def stream(self, count: int, duplicate_rate: float, prefix: str = "d") -> Iterator[Mention]:
        """``count`` distinct mentions, each repeated with ``duplicate_rate``
        probability (a repeat comes a little later, as a re-poll delivers it)."""
        rng = random.Random(self.seed)
        backlog: list[Mention] = []
        for i in range(count):
            m = self.mention(
                f"{prefix}-{self.seed}-{i}", random.Random(f"{self.seed}:{prefix}:{i}")
            )
            yield m
            if rng.random() < duplicate_rate:
                backlog.append(m)
            if backlog and rng.random() < 0.5:
                yield backlog.pop(rng.randrange(len(backlog)))
        yield from backlog
