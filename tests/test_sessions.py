"""Sessions a user can see and end, on SQLite and PostgreSQL: one a signin (a token family), listed
with where and when; ended one at a time or all but this one; an absolute lifetime; a grace for a
spent refresh token that does not fork the family; and signing in with the email address."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import httpx
import jwt
import pytest
from asgi_lifespan import LifespanManager

from app import create_app
from clusters import StartService
from conftest import PASSWORD, DirectDatabase, assert_401, bearer, sign_in, sign_up_and_in, signup_body
from settings import Settings

pytestmark = pytest.mark.anyio

ROUNDS = 20  # rounds of each race


async def signin_from(client: httpx.AsyncClient, agent: str, username: str = "alice") -> dict[str, str]:
    body = {"username": username, "password": PASSWORD}
    response = await client.post("/api/users/signin", json=body, headers={"User-Agent": agent})
    assert response.status_code == 200, response.text
    tokens: dict[str, str] = response.json()
    return tokens


def family(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["fam"])


def generation(token: str) -> int:
    return int(jwt.decode(token, options={"verify_signature": False})["gen"])


async def test_a_user_sees_their_sessions_newest_first_with_where_and_when(client: httpx.AsyncClient) -> None:
    await client.post("/api/users/signup", json=signup_body("alice"))
    phone = await signin_from(client, "Phone/1.0")
    laptop = await signin_from(client, "Laptop/2.0 " + "x" * 300)
    refreshed = (await client.post("/api/users/refresh", headers=bearer(phone["refresh_token"]))).json()
    await sign_up_and_in(client, "bob")  # another account's sessions are not alice's

    response = await client.get("/api/users/me/sessions", headers=bearer(laptop["access_token"]))

    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    items = response.json()["items"]
    assert [item["id"] for item in items] == [family(laptop["access_token"]), family(phone["access_token"])]
    assert [item["current"] for item in items] == [True, False]
    assert items[0]["user_agent"] == "Laptop/2.0 " + "x" * 189  # cut to 200 characters
    assert items[0]["address"] == "127.0.0.1"
    assert items[1]["last_used_at"] > items[1]["created_at"]  # the refresh
    assert family(refreshed["refresh_token"]) == items[1]["id"]


async def test_ending_a_session_stops_its_tokens_at_once_and_no_other(client: httpx.AsyncClient) -> None:
    await client.post("/api/users/signup", json=signup_body("alice"))
    lost_phone, laptop = await signin_from(client, "Phone"), await signin_from(client, "Laptop")
    bobs = await sign_up_and_in(client, "bob")

    ended = await client.delete(
        f"/api/users/me/sessions/{family(lost_phone['access_token'])}", headers=bearer(laptop["access_token"])
    )

    assert ended.status_code == 204
    assert_401(
        await client.get("/api/users/me", headers=bearer(lost_phone["access_token"])), "Token is no longer valid"
    )
    assert_401(
        await client.post("/api/users/refresh", headers=bearer(lost_phone["refresh_token"])), "Token has been revoked"
    )
    assert (await client.get("/api/users/me", headers=bearer(laptop["access_token"]))).status_code == 200
    for other in (family(bobs["access_token"]), family(lost_phone["access_token"]), "0" * 32):
        # Another account's session, or one that does not exist (any more): 404 alike.
        response = await client.delete(f"/api/users/me/sessions/{other}", headers=bearer(laptop["access_token"]))
        assert response.status_code == 404
        assert response.json() == {"detail": "No such session"}
    assert (await client.get("/api/users/me", headers=bearer(bobs["access_token"]))).status_code == 200


async def test_signing_out_everywhere_else_keeps_this_session(client: httpx.AsyncClient, db: DirectDatabase) -> None:
    await client.post("/api/users/signup", json=signup_body("alice"))
    others = [await signin_from(client, f"Device {i}") for i in range(3)]
    this = await signin_from(client, "This one")

    assert (await client.delete("/api/users/me/sessions", headers=bearer(this["access_token"]))).status_code == 204

    for tokens in others:
        assert (await client.get("/api/users/me", headers=bearer(tokens["access_token"]))).status_code == 401
    listed = (await client.get("/api/users/me/sessions", headers=bearer(this["access_token"]))).json()["items"]
    assert [item["user_agent"] for item in listed] == ["This one"]
    assert await db.scalar("SELECT count(*) FROM token_families") == 1


async def test_a_session_stops_refreshing_after_session_max_age_however_often_refreshed(
    client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    assert Settings().session_max_age == 30 * 24 * 3600
    tokens = await sign_up_and_in(client)
    for _ in range(3):
        tokens = (await client.post("/api/users/refresh", headers=bearer(tokens["refresh_token"]))).json()
    # As if its signin had been 30 days and a minute ago (the leeway is 30 s).
    signed_in = datetime.now(UTC) - timedelta(days=30, minutes=1)
    await db.execute("UPDATE token_families SET created_at = :at", {"at": signed_in})

    response = await client.post("/api/users/refresh", headers=bearer(tokens["refresh_token"]))

    assert_401(response, "The session has expired; sign in again")
    assert await db.scalar("SELECT count(*) FROM token_families") == 0  # ended: its access tokens too
    assert (
        await db.scalar("SELECT detail FROM audit_events WHERE event = 'session_ended'") == "it reached SESSION_MAX_AGE"
    )
    await sign_in(client)  # a new signin, a new session


async def test_a_refresh_answer_that_was_lost_can_be_asked_for_again_within_the_grace(
    client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    first = await sign_up_and_in(client)
    lost = (await client.post("/api/users/refresh", headers=bearer(first["refresh_token"]))).json()

    again = await client.post("/api/users/refresh", headers=bearer(first["refresh_token"]))

    assert again.status_code == 200
    assert generation(again.json()["refresh_token"]) == generation(lost["refresh_token"]) == 1  # not a fork
    assert (await client.post("/api/users/refresh", headers=bearer(lost["refresh_token"]))).status_code == 200
    assert await db.scalar("SELECT generation FROM token_families") == 2


@pytest.mark.parametrize("reuse", ["after the grace", "two generations back"])
async def test_a_reuse_past_the_grace_or_of_an_older_token_ends_the_family(
    client: httpx.AsyncClient, db: DirectDatabase, reuse: str
) -> None:
    first = await sign_up_and_in(client)
    second = (await client.post("/api/users/refresh", headers=bearer(first["refresh_token"]))).json()
    third = (await client.post("/api/users/refresh", headers=bearer(second["refresh_token"]))).json()
    if reuse == "after the grace":
        rotated = datetime.now(UTC) - timedelta(seconds=11)
        await db.execute("UPDATE token_families SET rotated_at = :at", {"at": rotated})
        presented = second
    else:
        presented = first

    response = await client.post("/api/users/refresh", headers=bearer(presented["refresh_token"]))

    assert_401(response, "Token has been revoked")
    assert (await client.get("/api/users/me", headers=bearer(third["access_token"]))).status_code == 401
    assert await db.column("SELECT event FROM audit_events WHERE event = 'refresh_reused'") == ["refresh_reused"]


async def test_sign_in_with_the_email_address_as_with_the_username(
    client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    await client.post("/api/users/signup", json=signup_body("alice", email="Alice.Smith@Example.com"))
    for identifier in ("alice", "Alice.Smith@Example.com", "alice.smith@example.com"):
        tokens = await sign_in(client, identifier)
        assert (await client.get("/api/users/me", headers=bearer(tokens["access_token"]))).json()["username"] == "alice"
    wrong = await client.post("/api/users/signin", json={"username": "alice.smith@example.com", "password": "Wrong-1"})
    unknown = await client.post("/api/users/signin", json={"username": "nobody@example.com", "password": PASSWORD})
    assert wrong.json() == unknown.json() == {"detail": "Invalid username or password"}
    # One account, one count, whichever name it was given by.
    assert await db.scalar("SELECT failures FROM signin_failures WHERE address = '' AND username = 'alice'") == 1


# --- through real HTTP, two workers -----------------------------------------------------------------


@pytest.fixture
def two_workers(database_url: str, start_service: StartService) -> str:
    return start_service(database_url, WEB_CONCURRENCY="2").url


async def test_an_ended_session_stops_working_on_every_worker_at_once(two_workers: str) -> None:
    async with httpx.AsyncClient(base_url=two_workers, timeout=30) as laptop:
        await laptop.post("/api/users/signup", json=signup_body("alice"))
        phone = await signin_from(laptop, "Phone")
        mine = await signin_from(laptop, "Laptop")

        async def phone_asks() -> int:  # a new connection each time: either worker answers
            async with httpx.AsyncClient(base_url=two_workers, timeout=30) as client:
                return (await client.get("/api/users/me", headers=bearer(phone["access_token"]))).status_code

        assert await asyncio.gather(*(phone_asks() for _ in range(10))) == [200] * 10
        path = f"/api/users/me/sessions/{family(phone['access_token'])}"
        assert (await laptop.delete(path, headers=bearer(mine["access_token"]))).status_code == 204
        assert await asyncio.gather(*(phone_asks() for _ in range(20))) == [401] * 20


async def test_two_tabs_refreshing_at_once_keep_one_line_of_generations(two_workers: str, db: DirectDatabase) -> None:
    async with (
        httpx.AsyncClient(base_url=two_workers, timeout=30) as first,
        httpx.AsyncClient(base_url=two_workers, timeout=30) as second,
    ):
        tokens = await sign_up_and_in(first)
        for round in range(ROUNDS):
            answers = await asyncio.gather(
                *(tab.post("/api/users/refresh", headers=bearer(tokens["refresh_token"])) for tab in (first, second))
            )
            assert [answer.status_code for answer in answers] == [200, 200], round
            generations = {generation(answer.json()["refresh_token"]) for answer in answers}
            assert generations == {round + 1}, round  # the same, newest generation: no fork
            assert await db.scalar("SELECT generation FROM token_families") == round + 1
            tokens = answers[round % 2].json()  # either tab goes on
        assert (await first.get("/api/users/me", headers=bearer(tokens["access_token"]))).status_code == 200


async def test_a_known_device_token_from_an_expired_session_still_names_the_device(settings: Settings) -> None:
    # The device token outlives sessions (DEVICE_TOKEN_TTL): it is proof of an earlier signin, not a session.
    async with LifespanManager(create_app(replace(settings, signin_address_failure_limit=1))) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            tokens = await sign_up_and_in(client)
            await client.post("/api/users/signout", headers=bearer(tokens["refresh_token"]))
            for name in ("x1", "x2"):
                await client.post("/api/users/signin", json={"username": name, "password": "Wrong-1"})
            body = {"username": "alice", "password": PASSWORD, "device_token": tokens["device_token"]}
            assert (await client.post("/api/users/signin", json=body)).status_code == 200
