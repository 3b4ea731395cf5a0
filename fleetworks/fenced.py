"""Fenced writes: an effect row changes only while the writer's token is current.

An agent's own table carries a ``fencing_token`` column. A write made with
token ``t`` succeeds only if the row is new or its stored token is ``<= t``,
and stores ``t``; otherwise a newer holder has written the row since, and
:class:`~fleetworks.claims.StaleWriteError` is raised, which the guard records
as ``stale_write`` and never retries. Use these helpers instead of writing the
``WHERE fencing_token <= :t ... RETURNING`` pattern by hand; writes through
``ctx.db`` commit with the run's outcome, so a refused write rolls back the
whole run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, Table, and_, update

from fleetworks.claims import StaleWriteError
from fleetworks.db import upsert

TOKEN_COLUMN = "fencing_token"


def _token_column(table: Table, column: str) -> Any:
    if column not in table.c:
        raise ValueError(f"table {table.name!r} has no {column!r} column to fence writes with")
    return table.c[column]


def fenced_upsert(
    conn: Connection,
    table: Table,
    key_columns: Sequence[str],
    values: Mapping[str, Any],
    token: int,
    *,
    token_column: str = TOKEN_COLUMN,
) -> None:
    """Insert the row, or update it if its stored token is not newer than ``token``.

    ``key_columns`` name the UNIQUE (or primary) key the row is found by;
    ``values`` must include them. Raises ``StaleWriteError`` when a newer token
    owns the row.
    """
    fence = _token_column(table, token_column)
    missing = [k for k in key_columns if k not in values]
    if missing:
        raise ValueError(f"fenced_upsert into {table.name!r}: values lack key columns {missing}")
    row = {**values, token_column: token}
    changes = {k: v for k, v in row.items() if k not in key_columns}
    stmt = (
        upsert(conn, table)
        .values(row)
        .on_conflict_do_update(
            index_elements=[table.c[k] for k in key_columns], set_=changes, where=fence <= token
        )
        .returning(*[table.c[k] for k in key_columns])
    )
    # RETURNING, not rowcount: drivers disagree on rowcount for upserts.
    if conn.execute(stmt).first() is None:
        key = {k: values[k] for k in key_columns}
        raise StaleWriteError(f"{table.name} {key}: stale fencing token {token}")


def fenced_update(
    conn: Connection,
    table: Table,
    where: ColumnElement[bool],
    values: Mapping[str, Any],
    token: int,
    *,
    token_column: str = TOKEN_COLUMN,
    expect: int | None = 1,
) -> int:
    """Update the rows matching ``where`` whose stored token is not newer than
    ``token``; store ``token``. Raises ``StaleWriteError`` unless ``expect``
    rows changed (``expect=None``: any number); returns the count."""
    fence = _token_column(table, token_column)
    done = conn.execute(
        update(table).where(and_(where, fence <= token)).values({**values, token_column: token})
    )
    if expect is not None and done.rowcount != expect:
        raise StaleWriteError(
            f"{table.name}: {done.rowcount} of {expect} row(s) written with fencing token "
            f"{token}; a newer token owns the rest"
        )
    return int(done.rowcount)
