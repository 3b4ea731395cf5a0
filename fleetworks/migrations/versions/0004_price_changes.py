"""The pricing agent's effects ledger: one row per product per tick.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "price_changes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("product_id", sa.String(length=100), nullable=False),
        sa.Column("tick", sa.String(length=300), nullable=False),
        sa.Column("old_cents", sa.Integer(), nullable=False),
        sa.Column("new_cents", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("fencing_token", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("product_id", "tick", name="ux_price_changes_product_tick"),
    )
    op.create_index("ix_price_changes_tick", "price_changes", ["tick"])


def downgrade() -> None:
    op.drop_index("ix_price_changes_tick", table_name="price_changes")
    op.drop_table("price_changes")
