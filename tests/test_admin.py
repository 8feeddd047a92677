"""Operators, on SQLite and PostgreSQL: the command line (manage.py) and the admin API, an admin role,
disabled accounts, and two administrators acting on one account at once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import httpx
import pytest

import manage
from clusters import StartService
from conftest import PASSWORD, PROJECT_DIR, DirectDatabase, assert_401, bearer, in_thread, sign_in, signup_body

pytestmark = pytest.mark.anyio


def manage_py(database_url: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """scripts/manage's command line, as an operator runs it (a process of its own)."""
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "manage.py", *arguments], cwd=PROJECT_DIR, env=env, capture_output=True, text=True
    )


async def grant_admin(database_url: str, monkeypatch: pytest.MonkeyPatch, username: str) -> None:
    """The same command, in this process (faster): manage.main, in a thread, while the test's event
    loop (and the app's delivery loop, which may hold SQLite's write lock) goes on."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    assert await asyncio.to_thread(manage.main, ["grant-admin", username]) == 0


@pytest.fixture
async def admin(client: httpx.AsyncClient, database_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An administrator's headers (root), and two users, alice and bob."""
    for name in ("root", "alice", "bob"):
        assert (await client.post("/api/users/signup", json=signup_body(name))).status_code == 201
    await grant_admin(database_url, monkeypatch, "root")
    return bearer((await sign_in(client, "root"))["access_token"])


def test_the_command_line_says_what_it_did_and_fails_for_an_unknown_user(database_url: str, db: DirectDatabase) -> None:
    in_thread(asyncio.run, db.execute(
        "INSERT INTO users (username, username_key, email, email_key, password_hash, created_at, token_version) "
        "VALUES ('carol', 'carol', 'c@example.com', 'c@example.com', 'x', CURRENT_TIMESTAMP, 0)"
    ))  # fmt: skip
    said = [manage_py(database_url, command, "carol") for command in ("grant-admin", "disable", "enable")]
    assert [(done.returncode, done.stdout) for done in said] == [
        (0, "carol is an administrator\n"),
        (0, "carol is disabled; 0 sessions ended\n"),
        (0, "carol is enabled\n"),
    ]
    unknown = manage_py(database_url, "disable", "nobody")
    assert (unknown.returncode, unknown.stdout) == (1, "")
    assert unknown.stderr == "disable: there is no user named 'nobody'\n"
    assert manage_py(database_url, "frobnicate", "carol").returncode == 2  # argparse: not a command
    events = in_thread(asyncio.run, db.rows("SELECT event, actor FROM audit_events ORDER BY id"))
    assert [tuple(event) for event in events] == [
        ("admin_granted", "command line"), ("account_disabled", "command line"), ("account_enabled", "command line"),
    ]  # fmt: skip


