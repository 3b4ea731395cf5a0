"""The price-drop alert agent's table.

Revision ID: d0003
Revises: d0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "d0003"
down_revision = "d0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "price_alerts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event_id", sa.String(length=200), nullable=False),
        sa.Column("product_id", sa.String(length=100), nullable=False),
        sa.Column("tick", sa.String(length=300), nullable=False),
        sa.Column("from_cents", sa.Integer(), nullable=False),
        sa.Column("to_cents", sa.Integer(), nullable=False),
        sa.Column("fencing_token", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_index("ix_price_alerts_tick", "price_alerts", ["tick"])


def downgrade() -> None:
    op.drop_index("ix_price_alerts_tick", table_name="price_alerts")
    op.drop_table("price_alerts")
