"""The public user API, through the real middleware and a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from conftest import DirectDatabase, signup_body
from migrate import SchemaRevisions

HEAD = SchemaRevisions.from_migrations().head

pytestmark = pytest.mark.anyio


async def test_signup_creates_the_user_and_answers_the_private_profile(
    client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    response = await client.post("/api/users/signup", json=signup_body("alice", email="Alice@Example.com"))

    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "username", "email", "email_verified", "address", "phone_number", "created_at"}
    assert body["username"] == "alice"
    assert body["email"] == "Alice@example.com"  # the domain is normalized, the local part kept
    assert body["created_at"].endswith("Z")
    stored = await db.scalar("SELECT password_hash FROM users WHERE username = 'alice'")
    assert stored.startswith("$argon2id$v=19$m=1024,t=1,p=1$")  # the tests' parameters (conftest.py)
    assert "Kiwi-Tango-Mango-57" not in stored


async def test_a_committed_signup_is_visible_to_the_next_request(client: httpx.AsyncClient) -> None:
    created = (await client.post("/api/users/signup", json=signup_body("bob"))).json()

    response = await client.get("/api/users/bob")

    assert response.status_code == 200
    assert response.json() == {"id": created["id"], "username": "bob", "created_at": created["created_at"]}


async def test_unknown_user_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/users/nobody")
    assert response.status_code == 404
    assert response.json() == {"detail": "User not found"}


async def test_usernames_match_exactly_as_typed(client: httpx.AsyncClient) -> None:
    await client.post("/api/users/signup", json=signup_body("Carol"))
    assert (await client.get("/api/users/Carol")).status_code == 200
    assert (await client.get("/api/users/carol")).status_code == 404


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"username": "ab"}, "username"),
        ({"username": "a" * 21}, "username"),
        ({"username": "has space"}, "username"),
        ({"username": "émile"}, "username"),
        ({"username": "me"}, "username"),
        ({"username": "signup"}, "username"),
        ({"username": 12345}, "username"),
        ({"password": "Short1!"}, "password"),
        ({"password": "Aa1!" * 16 + "x"}, "password"),
        ({"password": "alllowercase"}, "password"),
        ({"password": "12345678"}, "password"),
        ({"password": None}, "password"),
        ({"email": "not-an-email"}, "email"),
        ({"email": ["a@example.com"]}, "email"),
        ({"nickname": "al"}, "nickname"),
    ],
)
async def test_invalid_signup_is_400_and_writes_nothing(
    client: httpx.AsyncClient, db: DirectDatabase, overrides: dict[str, Any], field: str
) -> None:
    response = await client.post("/api/users/signup", json={**signup_body("alice"), **overrides})

    assert response.status_code == 400
    body = response.json()
    assert body["detail"] == "Some fields are missing or invalid."
    assert [error["field"] for error in body["errors"]] == [field]
    assert await db.usernames() == []


async def test_missing_fields_are_all_named(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/users/signup", json={})
    assert response.status_code == 400
    assert sorted(error["field"] for error in response.json()["errors"]) == ["email", "password", "username"]


@pytest.mark.parametrize(
    ("username", "password"),
    [("abc", "f" * 15), ("a" * 20, "correct horse b"), ("a_b-C9", "é" * 64), ("zed", "\U0001f511" * 15)],
)
async def test_field_limits_are_inclusive(client: httpx.AsyncClient, username: str, password: str) -> None:
    response = await client.post("/api/users/signup", json=signup_body(username, password=password))
    assert response.status_code == 201


@pytest.mark.parametrize(
    ("second", "detail"),
    [
        ({"username": "alice", "email": "other@example.com"}, "Username already exists"),
        ({"username": "other", "email": "ALICE@example.com"}, "Email already exists"),
        ({"username": "alice", "email": "alice@EXAMPLE.com"}, "Username already exists"),
    ],
)
async def test_duplicate_signup_is_409_and_writes_nothing(
    client: httpx.AsyncClient, db: DirectDatabase, second: dict[str, str], detail: str
) -> None:
    assert (await client.post("/api/users/signup", json=signup_body("alice"))).status_code == 201

    response = await client.post("/api/users/signup", json=signup_body(**second))

    assert response.status_code == 409
    assert response.json() == {"detail": detail}
    assert await db.usernames() == ["alice"]


async def test_a_taken_email_is_named_whatever_it_spells(client: httpx.AsyncClient, db: DirectDatabase) -> None:
    """Which key was taken comes from the constraint, never from the values in the error."""
    first = signup_body("alice", email="username@example.com")
    assert (await client.post("/api/users/signup", json=first)).status_code == 201

    response = await client.post("/api/users/signup", json=signup_body("bob", email="USERNAME@example.com"))

    assert response.status_code == 409
    assert response.json() == {"detail": "Email already exists"}
    assert await db.usernames() == ["alice"]


async def test_ids_are_never_reused(client: httpx.AsyncClient, db: DirectDatabase) -> None:
    first = (await client.post("/api/users/signup", json=signup_body("first"))).json()
    await db.execute("DELETE FROM users")

    second = (await client.post("/api/users/signup", json=signup_body("second"))).json()

    assert second["id"] > first["id"]


async def test_list_pages_through_all_users_in_binary_order(client: httpx.AsyncClient) -> None:
    names = ["bob", "Zed", "alice", "_under", "Carol", "-dash", "9lives"]
    for name in names:
        assert (await client.post("/api/users/signup", json=signup_body(name))).status_code == 201

    seen: list[str] = []
    url: str | None = "/api/users?limit=3"
    while url is not None:
        page = (await client.get(url)).json()
        assert set(page) == {"items", "next"}
        assert all(set(item) == {"id", "username", "created_at"} for item in page["items"])
        seen += [item["username"] for item in page["items"]]
        url = None if page["next"] is None else f"/api/users?limit=3&after={page['next']}"

    assert seen == sorted(names, key=lambda name: name.encode())


async def test_list_defaults_to_20_and_ends_with_next_null(client: httpx.AsyncClient) -> None:
    for i in range(21):
        await client.post("/api/users/signup", json=signup_body(f"user{i:02}"))

    first = (await client.get("/api/users")).json()
    last = (await client.get("/api/users", params={"after": first["next"]})).json()

    assert len(first["items"]) == 20
    assert first["next"] == "user19"
    assert [item["username"] for item in last["items"]] == ["user20"]
    assert last["next"] is None


async def test_list_of_no_users(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/users")
    assert response.json() == {"items": [], "next": None}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=99999999999999999999999", "limit"),
        ("limit=ten", "limit"),
        ("limit=", "limit"),
        ("after=a", "after"),
        ("after=%27%20OR%201=1--", "after"),
        ("after=" + "z" * 21, "after"),
        ("page=2", "page"),
        ("limit=1000000000000000000000", "limit"),
        ("limit=-1", "limit"),
        ("limit=1.5", "limit"),
        ("limit=1e3", "limit"),
        ("limit=%00", "limit"),
        ("after=%27%3B%20DROP%20TABLE%20users%3B%20--", "after"),
        ("after=%C3%A9mile", "after"),
        ("after=%FF", "after"),
        ("after=", "after"),
        ("after=a&limit=5", "after"),
        ("sort=username", "sort"),
    ],
)
async def test_malformed_list_query_is_400(client: httpx.AsyncClient, query: str, field: str) -> None:
    response = await client.get(f"/api/users?{query}")
    assert response.status_code == 400
    assert response.json()["detail"] == "Some fields are missing or invalid."
    assert [error["field"] for error in response.json()["errors"]] == [field]


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready", "revision": HEAD}
