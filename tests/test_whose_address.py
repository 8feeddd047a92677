"""Whose address the throttle counts and the log names, on SQLite and PostgreSQL: the connection's
peer unless FORWARDED_ALLOW_IPS trusts a proxy; parsed and canonical, whatever a header held; an
IPv6 client by its /64."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from addresses import canonical, throttle_key
from app import create_app
from clusters import StartService
from conftest import PASSWORD, DirectDatabase, client_from, signup_body
from logs import flush_logs
from settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Starlette]:
    async with LifespanManager(create_app(settings)) as manager:
        yield manager.app  # type: ignore[misc]


async def signin(client: httpx.AsyncClient, username: str, password: str, **headers: str) -> int:
    response = await client.post(
        "/api/users/signin", json={"username": username, "password": password}, headers=headers
    )
    return response.status_code


@pytest.mark.parametrize(
    ("written", "key"),
    [
        ("2001:DB8::1", "2001:db8::/64"),
        ("2001:db8:0:0::1", "2001:db8::/64"),
        ("2001:db8::ffff:ffff:ffff:ffff", "2001:db8::/64"),  # the same /64
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:198.51.100.7", "198.51.100.7"),  # IPv4, mapped into IPv6
        ("198.51.100.7", "198.51.100.7"),
        ("198.51.100.7 route=/admin", "unknown"),
        ("not-an-address", "unknown"),
        ("x" * 300, "unknown"),
    ],
)
def test_addresses_are_parsed_into_their_canonical_form(written: str, key: str) -> None:
    assert throttle_key(canonical(written)) == key


async def test_one_ipv6_network_is_one_client(app: Starlette) -> None:
    async with client_from(app, "2001:db8:1::9") as owner:
        assert (await owner.post("/api/users/signup", json=signup_body("alice"))).status_code == 201
    statuses = []
    for host in range(1, 8):  # a new address of one /64 for every guess
        async with client_from(app, f"2001:DB8:0:0::{host:x}") as guesser:
            statuses.append(await signin(guesser, "alice", "Wrong-Guess-1"))
    assert statuses == [401] * 5 + [429] * 2
    async with client_from(app, "2001:db8:1::9") as owner:  # another /64
        assert await signin(owner, "alice", PASSWORD) == 200


async def test_what_is_not_an_address_is_counted_and_logged_as_unknown(
    app: Starlette, db: DirectDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    async with client_from(app, "198.51.100.7 route=/admin") as client:
        assert await signin(client, "alice", "Wrong-Guess-1") == 401
    assert set(await db.column("SELECT address FROM signin_failures WHERE address <> ''")) == {"unknown"}
    flush_logs()
    logged = capsys.readouterr().out
    assert "route=/admin" not in logged
    assert re.search(r"POST /api/users/signin 401 \S+ ms route=/api/users/signin client=unknown", logged), logged


# --- through real HTTP: proxy headers are trusted only when a proxy is named ---------------------


def from_address(local: str) -> httpx.AsyncHTTPTransport:
    """A transport whose connections come from another loopback address (all of 127/8 is ours)."""
    return httpx.AsyncHTTPTransport(local_address=local)


async def test_without_forwarded_allow_ips_a_forwarded_address_is_not_believed(
    database_url: str, start_service: StartService
) -> None:
    service = start_service(database_url)  # FORWARDED_ALLOW_IPS unset: the default
    async with (
        httpx.AsyncClient(base_url=service.url, timeout=30) as guesser,
        httpx.AsyncClient(base_url=service.url, timeout=30, transport=from_address("127.0.0.2")) as owner,
    ):
        assert (await owner.post("/api/users/signup", json=signup_body("alice"))).status_code == 201
        # Each guess names a made-up address, then the owner's own: neither is believed.
        statuses = [
            await signin(guesser, "alice", "Wrong-Guess-1", **{"X-Forwarded-For": f"203.0.113.{i}"}) for i in range(8)
        ]
        statuses += [await signin(guesser, "alice", "Wrong-Guess-1", **{"X-Forwarded-For": "127.0.0.2"})]
        assert statuses == [401] * 5 + [429] * 4  # counted against the guesser's own address
        assert await signin(owner, "alice", PASSWORD) == 200  # the owner is not locked out
    service.stop()  # its log is written out
    assert "client=127.0.0.1" in service.log()
    assert "203.0.113" not in service.log()


async def test_with_forwarded_allow_ips_the_proxys_header_names_the_client(
    database_url: str, start_service: StartService
) -> None:
    service = start_service(database_url, FORWARDED_ALLOW_IPS="127.0.0.1", LOG_FORMAT="json")
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as proxy:
        statuses = [
            await signin(proxy, "alice", "Wrong-Guess-1", **{"X-Forwarded-For": f"203.0.113.{i}"}) for i in range(8)
        ]
        assert statuses == [401] * 8  # eight clients, one guess each
        assert await signin(proxy, "alice", "Wrong-Guess-1", **{"X-Forwarded-For": "2001:DB8::7"}) == 401
    service.stop()  # its log is written out
    assert '"client": "2001:db8::7"' in service.log()