async def test_admin_routes_answer_401_without_a_token_and_403_to_anyone_else(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    alice = bearer((await sign_in(client, "alice"))["access_token"])
    requests: list[tuple[str, str]] = [
        ("GET", "/api/admin/users"), ("GET", "/api/admin/users/bob"), ("POST", "/api/admin/users/bob/disable"),
        ("POST", "/api/admin/users/bob/enable"), ("POST", "/api/admin/users/bob/end-sessions"),
        ("DELETE", "/api/admin/users/bob"), ("GET", "/api/admin/events"),
    ]  # fmt: skip
    for method, path in requests:
        assert_401(await client.request(method, path), "A bearer token is required")
        refused = await client.request(method, path, headers=alice)
        assert refused.status_code == 403, (method, path)
        assert refused.json() == {"detail": "This takes an administrator."}
    assert (await client.get("/api/users/bob")).status_code == 200  # nothing happened to bob


async def test_admins_list_users_with_private_fields_by_prefix_and_page(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    await client.post("/api/users/signup", json=signup_body("al_x", email="Zed@Example.com"))
    page = await client.get("/api/admin/users", params={"limit": 2}, headers=admin)
    assert page.status_code == 200
    assert [user["username"] for user in page.json()["items"]] == ["al_x", "alice"]
    rest = (await client.get("/api/admin/users", params={"after": page.json()["next"]}, headers=admin)).json()
    assert [user["username"] for user in rest["items"]] == ["bob", "root"]
    assert rest["next"] is None
    root = rest["items"][1]
    assert (root["is_admin"], root["disabled"], root["email"]) == (True, False, "root@example.com")
    assert root["last_signin_at"] is not None

    async def matching(q: str) -> list[str]:
        found = await client.get("/api/admin/users", params={"q": q}, headers=admin)
        return [user["username"] for user in found.json()["items"]]

    assert await matching("AL") == ["al_x", "alice"]  # a username prefix, in any case
    assert await matching("zed@") == ["al_x"]  # an email prefix
    assert await matching("a_") == []  # _ is a character, not a wildcard
    assert await matching("al_") == ["al_x"]
    one = await client.get("/api/admin/users/bob", headers=admin)
    assert (one.json()["username"], one.json()["email"]) == ("bob", "bob@example.com")
    assert (await client.get("/api/admin/users/nobody", headers=admin)).status_code == 404


async def test_a_disabled_account_is_out_until_it_is_enabled(
    client: httpx.AsyncClient, admin: dict[str, str], db: DirectDatabase
) -> None:
    tokens = await sign_in(client, "alice")

    assert (await client.post("/api/admin/users/alice/disable", headers=admin)).status_code == 204

    assert_401(await client.get("/api/users/me", headers=bearer(tokens["access_token"])), "Token is no longer valid")
    assert (await client.post("/api/users/refresh", headers=bearer(tokens["refresh_token"]))).status_code == 401
    right = await client.post("/api/users/signin", json={"username": "alice", "password": PASSWORD})
    assert right.status_code == 403
    assert right.json() == {"detail": "This account is disabled."}
    wrong = await client.post("/api/users/signin", json={"username": "alice", "password": "Wrong-Guess-1"})
    assert wrong.status_code == 401  # no oracle for guessers: a wrong password is the usual answer
    assert (await client.get("/api/users/alice")).status_code == 404
    assert "alice" not in [user["username"] for user in (await client.get("/api/users")).json()["items"]]
    assert (
        await db.scalar(
            "SELECT count(*) FROM token_families WHERE user_id = (SELECT id FROM users WHERE username = 'alice')"
        )
        == 0
    )

    assert (await client.post("/api/admin/users/alice/enable", headers=admin)).status_code == 204
    await sign_in(client, "alice")
    assert (await client.get("/api/users/alice")).status_code == 200


async def test_ending_sessions_and_deleting_through_the_admin_api(
    client: httpx.AsyncClient, admin: dict[str, str], db: DirectDatabase
) -> None:
    alice = [await sign_in(client, "alice") for _ in range(2)]
    assert (await client.post("/api/admin/users/alice/end-sessions", headers=admin)).status_code == 204
    for tokens in alice:
        assert (await client.get("/api/users/me", headers=bearer(tokens["access_token"]))).status_code == 401
    await sign_in(client, "alice")  # the account itself is fine

    assert (await client.delete("/api/admin/users/bob", headers=admin)).status_code == 204
    assert (await client.get("/api/users/bob")).status_code == 404
    assert (await client.delete("/api/admin/users/bob", headers=admin)).status_code == 404
    events = await db.rows(
        "SELECT event, username, actor, user_id FROM audit_events WHERE actor IS NOT NULL ORDER BY id"
    )
    assert [tuple(event) for event in events] == [
        ("admin_granted", "root", "command line", await db.scalar("SELECT id FROM users WHERE username = 'root'")),
        ("session_ended", "alice", "root", await db.scalar("SELECT id FROM users WHERE username = 'alice'")),
        ("account_deleted", "bob", "root", None),  # bob's row went: the event keeps his name
    ]


async def test_an_operator_cannot_disable_or_delete_themselves(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    for method, path, word in (
        ("POST", "/api/admin/users/root/disable", "disable"),
        ("DELETE", "/api/admin/users/root", "delete"),
    ):
        refused = await client.request(method, path, headers=admin)
        assert refused.status_code == 409
        assert refused.json() == {"detail": f"You cannot {word} your own account."}
    assert (await client.get("/api/admin/users/root", headers=admin)).json()["disabled"] is False


async def test_an_admin_whose_role_is_revoked_is_refused_at_once(
    client: httpx.AsyncClient, admin: dict[str, str], database_url: str
) -> None:
    assert (await client.get("/api/admin/users", headers=admin)).status_code == 200
    done = await asyncio.to_thread(manage_py, database_url, "revoke-admin", "root")
    assert done.stdout == "root is no longer an administrator\n"
    assert (await client.get("/api/admin/users", headers=admin)).status_code == 403


# --- two administrators at once, through real HTTP ---------------------------------------------------


async def test_two_admins_disabling_and_enabling_at_once_agree_with_the_database(
    database_url: str, start_service: StartService, db: DirectDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = start_service(database_url)
    async with (
        httpx.AsyncClient(base_url=service.url, timeout=30) as first,
        httpx.AsyncClient(base_url=service.url, timeout=30) as second,
    ):
        for name in ("ann", "ben", "alice"):
            await first.post("/api/users/signup", json=signup_body(name))
        await grant_admin(database_url, monkeypatch, "ann")
        await grant_admin(database_url, monkeypatch, "ben")
        ann, ben = [bearer((await sign_in(first, name))["access_token"]) for name in ("ann", "ben")]
        for round in range(20):
            actions = ("disable", "enable") if round % 2 else ("enable", "disable")
            answers = await asyncio.gather(
                first.post(f"/api/admin/users/alice/{actions[0]}", headers=ann),
                second.post(f"/api/admin/users/alice/{actions[1]}", headers=ben),
            )
            assert [answer.status_code for answer in answers] == [204, 204], round
            disabled = await db.scalar("SELECT disabled FROM users WHERE username = 'alice'")
            last: Any = await db.scalar(
                "SELECT event FROM audit_events WHERE username = 'alice' AND actor IS NOT NULL ORDER BY id DESC LIMIT 1"
            )
            # The event written last is the action that committed last: it is what the row holds.
            assert bool(disabled) == (last == "account_disabled"), round
            signin = await first.post("/api/users/signin", json={"username": "alice", "password": PASSWORD})
            assert signin.status_code == (403 if disabled else 200), round
