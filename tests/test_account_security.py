"""Accounts, second pass, through a real uvicorn on SQLite and PostgreSQL: token families with
reuse detection, re-authentication for what cannot be undone, the email-taken oracle bounded,
usernames unique regardless of case, and the password rules that need another field."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from chaos import Service
from conftest import Database, in_thread, postgres_admin, postgres_dsn, signup_body
from db import upgrade_schema

pytestmark = pytest.mark.anyio

PASSWORD = "Kiwi-Tango-57"


@pytest.fixture
def service(database_url: str, tmp_path: Path) -> Iterator[Service]:
    service = Service(database_url, tmp_path / "service.log")
    yield service
    service.stop()


@pytest.fixture
async def client(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def sign_up_and_in(client: httpx.AsyncClient, username: str = "alice") -> dict[str, str]:
    assert (await client.post("/api/users/signup", json=signup_body(username))).status_code == 201
    return await sign_in(client, username)


async def sign_in(client: httpx.AsyncClient, username: str = "alice", password: str = PASSWORD) -> dict[str, str]:
    response = await client.post("/api/users/signin", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    tokens: dict[str, str] = response.json()
    return tokens


def field_errors(response: httpx.Response) -> list[str]:
    assert response.status_code == 400, response.text
    return [error["field"] for error in response.json()["errors"]]


# --- 1. families ----------------------------------------------------------------------------


async def test_a_reused_refresh_token_ends_the_family_for_the_thief_and_the_owner(
    client: httpx.AsyncClient, db: Database
) -> None:
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


async def test_racing_refreshes_of_one_token_rotate_once_and_then_end_the_family(
    client: httpx.AsyncClient, db: Database
) -> None:
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


async def test_any_number_of_refreshes_keeps_one_row(client: httpx.AsyncClient, db: Database) -> None:
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
    client: httpx.AsyncClient, db: Database, request_body: dict[str, object] | None
) -> None:
    access = (await sign_up_and_in(client))["access_token"]
    extra = {} if request_body is None else {"json": request_body}

    response = await client.request("DELETE", "/api/users/me", headers=bearer(access), **extra)  # type: ignore[arg-type]

    assert field_errors(response) == ["password"]
    assert await db.usernames() == ["alice"]
    right = await client.request("DELETE", "/api/users/me", json={"password": PASSWORD}, headers=bearer(access))
    assert right.status_code == 204
    assert await db.usernames() == []


async def test_changing_the_email_takes_the_password_and_other_fields_do_not(
    client: httpx.AsyncClient, db: Database
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
    assert field_errors(wrong) == ["password"]
    assert wrong.json()["errors"][0]["message"] == "is not your current password"
    assert address.status_code == 200
    assert right.json()["email"] == "new@example.com"
    assert await db.scalar("SELECT email FROM users") == "new@example.com"


async def test_wrong_reauthentication_passwords_count_towards_the_signin_throttle(client: httpx.AsyncClient) -> None:
    access = (await sign_up_and_in(client))["access_token"]
    wrong = {"password": "Wrong-Guess-1"}
    for _ in range(3):
        assert (await client.request("DELETE", "/api/users/me", json=wrong, headers=bearer(access))).status_code == 400
    for _ in range(2):
        body = {"email": "new@example.com", **wrong}
        assert (await client.patch("/api/users/me", json=body, headers=bearer(access))).status_code == 400

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


# --- 8. usernames and passwords ----------------------------------------------------------------


async def test_usernames_are_unique_regardless_of_case_and_looked_up_exactly(
    client: httpx.AsyncClient, db: Database
) -> None:
    assert (await client.post("/api/users/signup", json=signup_body("Alice"))).status_code == 201

    twin = await client.post("/api/users/signup", json=signup_body("aLICE", email="twin@example.com"))

    assert twin.status_code == 409
    assert twin.json() == {"detail": "Username already exists"}
    assert await db.usernames() == ["Alice"]
    assert (await client.get("/api/users/Alice")).status_code == 200
    assert (await client.get("/api/users/alice")).status_code == 404


@pytest.mark.parametrize("password", ["CorrectHorse9", "correcthorse9", "CORRECTHORSE9"])
async def test_a_password_may_not_be_the_username(client: httpx.AsyncClient, db: Database, password: str) -> None:
    response = await client.post("/api/users/signup", json=signup_body("CorrectHorse9", password=password))
    assert field_errors(response) == ["password"]
    assert response.json()["errors"][0]["message"] == "must not be your username"
    assert await db.usernames() == []


@pytest.mark.parametrize(
    ("new_password", "message"),
    [
        (PASSWORD, "must differ from the old one"),
        ("ALICE1234x", "must not be your username"),  # the username, in another case
        ("alice-In-Chains", None),  # containing it is allowed
    ],
)
async def test_a_new_password_must_differ_from_the_old_one_and_from_the_username(
    client: httpx.AsyncClient, new_password: str, message: str | None
) -> None:
    access = (await sign_up_and_in(client, "alice1234x"))["access_token"]
    body = {"old_password": PASSWORD, "new_password": new_password}

    response = await client.put("/api/users/me/password", json=body, headers=bearer(access))

    if message is None:
        assert response.status_code == 204
        return
    assert field_errors(response) == ["new_password"]
    assert response.json()["errors"][0]["message"] == message
    assert (await client.get("/api/users/me", headers=bearer(access))).status_code == 200  # nothing changed


@pytest.fixture
def url_at_0004(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A database migrated to 0004 only (before usernames had a case-folded key)."""
    if database_url.startswith("sqlite"):
        url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
        in_thread(upgrade_schema, url, "0004")
        yield url
        return
    name = f"users_old_{uuid.uuid4().hex[:12]}"
    in_thread(asyncio.run, postgres_admin(f"CREATE DATABASE {name}"))
    in_thread(upgrade_schema, postgres_dsn(name), "0004")
    yield postgres_dsn(name)
    in_thread(asyncio.run, postgres_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


async def test_the_migration_stops_on_usernames_that_differ_only_in_case(url_at_0004: str) -> None:
    db = Database(url_at_0004)
    for i, name in enumerate(["Alice", "alice", "bob"]):
        await db.execute(
            "INSERT INTO users (username, email, email_key, password_hash, created_at)"
            " VALUES (:name, :email, :email, 'x', :now)",
            {"name": name, "email": f"u{i}@example.com", "now": datetime(2026, 1, 1, tzinfo=UTC)},
        )

    with pytest.raises(RuntimeError, match="differ only in case from another \\(Alice, alice\\)"):
        in_thread(upgrade_schema, url_at_0004)

    assert await db.scalar("SELECT version_num FROM alembic_version") == "0004"
    await db.execute("UPDATE users SET username = 'alice2' WHERE username = 'alice'")
    in_thread(upgrade_schema, url_at_0004)
    rows = await db.rows("SELECT username, username_key FROM users ORDER BY id")
    assert [tuple(row) for row in rows] == [("Alice", "alice"), ("alice2", "alice2"), ("bob", "bob")]
