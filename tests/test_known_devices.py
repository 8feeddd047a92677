"""Known devices (OWASP's device cookie), on SQLite and PostgreSQL: a signin answers a
`device_token`, and a later signin that sends it back for that account passes the address and
account throttles that other clients' failures set off, with a limit of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from app import create_app
from conftest import PASSWORD, DirectDatabase, client_from, signup_body
from settings import Settings

pytestmark = pytest.mark.anyio

NAT = "198.51.100.7"  # one address, many people


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Starlette]:
    # Low limits, so that few hashes set them off.
    changed = replace(settings, signin_address_failure_limit=3, signin_account_failure_limit=6)
    async with LifespanManager(create_app(changed)) as manager:
        yield manager.app  # type: ignore[misc]


async def signin(client: httpx.AsyncClient, username: str, password: str, device: str | None = None) -> httpx.Response:
    body = {"username": username, "password": password} | ({"device_token": device} if device else {})
    return await client.post("/api/users/signin", json=body)


async def test_a_known_device_signs_in_behind_an_address_that_others_got_throttled(
    app: Starlette, db: DirectDatabase
) -> None:
    async with client_from(app, NAT) as client:
        await client.post("/api/users/signup", json=signup_body("alice"))
        device = (await signin(client, "alice", PASSWORD)).json()["device_token"]
        for i in range(3):  # someone else behind the same address
            assert (await signin(client, f"random{i}", "Wrong-Guess-1")).status_code == 401
        assert (await signin(client, "alice", PASSWORD)).status_code == 429  # without the token: throttled

        again = await signin(client, "alice", PASSWORD, device)

        assert again.status_code == 200
        assert again.json()["device_token"] != device  # a new one every signin
        assert (await signin(client, "alice", PASSWORD, again.json()["device_token"])).status_code == 200


async def test_a_known_device_passes_an_account_under_attack_from_elsewhere(app: Starlette) -> None:
    async with client_from(app, "203.0.113.9") as owner:
        await owner.post("/api/users/signup", json=signup_body("alice"))
        device = (await signin(owner, "alice", PASSWORD)).json()["device_token"]
        for i in range(6):  # six addresses, one guess each: the account's limit
            async with client_from(app, f"192.0.2.{i}") as guesser:
                assert (await signin(guesser, "alice", "Wrong-Guess-1")).status_code == 401
        assert (await signin(owner, "alice", PASSWORD)).status_code == 429

        assert (await signin(owner, "alice", PASSWORD, device)).status_code == 200


async def test_a_device_has_a_failure_limit_of_its_own_that_counts_nowhere_else(
    app: Starlette, db: DirectDatabase
) -> None:
    async with client_from(app, NAT) as client:
        await client.post("/api/users/signup", json=signup_body("alice"))
        device = (await signin(client, "alice", PASSWORD)).json()["device_token"]
        statuses = [(await signin(client, "alice", "Wrong-Guess-1", device)).status_code for _ in range(6)]
        assert statuses == [401] * 5 + [429]  # SIGNIN_FAILURE_LIMIT, for this device
        assert (await signin(client, "alice", PASSWORD, device)).status_code == 429
        # The device's failures were its own: the address and the account are untouched.
        assert await db.column("SELECT DISTINCT kind FROM signin_failures WHERE failures > 0 AND kind <> 'signup'") == [
            "device"
        ]
        assert (await signin(client, "alice", PASSWORD)).status_code == 200  # no token: the usual rules


@pytest.mark.parametrize("given", ["another account's", "forged", "malformed"])
async def test_a_device_token_that_is_not_this_accounts_is_no_device(app: Starlette, given: str) -> None:
    async with client_from(app, NAT) as client:
        for name in ("alice", "bob"):
            await client.post("/api/users/signup", json=signup_body(name))
        bobs = (await signin(client, "bob", PASSWORD)).json()["device_token"]
        token = {"another account's": bobs, "forged": bobs[:-4] + "AAAA", "malformed": "not-a-token"}[given]
        for i in range(3):
            await signin(client, f"random{i}", "Wrong-Guess-1")

        assert (await signin(client, "alice", PASSWORD, token)).status_code == 429
