"""The shop's own table: receipts, one per charged order, fenced.

Created by the shop's own Alembic branch (``migrations/``), which
``fleetworks -A examples.shop.celery:app db upgrade`` runs after the runtime's.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, Integer, MetaData, String, Table

metadata = MetaData()

receipts = Table(
    "shop_receipts",
    metadata,
    Column("order_id", String(100), primary_key=True),
    Column("amount_cents", Integer, nullable=False),
    Column("charges", Integer, nullable=False),
    Column("fencing_token", BigInteger, nullable=False),
    Column("charged_at", DateTime(timezone=True), nullable=False),
)
