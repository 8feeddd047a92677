"""The in-process fixture docs/testing.md offers to other projects' test suites (kept verbatim there)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from pathlib import Path

import anyio.to_thread
import httpx
import pytest
from asgi_lifespan import LifespanManager

from app import create_app
from migrate import upgrade_schema
from settings import Settings

pytestmark = pytest.mark.anyio


# --- docs/testing.md's in-process fixture -----------------------------------------------------
@pytest.fixture
async def users_client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The user service in this process, on a fresh migrated SQLite file, lifespan run."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'users.db'}"
    await anyio.to_thread.run_sync(upgrade_schema, url)
    app = create_app(Settings(database_url=url))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://users") as client:
            yield client


# --------------------------------------------------------------------------------------------


async def test_the_in_process_fixture_serves_the_api(users_client: httpx.AsyncClient) -> None:
    body = {"username": "alice", "password": "Kiwi-Tango-Mango-57", "email": "alice@example.com"}
    assert (await users_client.post("/api/users/signup", json=body)).status_code == 201
    assert (await users_client.get("/api/users/alice")).json()["username"] == "alice"


def test_the_testing_page_shows_both_fixtures_verbatim() -> None:
    import conftest

    page = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text()
    for fixture in (users_client, conftest.service_url):
        source = inspect.getsource(inspect.unwrap(fixture))
        assert source in page, f"docs/testing.md no longer shows {fixture.__name__} as tests/ has it"
