"""Celery tasks of the probe agent, and the plain-Celery twin used as a peer."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert

from agents import probe
from config.celery import app, fleet
from fleetworks.claims import now
from fleetworks.context import AgentSpec, RunContext
from fleetworks.models import PROBE_EFFECTS

GUARDED = "probe.run"
PLAIN = "probe.plain"


class SqlProbeSink:
    """The probe ledger; the effect transaction opens only when a row is written."""

    def __init__(self, ctx: RunContext) -> None:
        self._ctx = ctx

    def record(self, effect_key: str, fencing_token: int) -> None:
        self._ctx.db.execute(
            insert(PROBE_EFFECTS).values(
                effect_key=effect_key,
                fencing_token=fencing_token,
                worker=self._ctx.worker,
                created_at=now(),
            )
        )


SPEC = AgentSpec(
    name=GUARDED,
    payload=probe.Probe,
    key=lambda p: f"probe:{p.id}",
    on_contention="retry",
    time_limit_s=30.0,
)


@fleet.agent(SPEC)
def run(ctx: RunContext, payload: probe.Probe) -> dict[str, str]:
    return probe.run(payload, SqlProbeSink(ctx), ctx.fencing_token, attempt=ctx.attempts)


@app.task(name=PLAIN, acks_late=True, reject_on_worker_lost=True, ignore_result=True)  # type: ignore[untyped-decorator]
def plain(payload: dict[str, Any] | None = None, key: str | None = None) -> None:
    """A no-op with the same delivery settings as an agent task, and no guard."""
    return None
