"""The highest leader term accepted per group.

``leader_terms`` holds, per leader group, the highest term a resource has
accepted (:class:`fleetworks.leadership.TermFence`): an action carrying a
lower term is refused, and an election after a backend lost its data is
seeded above it.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leader_terms",
        sa.Column("group", sa.String(length=200), nullable=False),
        sa.Column("highest_term", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("group"),
    )


def downgrade() -> None:
    op.drop_table("leader_terms")
