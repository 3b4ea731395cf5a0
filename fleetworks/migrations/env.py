"""Alembic environment: runs on the connection handed in by fleetworks.migrate."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from fleetworks.models import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


_conn = context.config.attributes.get("connection")
if _conn is None:
    from fleetworks.db import get_engine

    url = context.config.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url is not set"
    with get_engine(url).begin() as conn:
        _run(conn)
else:
    _run(_conn)
