"""The migrations build exactly the schema the models declare, on two branches:
the runtime's (fleetworks/migrations) and the deployment's (config/migrations)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, func, insert, select, text

from fleetworks import db
from fleetworks.migrate import upgrade
from fleetworks.models import Base
from tasks.schema import MENTIONS, PRICE_CHANGES, RESPONSES, metadata

MIGRATIONS = str(Path(__file__).resolve().parent.parent / "config" / "migrations")


def both() -> MetaData:
    joined = MetaData()
    for table in [*Base.metadata.tables.values(), *metadata.tables.values()]:
        table.to_metadata(joined)
    return joined


def test_migrations_match_the_models(database_url: str) -> None:
    # Given a database built by the migrations alone (the fixture runs them)
    with db.get_engine(database_url).connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        # Then autogenerate finds nothing to add, drop or alter
        diff = compare_metadata(context, both())
    assert diff == [], diff


def test_the_runtime_alone_creates_no_agent_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runtime.db'}"
    upgrade(url)
    tables = set(db.get_engine(url).dialect.get_table_names(db.get_engine(url).connect()))
    assert tables & {"mentions", "responses", "price_changes"} == set()
    assert {"outcomes", "guard_events", "agent_state", "alembic_version"} <= tables


def test_a_database_at_the_old_head_keeps_its_agent_rows(tmp_path: Path) -> None:
    """A database at revision 0004, when the runtime still created the agents'
    tables, upgrades in place: the rows stay, the deployment's branch adopts them."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = db.get_engine(url)
    # Given the runtime at 0004, which created the three agent tables, with rows in them
    upgrade(url, revision="0004")
    at = datetime(2026, 1, 1, tzinfo=UTC)
    with engine.begin() as conn:
        mention = {"mention_id": "m1", "brand": "b", "author": "a", "text": "t"}
        conn.execute(
            insert(MENTIONS).values(**mention, status="responded", fencing_token=3, updated_at=at)
        )
        conn.execute(
            insert(RESPONSES).values(mention_id="m1", text="hi", fencing_token=3, created_at=at)
        )
    # When it is upgraded with the deployment's branch
    upgrade(url, MIGRATIONS)
    # Then the rows are there and price_changes (empty, dropped by 0005) is back
    with engine.connect() as conn:
        assert conn.execute(select(RESPONSES.c.text)).scalars().all() == ["hi"]
        assert conn.execute(select(MENTIONS.c.status)).scalars().all() == ["responded"]
        assert conn.execute(select(func.count()).select_from(PRICE_CHANGES)).scalar_one() == 0
        heads = set(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
    assert heads == {"0010", "d0005"}  # d0001 depends on 0005: one row stands for both
