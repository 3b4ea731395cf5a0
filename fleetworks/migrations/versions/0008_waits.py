"""Durable waits for an event.

``waits`` holds every run that ended waiting for an event: what to run when
it resumes (agent, key, payload, queue), what it waits for (topic, fields to
match) and until when; its state moves once from ``waiting`` to
``resolved`` or ``timed_out``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "waits",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("agent", sa.String(length=200), nullable=False),
        sa.Column("key", sa.String(length=500), nullable=False),
        sa.Column("root_key", sa.String(length=500), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("queue", sa.String(length=200), nullable=True),
        sa.Column("topic", sa.String(length=200), nullable=False),
        sa.Column("match", sa.JSON(), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("event_id", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_waits_state_topic", "waits", ["state", "topic"])
    op.create_index("ix_waits_state_deadline", "waits", ["state", "deadline"])


def downgrade() -> None:
    op.drop_index("ix_waits_state_deadline", table_name="waits")
    op.drop_index("ix_waits_state_topic", table_name="waits")
    op.drop_table("waits")
