"""Token families with reuse detection, re-authentication for what cannot be undone, and the
email-taken oracle bounded, through the whole app (its middleware, SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app import create_app
from conftest import PASSWORD, DirectDatabase, asgi_client, bearer, field_errors, sign_in, sign_up_and_in, signup_body
from settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def strict(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A service with no grace for a spent refresh token (REFRESH_REUSE_GRACE=0): any reuse is one."""
    async with (
        LifespanManager(create_app(replace(settings, refresh_reuse_grace=0))) as manager,
        asgi_client(manager) as client,
    ):
        yield client


# --- 1. families ----------------------------------------------------------------------------


async def test_a_reused_refresh_token_ends_the_family_for_the_thief_and_the_owner(
    strict: httpx.AsyncClient, db: DirectDatabase
) -> None:
    client = strict
    stolen = await sign_up_and_in(client)
    owner = (await client.post("/api/users/refresh", headers=bearer(stolen["refresh_token"]))).json()
    elsewhere = await sign_in(client)  # another device: another family

    thief = await client.post("/api/users/refresh", headers=bearer(stolen["refresh_token"]))

    assert thief.status_code == 401
    assert thief.json() == {"detail": "Token has been revoked"}
    assert (await client.post("/api/users/refresh", headers=bearer(owner["refresh_token"]))).status_code == 401
    assert (await client.get("/api/users/me", headers=bearer(owner["access_token"]))).status_code == 401
    assert (await client.get("/api/users/me", headers=bearer(elsewhere["access_token"]))).status_code == 200
    assert await db.scalar("SELECT count(*) FROM token_families") == 1


async def test_without_a_grace_racing_refreshes_of_one_token_rotate_once_and_then_end_the_family(
    strict: httpx.AsyncClient, db: DirectDatabase
) -> None:
    client = strict
    tokens = await sign_up_and_in(client)

    answers = await asyncio.gather(
        *(client.post("/api/users/refresh", headers=bearer(tokens["refresh_token"])) for _ in range(5))
    )

    assert sorted(answer.status_code for answer in answers) == [200, 401, 401, 401, 401]
    winner = next(answer.json() for answer in answers if answer.status_code == 200)
    for _ in range(100):  # the losers end the family once their answer is out
        if await db.scalar("SELECT count(*) FROM token_families") == 0:
            break
        await asyncio.sleep(0.05)
    assert (await client.get("/api/users/me", headers=bearer(winner["access_token"]))).status_code == 401


async def test_any_number_of_refreshes_keeps_one_row(client: httpx.AsyncClient, db: DirectDatabase) -> None:
    tokens = await sign_up_and_in(client)
    for _ in range(50):
        tokens = (await client.post("/api/users/refresh", headers=bearer(tokens["refresh_token"]))).json()
    assert await db.scalar("SELECT count(*) FROM token_families") == 1
    assert await db.scalar("SELECT generation FROM token_families") == 50
    assert (await client.get("/api/users/me", headers=bearer(tokens["access_token"]))).status_code == 200


async def test_signout_ends_the_access_tokens_of_its_family_at_once(client: httpx.AsyncClient) -> None:
    tokens = await sign_up_and_in(client)
    assert (await client.get("/api/users/me", headers=bearer(tokens["access_token"]))).status_code == 200

    assert (await client.post("/api/users/signout", headers=bearer(tokens["refresh_token"]))).status_code == 204

    gone = await client.get("/api/users/me", headers=bearer(tokens["access_token"]))
    assert gone.status_code == 401
    assert gone.json() == {"detail": "Token is no longer valid"}


# --- 2. re-authentication ------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_body",
    [None, {}, {"password": "Wrong-Guess-1"}, {"password": 1}],
    ids=["no body", "empty", "wrong", "not a string"],
)
async def test_deleting_the_account_takes_its_password(
    client: httpx.AsyncClient, db: DirectDatabase, request_body: dict[str, object] | None
) -> None:
    access = (await sign_up_and_in(client))["access_token"]
    extra = {} if request_body is None else {"json": request_body}

    response = await client.request("DELETE", "/api/users/me", headers=bearer(access), **extra)  # type: ignore[arg-type]

    assert field_errors(response, 403 if request_body == {"password": "Wrong-Guess-1"} else 400) == ["password"]
    assert await db.usernames() == ["alice"]
    right = await client.request("DELETE", "/api/users/me", json={"password": PASSWORD}, headers=bearer(access))
    assert right.status_code == 204
    assert await db.usernames() == []


async def test_changing_the_email_takes_the_password_and_other_fields_do_not(
    client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    access = (await sign_up_and_in(client))["access_token"]

    missing = await client.patch("/api/users/me", json={"email": "new@example.com"}, headers=bearer(access))
    wrong = await client.patch(
        "/api/users/me", json={"email": "new@example.com", "password": "Wrong-Guess-1"}, headers=bearer(access)
    )
    address = await client.patch("/api/users/me", json={"address": "Seoul"}, headers=bearer(access))
    right = await client.patch(
        "/api/users/me", json={"email": "new@example.com", "password": PASSWORD}, headers=bearer(access)
    )

    assert field_errors(missing) == ["password"]
    assert missing.json()["errors"][0]["message"] == "is required to change the email"
    assert field_errors(wrong, 403) == ["password"]
    assert wrong.json()["errors"][0]["message"] == "is not your current password"
    assert address.status_code == 200
    assert right.json()["email"] == "new@example.com"
    assert await db.scalar("SELECT email FROM users") == "new@example.com"


async def test_wrong_reauthentication_passwords_count_towards_the_signin_throttle(client: httpx.AsyncClient) -> None:
    access = (await sign_up_and_in(client))["access_token"]
    wrong = {"password": "Wrong-Guess-1"}
    for _ in range(3):
        assert (await client.request("DELETE", "/api/users/me", json=wrong, headers=bearer(access))).status_code == 403
    for _ in range(2):
        body = {"email": "new@example.com", **wrong}
        assert (await client.patch("/api/users/me", json=body, headers=bearer(access))).status_code == 403

    throttled = await client.request("DELETE", "/api/users/me", json={"password": PASSWORD}, headers=bearer(access))
    assert throttled.status_code == 429
    assert int(throttled.headers["retry-after"]) >= 1
    signin = await client.post("/api/users/signin", json={"username": "alice", "password": PASSWORD})
    assert signin.status_code == 429


# --- 3. the email-taken oracle ----------------------------------------------------------------


async def test_email_taken_answers_are_bounded_per_user_and_address(client: httpx.AsyncClient) -> None:
    for name in ("taken0", "taken1", "taken2", "taken3", "taken4", "taken5"):
        await client.post("/api/users/signup", json=signup_body(name))
    access = (await sign_up_and_in(client))["access_token"]

    answers = []
    for i in range(6):
        body = {"email": f"taken{i}@example.com", "password": PASSWORD}
        answers.append(await client.patch("/api/users/me", json=body, headers=bearer(access)))
        if i == 2:
            await sign_in(client)  # a signin clears password failures, not this count

    assert [answer.status_code for answer in answers] == [409] * 5 + [429]
    assert int(answers[-1].headers["retry-after"]) >= 1
    free = {"email": "free@example.com", "password": PASSWORD}
    assert (await client.patch("/api/users/me", json=free, headers=bearer(access))).status_code == 429
    assert (await client.patch("/api/users/me", json={"address": "Seoul"}, headers=bearer(access))).status_code == 200
