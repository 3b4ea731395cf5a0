"""Celery tasks of the mentions agent: a poller and a per-mention responder."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from sqlalchemy import insert, update

from agents import mentions
from config.celery import app, fleet
from fleetworks.claims import StaleWriteError, now
from fleetworks.context import AgentSpec, RunContext
from fleetworks.db import transaction, upsert
from fleetworks.enqueue import enqueue_many
from fleetworks.models import MENTIONS, RESPONSES
from fleetworks.ticks import Tick

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
            ins = upsert(conn, _rows)
            stmt = ins.values(
                mention_id=mention.mention_id,
                brand=mention.brand,
                author=mention.author,
                text=mention.text,
                status="processing",
                fencing_token=fencing_token,
                updated_at=now(),
            )
            upserted = stmt.on_conflict_do_update(
                index_elements=[_rows.c.mention_id],
                set_={"status": "processing", "fencing_token": fencing_token, "updated_at": now()},
                where=_rows.c.fencing_token <= fencing_token,
            ).returning(_rows.c.mention_id)
            # RETURNING, not rowcount: drivers disagree on rowcount for upserts.
            if conn.execute(upserted).first() is None:
                raise StaleWriteError(f"mention {mention.mention_id}: stale token {fencing_token}")

    def _settle(self, mention_id: str, status: str, fencing_token: int) -> None:
        done = self._ctx.db.execute(
            update(_rows)
            .where((_rows.c.mention_id == mention_id) & (_rows.c.fencing_token <= fencing_token))
            .values(status=status, fencing_token=fencing_token, updated_at=now())
        )
        if done.rowcount != 1:
            raise StaleWriteError(f"mention {mention_id}: stale token {fencing_token}")

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


@fleet.agent(SPEC)
def respond(ctx: RunContext, mention: mentions.Mention) -> dict[str, str]:
    return mentions.handle(mention, SqlMentionSink(ctx), ctx.fencing_token)


class MentionsTick(Tick):
    """A tick of the mentions poller: how many mentions one window holds."""

    limit: int = Field(default=20, ge=0, le=10_000)


POLL_SPEC = AgentSpec(
    name=POLL, payload=MentionsTick, key=lambda t: t.tick, on_contention="skip", time_limit_s=30.0
)


@fleet.agent(POLL_SPEC)
def poll(ctx: RunContext, tick: MentionsTick) -> dict[str, Any]:
    """Read the feed's window of this tick's slot and fan the mentions out.

    Each mention's key is its id, so a tick run twice, or two windows that
    overlap, answer a mention once.
    """
    settings = fleet.settings
    window = int(tick.slot.timestamp() // settings.mentions_poll_interval_s)
    found = mentions.MentionFeed(settings.mentions_seed).window(window, tick.limit)
    ctx.check_lease()
    enqueue_many(app, RESPOND, (m.model_dump() for m in found))
    return {"window": window, "enqueued": len(found)}
