"""When a claim's message was published.

``outcomes.queued_at`` is the publish time the claiming delivery's message
carried (the ``fleet_sent_at`` header); with ``started_at`` it gives the
queue wait that ``/metrics`` reports as ``fleetworks_queue_wait_seconds``.
Rows written before this revision have none.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outcomes") as batch:
        batch.add_column(sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outcomes") as batch:
        batch.drop_column("queued_at")
