"""Schema migrations: Alembic, with its scripts shipped inside the package.

``fleetworks db upgrade`` calls :func:`upgrade`; ``up`` and ``demo`` call it
before starting anything, so a fresh ``.fleet/`` is always at head.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect

from fleetworks.db import get_engine

MIGRATIONS = Path(__file__).with_name("migrations")


def _config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision``."""
    with get_engine(url).begin() as conn:
        cfg = _config(url)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(url: str, revision: str = "base") -> None:
    with get_engine(url).begin() as conn:
        cfg = _config(url)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def current_tables(url: str) -> set[str]:
    return set(inspect(get_engine(url)).get_table_names())
