"""The events outbox.

``events`` holds every event emitted by an agent's run (in the run's own
transaction) or published by application code, in the order stored, with
the time the relay sent it to its subscribers.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("position", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event_id", sa.String(length=200), nullable=False),
        sa.Column("topic", sa.String(length=200), nullable=False),
        sa.Column("key", sa.String(length=500), nullable=True),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("source_agent", sa.String(length=200), nullable=True),
        sa.Column("source_key", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("relayed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("position"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_index("ix_events_relayed_position", "events", ["relayed_at", "position"])
    op.create_index("ix_events_topic_key", "events", ["topic", "key"])


def downgrade() -> None:
    op.drop_index("ix_events_topic_key", table_name="events")
    op.drop_index("ix_events_relayed_position", table_name="events")
    op.drop_table("events")
