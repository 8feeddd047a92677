"""Accounts and tokens: signin, refresh rotation, signout, /me, password change, deletion."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import jwt
import pytest
from argon2 import PasswordHasher
from asgi_lifespan import LifespanManager

from app import create_app
from conftest import DirectDatabase, assert_401, bearer, sign_up_and_in, signup_body
from settings import Settings

pytestmark = pytest.mark.anyio

SECRET = "a-test-secret-long-enough-for-hs256-and-hs512-" + "x" * 32
PASSWORD = "Kiwi-Tango-Mango-57"


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url, secret_key=SECRET)


async def test_signin_answers_a_signed_token_pair(client: httpx.AsyncClient) -> None:
    tokens = await sign_up_and_in(client)

    assert set(tokens) == {"access_token", "refresh_token", "token_type", "device_token"}
    assert tokens["token_type"] == "bearer"
    access = jwt.decode(tokens["access_token"], SECRET, algorithms=["HS256"], audience="users")
    refresh = jwt.decode(tokens["refresh_token"], SECRET, algorithms=["HS256"], audience="users")
    assert access["iss"] == refresh["iss"] == "http://127.0.0.1:8000"
    user_id = (await client.get("/api/users/alice")).json()["id"]
    assert (access["sub"], access["typ"], refresh["sub"], refresh["typ"]) == (
        str(user_id),
        "access",
        str(user_id),
        "refresh",
    )
    assert access["exp"] - access["iat"] == 15 * 60
    assert refresh["exp"] - refresh["iat"] == 7 * 24 * 3600
    assert access["jti"] != refresh["jti"]
    device = jwt.decode(tokens["device_token"], SECRET, algorithms=["HS256"], audience="users")
    assert (device["sub"], device["typ"], device["exp"] - device["iat"]) == (str(user_id), "device", 90 * 24 * 3600)
    assert jwt.get_unverified_header(tokens["device_token"])["typ"] == "device+jwt"


@pytest.mark.parametrize(
    ("username", "password"), [("alice", "Wrong123!"), ("nobody", "Kiwi-Tango-Mango-57"), ("alice", "")]
)
async def test_signin_with_a_wrong_password_or_unknown_user_is_the_same_401(
    client: httpx.AsyncClient, username: str, password: str
) -> None:
    await client.post("/api/users/signup", json=signup_body("alice"))
    response = await client.post("/api/users/signin", json={"username": username, "password": password})
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid username or password"}


@pytest.mark.parametrize("body", [{}, {"username": "alice"}, {"username": "alice", "password": 1}, {"extra": 1}])
async def test_signin_with_a_malformed_body_is_400(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    assert (await client.post("/api/users/signin", json=body)).status_code == 400


async def test_signin_upgrades_a_hash_made_with_older_parameters(client: httpx.AsyncClient, db: DirectDatabase) -> None:
    await client.post("/api/users/signup", json=signup_body("alice"))
    old = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash("Kiwi-Tango-Mango-57")
    await db.execute("UPDATE users SET password_hash = :hash", {"hash": old})

    response = await client.post("/api/users/signin", json={"username": "alice", "password": "Kiwi-Tango-Mango-57"})

    assert response.status_code == 200
    upgraded = await db.scalar("SELECT password_hash FROM users")
    assert upgraded.startswith("$argon2id$v=19$m=19456,t=2,p=1$")  # this module's settings: the defaults
    assert (
        await client.post("/api/users/signin", json={"username": "alice", "password": "Kiwi-Tango-Mango-57"})
    ).is_success


async def test_me_answers_the_private_profile(client: httpx.AsyncClient) -> None:
    tokens = await sign_up_and_in(client)
    response = await client.get("/api/users/me", headers=bearer(tokens["access_token"]))
    assert response.status_code == 200
    assert response.json()["email"] == "alice@example.com"
    fields = {"id", "username", "email", "email_verified", "address", "phone_number", "created_at"}
    assert set(response.json()) == fields
    assert response.json()["email_verified"] is False


def forged(key: str = SECRET, algorithm: str = "HS256", **changes: Any) -> str:
    claims = {"sub": "1", "typ": "access", "jti": "x", "fam": "f", "iat": 0, "exp": 9e9, "ver": 0, **changes}
    return "Bearer " + jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm=algorithm)


@pytest.mark.parametrize(
    ("authorization", "detail"),
    [
        (None, "A bearer token is required"),
        ("Basic YWxpY2U6c2VjcmV0", "A bearer token is required"),
        ("Bearer", "A bearer token is required"),
        ("Bearer not-a-jwt", "Token is invalid"),
        (forged(key="another-secret-that-is-long-enough-0123456789"), "Token is invalid"),
        (forged(jti=None), "Token is invalid"),
        (forged(algorithm="HS512"), "Token is invalid"),
        (forged(exp=1), "Token has expired"),
        (forged(sub="x"), "Token is invalid"),
        (forged(sub="999"), "Token is no longer valid"),
    ],
)
async def test_me_refuses_missing_malformed_forged_and_expired_tokens(
    client: httpx.AsyncClient, authorization: str | None, detail: str
) -> None:
    await sign_up_and_in(client)
    headers = {} if authorization is None else {"Authorization": authorization}
    assert_401(await client.get("/api/users/me", headers=headers), detail)


async def test_a_tampered_token_is_refused(client: httpx.AsyncClient) -> None:
    access = (await sign_up_and_in(client))["access_token"]
    header, payload, signature = access.split(".")
    forged = ".".join([header, payload, signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")])
    assert_401(await client.get("/api/users/me", headers=bearer(forged)), "Token is invalid")


async def test_token_types_are_not_interchangeable(client: httpx.AsyncClient) -> None:
    tokens = await sign_up_and_in(client)
    assert_401(
        await client.get("/api/users/me", headers=bearer(tokens["refresh_token"])), "An access token is required"
    )
    response = await client.post("/api/users/refresh", headers=bearer(tokens["access_token"]))
    assert_401(response, "A refresh token is required")


async def test_an_expired_access_token_is_refused(settings: Settings) -> None:
    app = create_app(replace(settings, access_token_ttl=-60))  # past the 30 s leeway
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            tokens = await sign_up_and_in(client)
            assert_401(await client.get("/api/users/me", headers=bearer(tokens["access_token"])), "Token has expired")


async def test_refresh_rotates_and_a_reused_token_ends_the_whole_family(
    client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    first = await sign_up_and_in(client)

    response = await client.post("/api/users/refresh", headers=bearer(first["refresh_token"]))

    assert response.status_code == 200
    second = response.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert (await client.get("/api/users/me", headers=bearer(second["access_token"]))).status_code == 200
    third = (await client.post("/api/users/refresh", headers=bearer(second["refresh_token"]))).json()
    assert await db.scalar("SELECT count(*) FROM token_families") == 1  # one row, however many refreshes

    # The first token again: it was copied. The thief's and the owner's tokens die alike.
    reused = await client.post("/api/users/refresh", headers=bearer(first["refresh_token"]))
    assert_401(reused, "Token has been revoked")
    for token in (third["refresh_token"], second["refresh_token"]):
        assert_401(await client.post("/api/users/refresh", headers=bearer(token)), "Token has been revoked")
    for token in (third["access_token"], first["access_token"]):
        assert_401(await client.get("/api/users/me", headers=bearer(token)), "Token is no longer valid")
    assert await db.scalar("SELECT count(*) FROM token_families") == 0
    assert (await client.post("/api/users/signin", json={"username": "alice", "password": PASSWORD})).is_success


async def test_a_refresh_token_used_five_times_at_once_rotates_the_family_once(
    client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    refresh = (await sign_up_and_in(client))["refresh_token"]
    answers: list[httpx.Response] = []

    async def use() -> None:
        answers.append(await client.post("/api/users/refresh", headers=bearer(refresh)))

    async with anyio.create_task_group() as tasks:
        for _ in range(5):
            tasks.start_soon(use)

    # Within REFRESH_REUSE_GRACE every use gets a pair of the one new generation: no fork.
    assert [answer.status_code for answer in answers] == [200] * 5
    generations = {jwt.decode(a.json()["refresh_token"], SECRET, ["HS256"], audience="users")["gen"] for a in answers}
    assert generations == {1}
    assert await db.scalar("SELECT generation FROM token_families") == 1


async def test_signout_ends_the_family_and_its_access_tokens_at_once(client: httpx.AsyncClient) -> None:
    tokens = await sign_up_and_in(client)
    other = (await client.post("/api/users/signin", json={"username": "alice", "password": PASSWORD})).json()

    response = await client.post("/api/users/signout", headers=bearer(tokens["refresh_token"]))

    assert response.status_code == 204
    assert response.content == b""
    assert_401(await client.get("/api/users/me", headers=bearer(tokens["access_token"])), "Token is no longer valid")
    assert_401(
        await client.post("/api/users/refresh", headers=bearer(tokens["refresh_token"])), "Token has been revoked"
    )
    assert_401(
        await client.post("/api/users/signout", headers=bearer(tokens["refresh_token"])), "Token has been revoked"
    )
    # Another signin is another family: it goes on.
    assert (await client.get("/api/users/me", headers=bearer(other["access_token"]))).status_code == 200


async def test_families_past_their_last_token_are_purged_by_the_next_signin(
    client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    await sign_up_and_in(client)
    await db.execute("UPDATE token_families SET expires_at = :past", {"past": datetime(2000, 1, 1, tzinfo=UTC)})
    await sign_up_and_in(client, "bob")

    assert await db.scalar("SELECT count(*) FROM token_families") == 1


async def test_update_me_changes_the_given_fields_only(client: httpx.AsyncClient) -> None:
    access = (await sign_up_and_in(client))["access_token"]

    changed = await client.patch(
        "/api/users/me", json={"address": "Seoul, Gwanak-ro 1", "phone_number": "01012345678"}, headers=bearer(access)
    )
    assert changed.status_code == 200
    assert (changed.json()["address"], changed.json()["phone_number"]) == ("Seoul, Gwanak-ro 1", "01012345678")

    body = {"email": "new@example.com", "password": PASSWORD}
    email = await client.patch("/api/users/me", json=body, headers=bearer(access))
    assert email.json()["email"] == "new@example.com"
    assert email.json()["address"] == "Seoul, Gwanak-ro 1"

    cleared = await client.patch("/api/users/me", json={"address": None}, headers=bearer(access))
    assert cleared.json()["address"] is None
    unchanged = await client.patch("/api/users/me", json={}, headers=bearer(access))
    assert unchanged.json() == cleared.json()
    assert (await client.get("/api/users/me", headers=bearer(access))).json() == cleared.json()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": None}, "email"),
        ({"email": "nope"}, "email"),
        ({"address": "x" * 101}, "address"),
        ({"address": "line\nbreak"}, "address"),
        ({"phone_number": "0101234567"}, "phone_number"),
        ({"phone_number": "01112345678"}, "phone_number"),
        ({"phone_number": "010-1234-5678"}, "phone_number"),
        ({"phone_number": 1012345678}, "phone_number"),
        ({"username": "bob"}, "username"),
    ],
)
async def test_update_me_refuses_invalid_fields_and_writes_nothing(
    client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    access = (await sign_up_and_in(client))["access_token"]
    before = (await client.get("/api/users/me", headers=bearer(access))).json()

    response = await client.patch("/api/users/me", json=body, headers=bearer(access))

    assert response.status_code == 400
    assert [error["field"] for error in response.json()["errors"]] == [field]
    assert (await client.get("/api/users/me", headers=bearer(access))).json() == before


async def test_update_me_to_a_taken_email_is_409(client: httpx.AsyncClient) -> None:
    await sign_up_and_in(client, "bob")
    access = (await sign_up_and_in(client, "alice"))["access_token"]

    body = {"email": "BOB@example.com", "password": PASSWORD}
    response = await client.patch("/api/users/me", json=body, headers=bearer(access))

    assert response.status_code == 409
    assert response.json() == {"detail": "Email already exists"}
    assert (await client.get("/api/users/me", headers=bearer(access))).json()["email"] == "alice@example.com"


async def test_address_limit_is_inclusive(client: httpx.AsyncClient) -> None:
    access = (await sign_up_and_in(client))["access_token"]
    response = await client.patch("/api/users/me", json={"address": "가" * 100}, headers=bearer(access))
    assert response.status_code == 200


async def test_changing_the_password_ends_every_earlier_token(client: httpx.AsyncClient, db: DirectDatabase) -> None:
    tokens = await sign_up_and_in(client)
    other = (await client.post("/api/users/signin", json={"username": "alice", "password": PASSWORD})).json()
    body = {"old_password": PASSWORD, "new_password": "Better-Plum-88-Grape"}

    response = await client.put("/api/users/me/password", json=body, headers=bearer(tokens["access_token"]))

    assert response.status_code == 204
    for pair in (tokens, other):
        assert_401(await client.get("/api/users/me", headers=bearer(pair["access_token"])), "Token is no longer valid")
        refreshed = await client.post("/api/users/refresh", headers=bearer(pair["refresh_token"]))
        assert_401(refreshed, "Token has been revoked")
    assert await db.scalar("SELECT count(*) FROM token_families") == 0  # their rows went too
    old = await client.post("/api/users/signin", json={"username": "alice", "password": PASSWORD})
    assert old.status_code == 401
    new = await client.post("/api/users/signin", json={"username": "alice", "password": "Better-Plum-88-Grape"})
    assert (await client.get("/api/users/me", headers=bearer(new.json()["access_token"]))).status_code == 200


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"old_password": "Wrong123!", "new_password": "Better-Plum-456-Pear?"}, 403),
        ({"old_password": "Kiwi-Tango-Mango-57", "new_password": "weak"}, 400),
        ({"old_password": "Kiwi-Tango-Mango-57", "new_password": "Fourteen-chars"}, 400),
        (
            {"old_password": "Kiwi-Tango-Mango-57", "new_password": "QwertyUIOP12345"},
            400,
        ),  # on the blocklist, in any case
        ({"old_password": "Kiwi-Tango-Mango-57"}, 400),
    ],
)
async def test_a_refused_password_change_changes_nothing(
    client: httpx.AsyncClient, body: dict[str, str], status: int
) -> None:
    tokens = await sign_up_and_in(client)

    response = await client.put("/api/users/me/password", json=body, headers=bearer(tokens["access_token"]))

    assert response.status_code == status
    assert (await client.get("/api/users/me", headers=bearer(tokens["access_token"]))).status_code == 200
    signin = await client.post("/api/users/signin", json={"username": "alice", "password": "Kiwi-Tango-Mango-57"})
    assert signin.status_code == 200


async def test_deleting_the_account_ends_its_tokens_and_frees_the_username(
    client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    tokens = await sign_up_and_in(client)
    old_id = (await client.get("/api/users/alice")).json()["id"]

    response = await client.request(
        "DELETE", "/api/users/me", json={"password": PASSWORD}, headers=bearer(tokens["access_token"])
    )

    assert response.status_code == 204
    assert await db.usernames() == []
    assert await db.scalar("SELECT count(*) FROM token_families") == 0
    assert_401(await client.get("/api/users/me", headers=bearer(tokens["access_token"])), "Token is no longer valid")
    assert_401(
        await client.post("/api/users/refresh", headers=bearer(tokens["refresh_token"])), "Token has been revoked"
    )
    assert (await client.get("/api/users/alice")).status_code == 404

    again = await sign_up_and_in(client)  # the same name, a new user with a new id
    assert (await client.get("/api/users/alice")).json()["id"] > old_id
    assert_401(await client.get("/api/users/me", headers=bearer(tokens["access_token"])), "Token is no longer valid")
    assert (await client.get("/api/users/me", headers=bearer(again["access_token"]))).status_code == 200


async def test_tokens_work_across_processes_that_share_the_secret(
    settings: Settings, client: httpx.AsyncClient
) -> None:
    tokens = await sign_up_and_in(client)
    async with LifespanManager(create_app(settings)) as other:
        transport = httpx.ASGITransport(app=other.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as replica:
            assert (await replica.get("/api/users/me", headers=bearer(tokens["access_token"]))).status_code == 200
            newer = await replica.post("/api/users/refresh", headers=bearer(tokens["refresh_token"]))
            newest = await replica.post("/api/users/refresh", headers=bearer(newer.json()["refresh_token"]))
            assert (newer.status_code, newest.status_code) == (200, 200)
    # The rotations are in the database: the first process takes the token two generations back for a reuse.
    assert (await client.post("/api/users/refresh", headers=bearer(tokens["refresh_token"]))).status_code == 401


def test_without_a_secret_key_one_process_generates_one_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="users"):
        create_app(Settings(secret_key=None, web_concurrency=1))
    assert "neither SIGNING_KEY_FILE nor SECRET_KEY is set" in caplog.text


def test_a_short_secret_key_is_refused() -> None:
    with pytest.raises(ValueError, match="SECRET_KEY must be at least 32 bytes"):
        create_app(Settings(secret_key="too-short"))


def test_without_a_secret_key_several_workers_refuse_to_start() -> None:
    with pytest.raises(ValueError, match="nor SECRET_KEY is set and WEB_CONCURRENCY > 1"):
        create_app(Settings(secret_key=None, web_concurrency=2))
