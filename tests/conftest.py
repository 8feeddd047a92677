"""Fixtures: a fresh, migrated database per test (SQLite file and PostgreSQL), the app with its
lifespan run, and an httpx client on it.

PostgreSQL comes from TEST_DATABASE_URL (scripts/test starts a throwaway cluster and sets it):
any database there whose user may CREATE DATABASE.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

import chaos
import ha
from app import create_app
from chaos import TIMEOUTS, Cluster, Service, free_port, postgres_bindir
from db import async_url, make_engine, upgrade_schema
from settings import Settings

PROJECT_DIR = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get("TEST_DATABASE_URL", "")
BACKENDS = ["sqlite", "postgresql"] if POSTGRES_URL else ["sqlite"]

if not POSTGRES_URL and os.environ.get("CI") == "true":
    raise pytest.UsageError("TEST_DATABASE_URL is not set: in CI, PostgreSQL must be tested (use scripts/test).")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    write_table(terminalreporter, "the promise under faults", chaos.SUMMARY)
    write_table(terminalreporter, "the promise across failovers", ha.HA_SUMMARY, ha.FIGURES)


def write_table(
    reporter: pytest.TerminalReporter, title: str, rows: list[dict[str, Any]], notes: list[str] | None = None
) -> None:
    if not rows and not notes:
        return
    reporter.section(title)
    if rows:
        columns = list(rows[0])
        widths = [max(len(str(column)), *(len(str(row[column])) for row in rows)) for column in columns]
        reporter.write_line("  ".join(str(c).ljust(w) for c, w in zip(columns, widths, strict=True)))
        for row in rows:
            reporter.write_line("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))
    for note in notes or []:
        reporter.write_line(note)


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
    in_thread(asyncio.run, postgres_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database with the migrated schema, for this test alone."""
    if request.param == "sqlite":
        shutil.copy(request.getfixturevalue("sqlite_template"), tmp_path / "users.db")
        yield f"sqlite+aiosqlite:///{tmp_path / 'users.db'}"
        return
    template = request.getfixturevalue("postgres_template")
    name = f"users_test_{uuid.uuid4().hex[:12]}"
    in_thread(asyncio.run, postgres_admin(f"CREATE DATABASE {name} TEMPLATE {template}"))
    yield postgres_dsn(name)
    in_thread(asyncio.run, postgres_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url)


@pytest.fixture
def app(settings: Settings) -> Starlette:
    return create_app(settings)


@pytest.fixture
async def lifespan(app: Starlette) -> AsyncIterator[LifespanManager]:
    async with LifespanManager(app) as manager:
        yield manager


@pytest.fixture
def engine(lifespan: LifespanManager) -> AsyncEngine:
    """The engine the running app made in its lifespan."""
    state: dict[str, Any] = lifespan._state
    engine: AsyncEngine = state["engine"]
    return engine


@pytest.fixture
async def client(lifespan: LifespanManager) -> AsyncIterator[httpx.AsyncClient]:
    # raise_app_exceptions=False: see the 500 the client would see, not the server's traceback.
    transport = httpx.ASGITransport(app=lifespan.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
def db(database_url: str) -> Database:
    return Database(database_url)


class Database:
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


def signup_body(username: str = "alice", **overrides: Any) -> dict[str, Any]:
    return {"username": username, "password": "Kiwi-Tango-57", "email": f"{username}@example.com", **overrides}


# --- for the fault and failover suites: a cluster of their own, the service as processes ------
@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    bindir = postgres_bindir()
    if bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the fault and failover suites need PostgreSQL server binaries (PG_BINDIR)")
        pytest.skip("no PostgreSQL server binaries: these tests need a cluster they can restart")
    cluster = Cluster(bindir)
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def database(cluster: Cluster) -> Iterator[str]:
    name = f"faults_{uuid.uuid4().hex[:10]}"
    in_thread(asyncio.run, cluster.sql(f"CREATE DATABASE {name}"))
    in_thread(upgrade_schema, cluster.url(name))
    yield name
    with contextlib.suppress(Exception):
        in_thread(asyncio.run, cluster.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    services: list[Service] = []

    def start(database_url: str, **settings: str) -> Service:
        service = Service(database_url, tmp_path / f"service{len(services)}.log", **{**TIMEOUTS, **settings})
        services.append(service)
        return service

    yield start
    for service in services:
        service.stop()
        log = service.log()
        assert "non-checked-in connection" not in log, log[-3000:]
        assert "was garbage collected" not in log, log[-3000:]


# --- the subprocess fixture of docs/testing.md (kept verbatim there; a test checks) ----------
@pytest.fixture
def service_url(database_url: str) -> Iterator[str]:
    """The user service as a real uvicorn process on a free loopback port, on a migrated database."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url}
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
