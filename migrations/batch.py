"""Alembic's batch mode for the migrations, keeping what SQLite's table copy would lose."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa
from alembic import op
from alembic.operations import BatchOperations


@contextlib.contextmanager
def recreated_on_sqlite(table: str) -> Iterator[BatchOperations]:
    """Alembic's batch mode, which on SQLite copies the table into a new one: keep AUTOINCREMENT
    and its high-water mark, or the ids of deleted rows could be handed out again."""
    connection = op.get_bind()
    sqlite = connection.dialect.name == "sqlite"
    query = sa.text("SELECT seq FROM sqlite_sequence WHERE name = :table")
    seq = connection.scalar(query, {"table": table}) if sqlite else None
    with op.batch_alter_table(table, table_kwargs={"sqlite_autoincrement": True}) as batch:
        yield batch
    if seq is not None:
        connection.execute(
            sa.text("UPDATE sqlite_sequence SET seq = max(seq, :seq) WHERE name = :table"), {"seq": seq, "table": table}
        )
