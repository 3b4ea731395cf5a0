"""The demo agents' tables leave the runtime's schema.

Revisions 0001 and 0004 created ``mentions``, ``responses`` and
``price_changes``, which belong to one deployment's agents, in every
database. From here on a deployment creates its own tables on its own
Alembic branch (``init_app(..., migrations=...)``). This revision drops those
three tables where they are empty (a database that never ran those agents);
a table with rows is left in place, for its deployment's branch to adopt.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = ("fleetworks",)
depends_on = None

#: Dropped in this order (no foreign keys between them).
TABLES = ("responses", "mentions", "price_changes")


def _empty(name: str) -> bool:
    bind = op.get_bind()
    if not sa.inspect(bind).has_table(name):
        return False
    return bind.execute(sa.text(f"SELECT 1 FROM {name} LIMIT 1")).first() is None


def upgrade() -> None:
    for name in TABLES:
        if _empty(name):
            if name == "price_changes":
                op.drop_index("ix_price_changes_tick", table_name="price_changes")
            op.drop_table(name)


def downgrade() -> None:
    """Nothing to restore: revision 0004's schema is recreated by the deployment's branch."""
