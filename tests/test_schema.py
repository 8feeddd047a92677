"""The schema: Alembic owns it, the models agree with it, and the engine is configured as designed."""

from __future__ import annotations

import warnings
from pathlib import Path

import httpx
import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from asgi_lifespan import LifespanManager
from sqlalchemy import Connection, text

from app import create_app
from conftest import DirectDatabase, in_thread, signup_body
from engine import async_url, asyncpg_connect_args, make_engine, reads_in_autocommit
from migrate import SchemaRevisions, upgrade_schema
from models import Base
from pool import FairQueue
from settings import Settings

HEAD = SchemaRevisions.from_migrations().head

pytestmark = pytest.mark.anyio


async def test_the_models_match_the_migrations(database_url: str) -> None:
    def diff(connection: Connection) -> list[object]:
        with warnings.catch_warnings():
            # SQLite cannot reflect expression indexes (lower(email)); Alembic says so and skips them.
            warnings.filterwarnings("ignore", "autogenerate skipping metadata-specified expression-based index")
            warnings.filterwarnings("ignore", "Skipped unsupported reflection of expression-based index")
            return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))

    engine = make_engine(Settings(database_url=database_url), pooled=False)
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(diff) == []
    finally:
        await engine.dispose()


async def test_migrating_a_migrated_database_changes_nothing(db: DirectDatabase) -> None:
    head = SchemaRevisions.from_migrations().head
    assert await db.scalar("SELECT version_num FROM alembic_version") == head
    in_thread(upgrade_schema, db.url)  # already at head: nothing to do, nothing breaks
    assert await db.scalar("SELECT version_num FROM alembic_version") == head


async def test_sqlite_connections_get_wal_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(Settings(database_url=f"sqlite:///{tmp_path / 'users.db'}"))
    try:
        async with engine.connect() as connection:
            pragmas = {
                name: (await connection.execute(text(f"PRAGMA {name}"))).scalar()
                for name in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
            }
    finally:
        await engine.dispose()
    assert pragmas == {"journal_mode": "wal", "busy_timeout": 5000, "foreign_keys": 1, "synchronous": 1}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@db:5432/users", "postgresql+asyncpg://u:***@db:5432/users"),
        ("postgres://u@db/users", "postgresql+asyncpg://u@db/users"),
        ("postgresql+asyncpg://u@db/users", "postgresql+asyncpg://u@db/users"),
        ("sqlite:///./users.db", "sqlite+aiosqlite:///./users.db"),
        ("sqlite+aiosqlite:////var/lib/users.db", "sqlite+aiosqlite:////var/lib/users.db"),
    ],
)
def test_plain_database_urls_get_the_asyncio_driver(given: str, expected: str) -> None:
    assert str(async_url(given)) == expected


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "DATABASE_URL": "postgresql://u@db/users",
        "DB_POOL_SIZE": "7",
        "DB_MAX_OVERFLOW": "0",
        "DB_POOL_TIMEOUT": "1.5",
        "DB_POOL_RECYCLE": "1800",
        "DB_POOL_PRE_PING": "false",
        "DB_CONNECT_TIMEOUT": "2",
        "DB_COMMAND_TIMEOUT": "3",
        "MAX_BODY_BYTES": "1024",
        "DB_PGBOUNCER": "true",
        "DB_APPLICATION_NAME": "users-eu",
    }.items():
        monkeypatch.setenv(name, value)

    assert Settings.from_environ() == Settings(
        database_url="postgresql://u@db/users",
        pool_size=7,
        max_overflow=0,
        pool_timeout=1.5,
        pool_recycle=1800,
        pool_pre_ping=False,
        connect_timeout=2,
        command_timeout=3,
        max_body_bytes=1024,
        pgbouncer=True,
        application_name="users-eu",
    )


def test_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "DB_POOL_SIZE", "DB_MAX_OVERFLOW", "DB_POOL_RECYCLE", "DB_POOL_PRE_PING"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_environ()
    assert settings.database_url == "sqlite+aiosqlite:///./users.db"
    assert (settings.pool_size, settings.max_overflow, settings.pool_recycle, settings.pool_pre_ping) == (
        10,
        0,
        28000,
        False,
    )


async def test_the_engine_applies_the_pool_settings(database_url: str) -> None:
    engine = make_engine(
        Settings(
            database_url=database_url,
            pool_size=3,
            max_overflow=2,
            pool_timeout=1.5,
            pool_recycle=900,
            pool_pre_ping=False,
        )
    )
    pool = engine.sync_engine.pool
    try:
        assert (pool.size(), pool._max_overflow, pool._timeout, pool._recycle, pool._pre_ping) == (  # type: ignore[attr-defined]
            3,
            2,
            1.5,
            900,
            False,
        )
    finally:
        await engine.dispose()


async def test_behind_pgbouncer_statements_are_unnamed_and_never_cached() -> None:
    # What the flag changes in behaviour is proven against a real PgBouncer (test_pgbouncer.py).
    settings = Settings(database_url="postgresql://u@127.0.0.1:1/users", pgbouncer=True, pool_size=4)
    engine = make_engine(settings, autocommit=reads_in_autocommit(settings))
    try:
        connect_args = asyncpg_connect_args(settings)
        assert engine.sync_engine.pool.size() == 4  # type: ignore[attr-defined]  # a pool of client connections
        assert (connect_args["statement_cache_size"], connect_args["prepared_statement_cache_size"]) == (0, 0)
        assert connect_args["prepared_statement_name_func"]() == ""  # unnamed: nothing left on a server
        assert not reads_in_autocommit(settings)  # reads in transactions: prepare and execute on one server
    finally:
        await engine.dispose()


# --- a database without the schema -------------------------------------------------------


async def test_without_the_schema_readyz_says_so_and_routes_answer_500_not_503(unmigrated_url: str) -> None:
    async with LifespanManager(create_app(Settings(database_url=unmigrated_url))) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json() == {
                "detail": f"The database schema is at revision none, not {HEAD}: run the migrations."
            }
            for response in (
                await client.get("/api/users/alice"),
                await client.get("/api/users"),
                await client.post("/api/users/signup", json=signup_body()),
            ):
                assert response.status_code == 500, response.text
                assert "retry-after" not in response.headers

            in_thread(upgrade_schema, unmigrated_url, "0002")
            behind = await client.get("/readyz")
            assert behind.status_code == 503
            assert f"at revision 0002, not {HEAD}" in behind.json()["detail"]

            in_thread(upgrade_schema, unmigrated_url)
            assert (await client.get("/readyz")).json() == {
                "status": "ready",
                "revision": SchemaRevisions.from_migrations().head,
            }
            assert (await client.get("/api/users/alice")).status_code == 404


async def test_the_fair_pool_still_fits_the_installed_sqlalchemy() -> None:
    """pool.py builds on SQLAlchemy internals; an upgrade that moves them must fail here, loudly."""
    engine = make_engine(Settings(database_url="sqlite+aiosqlite:///:memory:"))
    try:
        queue = getattr(engine.sync_engine.pool, "_pool", None)
        assert isinstance(queue, FairQueue), (
            f"SQLAlchemy {sqlalchemy.__version__} no longer builds its pool's queue from `_queue_class`: "
            "pool.FairQueue is not in use. Pin SQLAlchemy back or port pool.py to the new internals."
        )
    finally:
        await engine.dispose()
