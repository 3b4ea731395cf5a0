"""The binding: the charge behaviour as a guarded agent of the shop's fleet."""

from __future__ import annotations

from sqlalchemy import select

from examples.shop import orders
from examples.shop.celery import fleet
from examples.shop.schema import receipts
from fleetworks import AgentSpec, RunContext, fenced_upsert
from fleetworks.claims import now

CHARGE = "shop.charge"


class SqlLedger:
    def __init__(self, ctx: RunContext) -> None:
        self._ctx = ctx

    def charge(self, order: orders.Order, fencing_token: int) -> None:
        db = self._ctx.db
        before = db.execute(
            select(receipts.c.charges).where(receipts.c.order_id == order.order_id)
        ).scalar()
        fenced_upsert(
            db, receipts, ["order_id"],
            {"order_id": order.order_id, "amount_cents": order.amount_cents,
             "charges": (before or 0) + 1, "charged_at": now()},
            fencing_token,
        )  # fmt: skip


@fleet.agent(AgentSpec(name=CHARGE, payload=orders.Order, key=lambda o: f"order:{o.order_id}"))
def charge(ctx: RunContext, order: orders.Order) -> dict[str, str]:
    return orders.handle(order, SqlLedger(ctx), ctx.fencing_token)
