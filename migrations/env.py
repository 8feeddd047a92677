"""Alembic environment: async engine, URL from DATABASE_URL (or the caller's `database_url`)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from logging.config import fileConfig

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from engine import make_engine
from models import Base
from settings import Settings

config = context.config
if config.config_file_name is not None and not config.attributes.get("database_url"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

settings = Settings.from_environ()
settings = replace(settings, database_url=config.attributes.get("database_url") or settings.database_url)


# Any fixed number: the key of the advisory lock that migrating processes take turns on.
MIGRATION_LOCK = 0x75736572


def run_migrations(connection: Connection) -> None:
    # render_as_batch: SQLite can only ALTER a table by copying it; batch mode does that.
    # transactional_ddl: SQLite can roll DDL back too, so a failed migration leaves nothing half done.
    context.configure(
        connection=connection, target_metadata=Base.metadata, render_as_batch=True, transactional_ddl=True
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Replicas starting together migrate one at a time; the next one finds nothing to do.
            # (A transaction-level lock: behind PgBouncer in transaction mode it still works.)
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = make_engine(settings, pooled=False)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("Offline (--sql) migrations are not supported; run against a database.")
asyncio.run(run_async_migrations())
