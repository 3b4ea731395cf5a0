"""Celery tasks of the pricing agent: a poller per tick, a repricer per product.

``pricing.poll`` runs once per tick (its key is the tick id) and fans out one
``pricing.reprice`` per product in pipelined batches. A reprice's key is the
product and the tick, its lock is the product: a tick repeated, or a product
delivered twice, prices the product once per tick. The reprice reads the
product's state from the state store, decides, writes the new state with its
fencing token and records the decision in ``price_changes``, all in the
transaction that commits the outcome. When the cheapest competitor dropped by
more than ``FLEET_PRICING_DROP_ALERT`` since the previous window, it also
emits ``competitor.price_dropped``, which ``pricing.alert`` records.

Both are batch agents of 100 with a batch behaviour (``Batch(together=...)``):
a batch of reprices reads every product's state in one select and writes the
states, their history and the price rows with one executemany each; a batch
of alerts is one executemany. The per-item behaviours beside them do the
same for one key, and run when a batch behaviour fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pydantic import Field
from sqlalchemy import insert

from agents import pricing
from config.settings import pricing as settings
from fleetworks import AgentSpec, Batch, RunContext, Tick, enqueue_many, shared_agent, state
from fleetworks.claims import now
from fleetworks.events import Event
from tasks.schema import PRICE_ALERTS, PRICE_CHANGES

POLL = "pricing.poll"
REPRICE = "pricing.reprice"
ALERT = "pricing.alert"
PRICE_DROPPED = "competitor.price_dropped"


class PricingTick(Tick):
    """A tick of the pricing poller: the catalogue it covers."""

    products: int = Field(ge=0, le=1_000_000)


def catalogue(size: int) -> pricing.Catalogue:
    return pricing.Catalogue(settings.seed, size, settings.max_step)


def window_of(tick: Tick) -> int:
    """The market window a tick sees: its slot in pricing intervals since the epoch."""
    return int(tick.slot.timestamp() // settings.interval_s)


#: Built once: executed with each reprice's values (one statement per product).
_RECORD_CHANGE = insert(PRICE_CHANGES)

#: Products one reprice run takes at most.
REPRICE_BATCH = 100


def reprice_key(product_id: str, tick: str) -> str:
    return f"{product_id}|{tick}"


@shared_agent(
    AgentSpec(
        name=POLL,
        payload=PricingTick,
        key=lambda t: t.tick,
        on_contention="skip",
        time_limit_s=60.0,
    )
)
def poll(ctx: RunContext, tick: PricingTick) -> dict[str, Any]:
    """Fan the catalogue out: one reprice task per product, published in bulk."""
    window = window_of(tick)
    ctx.check_lease()
    payloads = (
        {"product_id": pid, "tick": tick.tick, "window": window}
        for pid in catalogue(tick.products).ids()
    )
    assert ctx.app is not None
    sent = enqueue_many(
        ctx.app, REPRICE, payloads, key=lambda p: reprice_key(p["product_id"], tick.tick)
    )
    return {"window": window, "enqueued": len(sent)}


def _announce(
    ctx: RunContext, job: pricing.Reprice, product: pricing.Product, market: pricing.Market
) -> None:
    """Emit ``competitor.price_dropped`` if the cheapest competitor dropped enough."""
    dropped = pricing.price_drop(
        catalogue(0).market(product, job.window - 1), market, settings.drop_alert
    )
    if dropped is not None:
        data = {"product": product.product_id, "tick": job.tick,
                "from_cents": dropped[0], "to_cents": dropped[1]}  # fmt: skip
        ctx.emit(PRICE_DROPPED, data, key=product.product_id)


def _change(
    ctx: RunContext, job: pricing.Reprice, old: int, decision: pricing.Decision, version: int
) -> dict[str, Any]:
    """The ``price_changes`` row of one reprice."""
    return {
        "product_id": job.product_id, "tick": job.tick, "old_cents": old,
        "new_cents": decision.price_cents, "version": version,
        "fencing_token": ctx.fencing_token, "created_at": now(),
    }  # fmt: skip


def _next_state(
    job: pricing.Reprice,
    product: pricing.Product,
    market: pricing.Market,
    decided: dict[str, tuple[int, pricing.Decision]],
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The state update of one reprice; records what it decided in ``decided``."""

    def next_state(current: dict[str, Any]) -> dict[str, Any]:
        price = int(current.get("price_cents", product.list_cents))
        decision = pricing.decide(price, product, market)
        decided[product.product_id] = (price, decision)
        return {"price_cents": decision.price_cents, "strategy": product.strategy.value,
                "tick": job.tick}  # fmt: skip

    return next_state


