"""Claims keep their payload and queue (reaper, replay); reaped_at.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outcomes") as batch:
        batch.add_column(sa.Column("payload", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("queue", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("reaped_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_outcomes_status_started", ["status", "started_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("outcomes") as batch:
        batch.drop_index("ix_outcomes_status_started")
        batch.drop_column("reaped_at")
        batch.drop_column("queue")
        batch.drop_column("payload")
