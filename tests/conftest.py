"""Fixtures: a fresh, migrated database per test (SQLite file and PostgreSQL), the app with its
lifespan run, and an httpx client on it.

PostgreSQL comes from TEST_DATABASE_URL (scripts/test starts a throwaway cluster and sets it):
any database there whose user may CREATE DATABASE.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app import create_app
from chaos import free_port
from db import Database, database
from engine import async_url, make_engine
from mailer import Mailer
from migrate import upgrade_schema
from resources import Resources, resources
from settings import Settings

PROJECT_DIR = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get("TEST_DATABASE_URL", "")
BACKENDS = ["sqlite", "postgresql"] if POSTGRES_URL else ["sqlite"]

pytest_plugins = ["clusters"]  # the fault, failover and pooler suites' fixtures (tests/clusters.py)

if not POSTGRES_URL and os.environ.get("CI") == "true":
    raise pytest.UsageError("TEST_DATABASE_URL is not set: in CI, PostgreSQL must be tested (use scripts/test).")


# The longest tests (real processes, clusters, the fuzzer) go first, and scripts/test has
# pytest-xdist hand out tests one at a time (--maxschedchunk 1): the long ones spread over the
# workers and the short ones fill in around them. In chunks, the first worker would get every long
# test (they are consecutive) and finish long after the others.
LONG = ("faults", "ha", "pgbouncer", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not any(item.get_closest_marker(name) for name in LONG))


def pytest_report_header() -> str:
    return f"databases: {', '.join(BACKENDS)}" + ("" if POSTGRES_URL else " (PostgreSQL NOT tested)")


def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """Run blocking code that calls asyncio.run() (Alembic's env.py does) away from any loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(function, *args).result()


def postgres_dsn(database: str) -> str:
    """A DSN for asyncpg itself (no SQLAlchemy driver name) to `database` on the test server."""
    url = async_url(POSTGRES_URL).set(drivername="postgresql", database=database)
    return url.render_as_string(hide_password=False)


async def postgres_admin(sql: str) -> None:
    connection = await asyncpg.connect(postgres_dsn(async_url(POSTGRES_URL).database or "postgres"))
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "users.db"
    in_thread(upgrade_schema, f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    name = f"users_template_{os.getpid()}"
    in_thread(asyncio.run, postgres_admin(f"CREATE DATABASE {name}"))
    in_thread(upgrade_schema, postgres_dsn(name))
    yield name
    while SPARE_DATABASES:
        in_thread(asyncio.run, postgres_admin(f"DROP DATABASE IF EXISTS {SPARE_DATABASES.pop()} WITH (FORCE)"))
    in_thread(asyncio.run, postgres_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database with the migrated schema, for this test alone."""
    yield from fresh_database(request, tmp_path)


def fresh_database(request: pytest.FixtureRequest, directory: Path) -> Iterator[str]:
    """A database copied from the migrated template of the backend `request.param` names, dropped after."""
    if request.param == "sqlite":
        shutil.copy(request.getfixturevalue("sqlite_template"), directory / "users.db")
        yield f"sqlite+aiosqlite:///{directory / 'users.db'}"
        return
    template = request.getfixturevalue("postgres_template")
    if SPARE_DATABASES:
        name = SPARE_DATABASES.pop()
    else:
        name = f"users_test_{uuid.uuid4().hex[:12]}"
        in_thread(asyncio.run, postgres_admin(f"CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY"))
    yield postgres_dsn(name)
    if in_thread(asyncio.run, emptied(name, template)):
        SPARE_DATABASES.append(name)
    else:
        in_thread(asyncio.run, postgres_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


# A worker's PostgreSQL test databases are used again: CREATE DATABASE copies the template's files,
# about a quarter of a second of the server's CPU each, for hundreds of tests; emptying a database
# that nobody is connected to any more and whose schema is still the template's takes milliseconds.
# Dropped at the end of the session (postgres_template).
SPARE_DATABASES: list[str] = []
# What a test could change beside the rows: relations and their columns, triggers, functions,
# constraints, and the schema's Alembic revision.
SCHEMA = """
    SELECT string_agg(item, ',' ORDER BY item) FROM (
        SELECT c.relname || '.' || a.attname || ':' || a.atttypid::regtype::text
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         WHERE n.nspname = 'public'
        UNION ALL SELECT 'trigger ' || tgname FROM pg_trigger WHERE NOT tgisinternal
        UNION ALL SELECT 'function ' || proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'public'
        UNION ALL SELECT 'constraint ' || conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
         WHERE n.nspname = 'public'
        UNION ALL SELECT 'revision ' || version_num FROM alembic_version
    ) AS schema(item)
"""


async def emptied(name: str, template: str) -> bool:
    """Whether database `name` was emptied for another test: only if nobody else is connected to it
    and its schema is the template's; then every table but Alembic's is truncated, and its
    sequences start again."""
    connection = await asyncpg.connect(postgres_dsn(name))
    try:
        others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        if await connection.fetchval(others) or await connection.fetchval(SCHEMA) != await schema_of(template):
            return False
        tables = await connection.fetchval(
            "SELECT string_agg(quote_ident(tablename), ', ') FROM pg_tables"
            " WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
        )
        await connection.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        return True
    except asyncpg.PostgresError:
        return False
    finally:
        await connection.close()


TEMPLATE_SCHEMAS: dict[str, str] = {}


async def schema_of(template: str) -> str:
    if template not in TEMPLATE_SCHEMAS:
        connection = await asyncpg.connect(postgres_dsn(template))
        try:
            TEMPLATE_SCHEMAS[template] = await connection.fetchval(SCHEMA)
        finally:
            await connection.close()
    return TEMPLATE_SCHEMAS[template]


# Argon2id at 1 MiB and 1 pass: what the tests prove does not depend on what a hash costs, and at
# OWASP's baseline the suite's thousands of hashes would take minutes of CPU (tests/test_password_rules.py
# checks the baseline is the default).
CHEAP_HASHES = {"ARGON2_MEMORY_KIB": "1024", "ARGON2_TIME_COST": "1"}


@pytest.fixture
def settings(database_url: str) -> Settings:
    return cheap_settings(database_url)


def cheap_settings(database_url: str) -> Settings:
    return Settings(database_url=database_url, argon2_memory_kib=1024, argon2_time_cost=1)


@pytest.fixture
def app(settings: Settings) -> Starlette:
    return app_for_tests(settings)


def app_for_tests(settings: Settings) -> Starlette:
    """The app, and a test-only route that hands over what its lifespan made (app_database)."""
    app = create_app(settings)
    app.router.routes.insert(0, Route(DATABASE_PROBE, database_probe, methods=["GET"], include_in_schema=False))
    return app


DATABASE_PROBE = "/test/database"


async def database_probe(request: Request) -> Response:
    request.app.state.database = database(request)
    request.app.state.resources = resources(request)
    return Response(status_code=200)


@pytest.fixture
def no_delivery(monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's mail delivery loop idle: it takes pooled connections (and SQLite's write lock) of
    its own, which a probe of the pool cannot tell from a request's. (Asked for before the app.)"""

    async def idle(self: Mailer) -> None:
        while not self.stopping:
            await self.woken.wait()
            self.woken.clear()

    monkeypatch.setattr(Mailer, "run", idle)


@pytest.fixture
async def lifespan(app: Starlette) -> AsyncIterator[LifespanManager]:
    async with LifespanManager(app) as manager:
        yield manager


@pytest.fixture
async def engine(app: Starlette, client: httpx.AsyncClient) -> AsyncEngine:
    """The engine the running app made in its lifespan."""
    return (await app_database(app, client)).engine


async def app_database(app: Starlette, client: httpx.AsyncClient) -> Database:
    """The running app's Database, as its routes see it: a test-only route hands it over."""
    assert (await client.get(DATABASE_PROBE)).status_code == 200
    found: Database = app.state.database
    return found


async def app_resources(app: Starlette, client: httpx.AsyncClient) -> Resources:
    """The running app's Resources, as its routes see them."""
    assert (await client.get(DATABASE_PROBE)).status_code == 200
    found: Resources = app.state.resources
    return found


@pytest.fixture
async def client(lifespan: LifespanManager) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(lifespan) as client:
        yield client


@asynccontextmanager
async def client_from(app: Starlette, address: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client on a running app whose requests come from `address` (as the server would see it)."""
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


def asgi_client(lifespan: LifespanManager) -> httpx.AsyncClient:
    # raise_app_exceptions=False: see the 500 the client would see, not the server's traceback.
    transport = httpx.ASGITransport(app=lifespan.app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@pytest.fixture
def db(database_url: str) -> DirectDatabase:
    return DirectDatabase(database_url)


class DirectDatabase:
    """Looks at the test database directly, outside the app and its pool."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.backend = async_url(url).get_backend_name()

    async def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        return await self._run(sql, params)

    async def _run(self, sql: str, params: dict[str, Any] | None = None, *, write: bool = False) -> list[Any]:
        engine = make_engine(Settings(database_url=self.url), pooled=False)
        try:
            async with engine.begin() as connection:
                result = await connection.execute(text(sql), params or {})
                return [] if write else list(result.all())
        finally:
            await engine.dispose()

    async def scalar(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        rows = await self._run(sql, params)
        return rows[0][0] if rows else None

    async def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        await self._run(sql, params, write=True)

    async def column(self, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        return [row[0] for row in await self._run(sql, params)]

    async def usernames(self) -> list[str]:
        return await self.column("SELECT username FROM users ORDER BY id")


@pytest.fixture(params=BACKENDS)
def unmigrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: nothing migrated."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    name = f"users_empty_{uuid.uuid4().hex[:12]}"
    in_thread(asyncio.run, postgres_admin(f"CREATE DATABASE {name}"))
    yield postgres_dsn(name)
    in_thread(asyncio.run, postgres_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 30) -> None:
    """Wait until `check()` holds, for what the service does on its own time (its mail delivery
    loop, a commit in another process): checked every 50 ms, a failure after `seconds`."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {check.__doc__ or check}")
        await asyncio.sleep(0.05)


# --- helpers for the tests: a user, signed in -------------------------------------------------

PASSWORD = "Kiwi-Tango-Mango-57"


def signup_body(username: str = "alice", **overrides: Any) -> dict[str, Any]:
    return {"username": username, "password": PASSWORD, "email": f"{username}@example.com", **overrides}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def sign_in(client: httpx.AsyncClient, username: str = "alice", password: str = PASSWORD) -> dict[str, str]:
    response = await client.post("/api/users/signin", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    tokens: dict[str, str] = response.json()
    return tokens


def assert_401(response: httpx.Response, detail: str) -> None:
    assert response.status_code == 401
    assert response.json() == {"detail": detail}
    assert response.headers["www-authenticate"].startswith("Bearer")


def field_errors(response: httpx.Response, status: int = 400) -> list[str]:
    """The fields a 400 names (or a 403: a well-formed request whose proof, a password, was wrong)."""
    assert response.status_code == status, response.text
    return [error["field"] for error in response.json()["errors"]]


async def sign_up_and_in(
    client: httpx.AsyncClient, username: str = "alice", password: str = PASSWORD
) -> dict[str, str]:
    """A new user, signed in: the token pair."""
    response = await client.post("/api/users/signup", json=signup_body(username, password=password))
    assert response.status_code == 201, response.text
    return await sign_in(client, username, password)


# --- the subprocess fixture of docs/testing.md (kept verbatim there; a test checks) ----------
@pytest.fixture
def service_url(database_url: str) -> Iterator[str]:
    """The user service as a real uvicorn process on a free loopback port, on a migrated database."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, **CHEAP_HASHES}
    command = [sys.executable, "-m", "uvicorn", "app:create_app", "--factory", "--port", str(port)]
    process = subprocess.Popen(command, cwd=PROJECT_DIR, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=10)


# --------------------------------------------------------------------------------------------
