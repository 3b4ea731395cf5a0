"""The behaviour: charge an order once. Plain Python, no Celery, no database."""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field


class Order(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    order_id: str = Field(min_length=1, max_length=100)
    amount_cents: int = Field(gt=0)


class Ledger(Protocol):
    def charge(self, order: Order, fencing_token: int) -> None: ...


def handle(order: Order, ledger: Ledger, fencing_token: int) -> dict[str, str]:
    ledger.charge(order, fencing_token)
    return {"charged": order.order_id}
