"""Schema migrations: Alembic, with its scripts shipped inside the package.

``fleetworks db upgrade`` calls :func:`upgrade`; ``up`` and ``demo`` call it
before starting anything, so a fresh ``.fleet/`` is always at head.
"""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect

from fleetworks.db import get_engine

MIGRATIONS = Path(__file__).with_name("migrations")


def _config(url: str, extra: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    locations = [str(MIGRATIONS / "versions"), *([extra] if extra else [])]
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", os.pathsep.join(locations))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, migrations: str | None = None, revision: str = "heads") -> None:
    """Bring the database at ``url`` to ``revision``: the runtime's tables and,
    with ``migrations`` (a deployment's folder of revisions), the deployment's."""
    with get_engine(url).begin() as conn:
        cfg = _config(url, migrations)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(url: str, revision: str = "base") -> None:
    with get_engine(url).begin() as conn:
        cfg = _config(url)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def current_tables(url: str) -> set[str]:
    return set(inspect(get_engine(url)).get_table_names())
