"""The Alembic migrations build exactly the schema the models declare."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from fleetworks import db
from fleetworks.models import Base


def test_migrations_match_the_models(database_url: str) -> None:
    # Given a database built by the migrations alone (the fixture runs them)
    with db.get_engine(database_url).connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        # Then autogenerate finds nothing to add, drop or alter
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], diff
