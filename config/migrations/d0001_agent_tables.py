"""The deployment's agent tables, on a branch of their own.

``mentions``, ``responses`` and ``price_changes`` were created by the
runtime's revisions 0001 and 0004 until the runtime stopped owning them
(revision 0005). A database that already has them, with rows, keeps them:
this revision creates only the tables that are missing.

Revision ID: d0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "d0001"
down_revision = None
branch_labels = ("deployment",)
depends_on = "0005"

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _missing(name: str) -> bool:
    return not sa.inspect(op.get_bind()).has_table(name)


def upgrade() -> None:
    if _missing("mentions"):
        op.create_table(
            "mentions",
            sa.Column("mention_id", sa.String(length=100), nullable=False),
            sa.Column("brand", sa.String(length=100), nullable=False),
            sa.Column("author", sa.String(length=100), nullable=False),
            sa.Column("text", sa.Text(), nullable=False),
            sa.Column("status", sa.String(length=20), nullable=False),
            sa.Column("fencing_token", sa.BigInteger(), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("mention_id"),
        )
    if _missing("responses"):
        op.create_table(
            "responses",
            sa.Column("id", _ID, nullable=False),
            sa.Column("mention_id", sa.String(length=100), nullable=False),
            sa.Column("text", sa.Text(), nullable=False),
            sa.Column("fencing_token", sa.BigInteger(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("mention_id"),
        )
    if _missing("price_changes"):
        op.create_table(
            "price_changes",
            sa.Column("id", _ID, nullable=False),
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
    op.drop_table("responses")
    op.drop_table("mentions")
