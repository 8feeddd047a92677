"""CORS for browser clients, by allowlist (CORS_ALLOW_ORIGINS), through Starlette's CORSMiddleware."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app import OPERATIONS, create_app
from settings import Settings

pytestmark = pytest.mark.anyio

ALLOWED = "https://app.example.com"


async def client_for(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(create_app(settings)) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


@pytest.fixture
async def cors_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async for client in client_for(replace(settings, cors_allow_origins=(ALLOWED, "https://admin.example.com"))):
        yield client


def preflight(origin: str, method: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type",
    }


ROUTES = [(op.path.replace("{username}", "alice"), op.method) for op in OPERATIONS]


@pytest.mark.parametrize(("path", "method"), ROUTES)
async def test_a_preflight_from_an_allowed_origin_succeeds_for_every_route(
    cors_client: httpx.AsyncClient, path: str, method: str
) -> None:
    response = await cors_client.options(path, headers=preflight(ALLOWED, method))
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert method in response.headers["access-control-allow-methods"]
    allowed_headers = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers
    assert "content-type" in allowed_headers
    assert "access-control-allow-credentials" not in response.headers  # tokens travel in a header, not cookies


async def test_a_request_from_an_allowed_origin_carries_the_header(cors_client: httpx.AsyncClient) -> None:
    response = await cors_client.get("/api/users/nobody", headers={"Origin": ALLOWED})
    assert response.status_code == 404
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert "retry-after" in response.headers["access-control-expose-headers"].lower()


@pytest.mark.parametrize("origin", ["https://evil.example.net", "https://app.example.com.evil.net", "null"])
async def test_any_other_origin_gets_no_allow_origin(cors_client: httpx.AsyncClient, origin: str) -> None:
    refused = await cors_client.options("/api/users/me", headers=preflight(origin, "GET"))
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    plain = await cors_client.get("/healthz", headers={"Origin": origin})
    assert plain.status_code == 200
    assert "access-control-allow-origin" not in plain.headers


async def test_by_default_there_are_no_cors_headers_at_all(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", headers={"Origin": ALLOWED})
    assert not [name for name in response.headers if name.startswith("access-control-")]
    preflight_response = await client.options("/api/users/me", headers=preflight(ALLOWED, "GET"))
    assert preflight_response.status_code == 405
    assert not [name for name in preflight_response.headers if name.startswith("access-control-")]


async def test_a_star_allows_every_origin_without_credentials(settings: Settings) -> None:
    async for client in client_for(replace(settings, cors_allow_origins=("*",))):
        response = await client.options("/api/users/me", headers=preflight("https://anyone.example.org", "PATCH"))
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers


def test_the_setting_is_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORS_ALLOW_ORIGINS", "https://a.example.com, https://b.example.com,")
    assert Settings.from_environ().cors_allow_origins == ("https://a.example.com", "https://b.example.com")
