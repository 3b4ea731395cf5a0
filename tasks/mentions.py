"""Celery tasks of the mentions agent: a poller and a per-mention responder."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from sqlalchemy import insert

from agents import mentions
from config.settings import mentions as settings
from fleetworks import AgentSpec, RunContext, Tick, enqueue_many, shared_agent
from fleetworks.claims import now
from fleetworks.db import transaction
from fleetworks.fenced import fenced_update, fenced_upsert
from tasks.schema import MENTIONS, RESPONSES

RESPOND = "mentions.respond"
POLL = "mentions.poll"

_rows = MENTIONS


class SqlMentionSink:
    """Mention status and responses in the results database, fenced.

    A status write is refused when the row already carries a newer fencing
    token; the response insert hits ``UNIQUE(mention_id)`` on a duplicate.
    """

    def __init__(self, ctx: RunContext) -> None:
        self._ctx = ctx

    def processing(self, mention: mentions.Mention, fencing_token: int) -> None:
        with transaction(self._ctx.database_url) as conn:
            fenced_upsert(
                conn, _rows, ["mention_id"],
                {"mention_id": mention.mention_id, "brand": mention.brand,
                 "author": mention.author, "text": mention.text, "status": "processing",
                 "updated_at": now()},
                fencing_token,
            )  # fmt: skip

    def _settle(self, mention_id: str, status: str, fencing_token: int) -> None:
        fenced_update(
            self._ctx.db, _rows, _rows.c.mention_id == mention_id,
            {"status": status, "updated_at": now()}, fencing_token,
        )  # fmt: skip

    def respond(self, mention: mentions.Mention, text: str, fencing_token: int) -> None:
        self._ctx.db.execute(
            insert(RESPONSES).values(
                mention_id=mention.mention_id,
                text=text,
                fencing_token=fencing_token,
                created_at=now(),
            )
        )
        self._settle(mention.mention_id, "responded", fencing_token)

    def ignore(self, mention: mentions.Mention, reason: str, fencing_token: int) -> None:
        self._settle(mention.mention_id, "ignored", fencing_token)


SPEC = AgentSpec(
    name=RESPOND,
    payload=mentions.Mention,
    key=lambda m: f"mention:{m.mention_id}",
    on_contention="retry",
    time_limit_s=30.0,
)


@shared_agent(SPEC)
def respond(ctx: RunContext, mention: mentions.Mention) -> dict[str, str]:
    return mentions.handle(mention, SqlMentionSink(ctx), ctx.fencing_token)


class MentionsTick(Tick):
    """A tick of the mentions poller: how many mentions one window holds."""

    limit: int = Field(default=20, ge=0, le=10_000)


POLL_SPEC = AgentSpec(
    name=POLL, payload=MentionsTick, key=lambda t: t.tick, on_contention="skip", time_limit_s=30.0
)


@shared_agent(POLL_SPEC)
def poll(ctx: RunContext, tick: MentionsTick) -> dict[str, Any]:
    """Read the feed's window of this tick's slot and fan the mentions out.

    Each mention's key is its id, so a tick run twice, or two windows that
    overlap, answer a mention once.
    """
    window = int(tick.slot.timestamp() // settings.poll_interval_s)
    found = mentions.MentionFeed(settings.seed).window(window, tick.limit)
    ctx.check_lease()
    assert ctx.app is not None
    enqueue_many(ctx.app, RESPOND, (m.model_dump() for m in found))
    return {"window": window, "enqueued": len(found)}