def reprice_together(runs: Sequence[RunContext]) -> list[dict[str, Any]]:
    """A batch of reprices at once: one read of every product's state, one
    write of each table (see ``Batch.together``); the same as :func:`reprice`
    run per product."""
    decided: dict[str, tuple[int, pricing.Decision]] = {}
    seen, changes = [], []
    for ctx in runs:
        job = ctx.payload
        product = catalogue(0).product(job.product_id)
        market = catalogue(0).market(product, job.window)
        seen.append((product, market))
        changes.append(state.Change(job.product_id, _next_state(job, product, market, decided),
                                    ctx.fencing_token))  # fmt: skip
    db = runs[0].db
    written = state.update_many_in(db, REPRICE, changes, writer=runs[0].worker)
    rows, results = [], []
    for ctx, (product, market), version in zip(runs, seen, written, strict=True):
        job = ctx.payload
        old, decision = decided[job.product_id]
        _announce(ctx, job, product, market)
        rows.append(_change(ctx, job, old, decision, version.version))
        results.append({"price_cents": decision.price_cents, "version": version.version,
                        "limited_by": decision.limited_by, "conflicts": 0})  # fmt: skip
    db.execute(_RECORD_CHANGE, rows)
    return results


@shared_agent(
    AgentSpec(
        name=REPRICE,
        payload=pricing.Reprice,
        key=lambda r: reprice_key(r.product_id, r.tick),
        entity=lambda r: f"product:{r.product_id}",
        on_contention="retry",
        time_limit_s=30.0,
        # Many products per run, each still priced once per tick (fleetworks.batch).
        batch=Batch(size=REPRICE_BATCH, together=reprice_together),
    )
)
def reprice(ctx: RunContext, job: pricing.Reprice) -> dict[str, Any]:
    product = catalogue(0).product(job.product_id)
    market = catalogue(0).market(product, job.window)
    decided: dict[str, tuple[int, pricing.Decision]] = {}
    written, conflicts = state.update_in(
        ctx.db, REPRICE, job.product_id, _next_state(job, product, market, decided),
        fencing_token=ctx.fencing_token, writer=ctx.worker,
    )  # fmt: skip
    old, decision = decided[job.product_id]
    _announce(ctx, job, product, market)
    ctx.db.execute(_RECORD_CHANGE, _change(ctx, job, old, decision, written.version))
    return {"price_cents": decision.price_cents, "version": written.version,
            "limited_by": decision.limited_by, "conflicts": conflicts}  # fmt: skip


def _alert_row(ctx: RunContext, event: Event) -> dict[str, Any]:
    d = event.data
    return {
        "event_id": event.id, "product_id": d["product"], "tick": d["tick"],
        "from_cents": d["from_cents"], "to_cents": d["to_cents"],
        "fencing_token": ctx.fencing_token, "created_at": now(),
    }  # fmt: skip


def _alert_result(event: Event) -> dict[str, Any]:
    d = event.data
    return {"product": d["product"], "drop_cents": d["from_cents"] - d["to_cents"]}


def alert_together(runs: Sequence[RunContext]) -> list[dict[str, Any]]:
    """A batch of alerts in one executemany; the same as :func:`alert` per event."""
    runs[0].db.execute(_RECORD_ALERT, [_alert_row(ctx, ctx.payload) for ctx in runs])
    return [_alert_result(ctx.payload) for ctx in runs]


_RECORD_ALERT = insert(PRICE_ALERTS)


@shared_agent(
    AgentSpec(
        name=ALERT,
        payload=Event,
        on=(PRICE_DROPPED,),
        batch=Batch(size=100, together=alert_together),
    )
)
def alert(ctx: RunContext, event: Event) -> dict[str, Any]:
    """Record one alert per announcement (UNIQUE on the event id)."""
    ctx.db.execute(_RECORD_ALERT, _alert_row(ctx, event))
    return _alert_result(event)
