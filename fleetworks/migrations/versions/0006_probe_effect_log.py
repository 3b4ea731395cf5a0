"""The probe's second effect ledger, without a UNIQUE key.

``probe_effect_log`` gets one row per committed probe run that asks for it
(``unique=False``). Nothing in the database stops a second row for a key, so
a key run twice shows as two rows: the chaos run counts doubles here, with
exactly-once resting on the guard alone.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "probe_effect_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("effect_key", sa.String(length=500), nullable=False),
        sa.Column("fencing_token", sa.BigInteger(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_probe_effect_log_effect_key", "probe_effect_log", ["effect_key"])


def downgrade() -> None:
    op.drop_index("ix_probe_effect_log_effect_key", table_name="probe_effect_log")
    op.drop_table("probe_effect_log")
