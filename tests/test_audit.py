"""The security trail, on SQLite and PostgreSQL: an event a security-relevant action, written in the
request's transaction (or, for a refused one, in its own), logged and counted only once it has
committed, readable by the user and by operators, bounded under a spray, purged after
AUDIT_RETENTION_DAYS."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from app import create_app
from audit import record
from clusters import StartService
from conftest import PASSWORD, DirectDatabase, app_database, bearer, sign_in, sign_up_and_in
from db import transaction
from logs import flush_logs
from settings import Settings

pytestmark = pytest.mark.anyio


async def events(db: DirectDatabase) -> list[tuple[Any, ...]]:
    rows = await db.rows("SELECT event, username, address, user_agent, actor FROM audit_events ORDER BY id")
    return [tuple(row) for row in rows]


async def test_each_action_is_one_event_with_where_it_came_from(client: httpx.AsyncClient, db: DirectDatabase) -> None:
    tokens = await sign_up_and_in(client)
    access = bearer(tokens["access_token"])
    await client.patch("/api/users/me", json={"email": "new@example.com", "password": PASSWORD}, headers=access)
    await client.patch("/api/users/me", json={"address": "Seoul"}, headers=access)  # not a security event
    await client.post("/api/users/signout", headers=bearer(tokens["refresh_token"]))
    access = bearer((await sign_in(client))["access_token"])
    body = {"old_password": PASSWORD, "new_password": "Better-Plum-88-Grape"}
    await client.put("/api/users/me/password", json=body, headers=access)
    access = bearer((await sign_in(client, password="Better-Plum-88-Grape"))["access_token"])
    await client.request("DELETE", "/api/users/me", json={"password": "Better-Plum-88-Grape"}, headers=access)

    agent = "python-httpx/" + httpx.__version__
    assert await events(db) == [
        (event, "alice", "127.0.0.1", agent, None)
        for event in (
            "signup", "signin", "email_changed", "signout", "signin", "password_changed", "signin", "account_deleted",
        )
    ]  # fmt: skip
    assert await db.scalar("SELECT detail FROM audit_events WHERE event = 'email_changed'") == "from alice@example.com"
    assert await db.scalar("SELECT count(*) FROM audit_events WHERE user_id IS NOT NULL") == 0  # the account is gone


async def test_refused_attempts_are_written_although_their_answer_is_a_4xx(
    settings: Settings, db: DirectDatabase
) -> None:
    async with LifespanManager(create_app(replace(settings, signin_failure_limit=2))) as manager:
        transport = httpx.ASGITransport(app=manager.app, client=("198.51.100.7", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            tokens = await sign_up_and_in(client)
            first = (await client.post("/api/users/refresh", headers=bearer(tokens["refresh_token"]))).json()
            await client.post("/api/users/refresh", headers=bearer(first["refresh_token"]))
            await client.post("/api/users/refresh", headers=bearer(tokens["refresh_token"]))  # two back: a reuse
            statuses = [
                (await client.post("/api/users/signin", json={"username": "alice", "password": "Wrong-1"})).status_code
                for _ in range(5)
            ]
            metrics = (await client.get("/metrics")).text
    assert statuses == [401, 401, 429, 429, 429]
    said = [(event, username) for event, username, *_ in await events(db)]
    assert said == [
        ("signup", "alice"), ("signin", "alice"), ("refresh_reused", "alice"), ("signin_failed", "alice"),
        ("signin_failed", "alice"), ("signin_throttled", "alice"),  # once, however many 429s follow
    ]  # fmt: skip
    assert await db.scalar("SELECT detail FROM audit_events WHERE event = 'signin_throttled'") == "password rule: pair"
    assert 'auth_events_total{event="signin_failed"} 2.0' in metrics
    assert 'auth_events_total{event="signin_throttled"} 1.0' in metrics


async def test_a_spray_of_signins_adds_a_bounded_number_of_events(settings: Settings, db: DirectDatabase) -> None:
    async with LifespanManager(create_app(replace(settings, signin_address_failure_limit=5))) as manager:
        transport = httpx.ASGITransport(app=manager.app, client=("198.51.100.7", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            for i in range(60):
                await client.post("/api/users/signin", json={"username": f"random{i}", "password": "Wrong-1"})
    counts = await db.rows("SELECT event, count(*) FROM audit_events GROUP BY event ORDER BY event")
    assert [tuple(row) for row in counts] == [("signin_failed", 5), ("signin_throttled", 1)]


async def test_an_event_of_a_transaction_that_rolls_back_is_neither_written_nor_said(
    app: Starlette, client: httpx.AsyncClient, db: DirectDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    database = await app_database(app, client)

    async def fails_after_the_event() -> None:
        async with transaction(database.writes) as session:
            await record(session, "account_disabled", username="alice", actor="nobody")
            raise RuntimeError("the work failed after the event was written")

    with pytest.raises(RuntimeError):
        await fails_after_the_event()
    async with transaction(database.writes) as session:
        await record(session, "account_enabled", username="alice", actor="somebody")
    flush_logs()
    logged = capsys.readouterr().out
    assert [row[0] for row in await events(db)] == ["account_enabled"]
    assert "account_enabled" in logged
    assert "account_disabled" not in logged


async def test_users_read_their_own_history_and_operators_everyones(
    client: httpx.AsyncClient, db: DirectDatabase, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_admin import grant_admin

    alice = bearer((await sign_up_and_in(client, "alice"))["access_token"])
    for _ in range(3):
        await sign_in(client, "alice")
    await sign_up_and_in(client, "bob")
    await client.post("/api/users/signin", json={"username": "alice", "password": "Wrong-1"})

    page = (await client.get("/api/users/me/events", params={"limit": 3}, headers=alice)).json()
    assert [item["event"] for item in page["items"]] == ["signin_failed", "signin", "signin"]
    older = (await client.get("/api/users/me/events", params={"after": page["next"]}, headers=alice)).json()
    assert [item["event"] for item in older["items"]] == ["signin", "signin", "signup"]
    assert older["next"] is None
    assert {item["username"] for item in page["items"] + older["items"]} == {"alice"}  # not bob's

    await grant_admin(database_url, monkeypatch, "bob")
    bob = bearer((await sign_in(client, "bob"))["access_token"])
    everyone = (await client.get("/api/admin/events", params={"limit": 100}, headers=bob)).json()["items"]
    assert len(everyone) == await db.scalar("SELECT count(*) FROM audit_events")
    alices = await client.get("/api/admin/events", params={"user": "alice", "event": "signin"}, headers=bob)
    assert [(item["username"], item["event"]) for item in alices.json()["items"]] == [("alice", "signin")] * 4
    assert (await client.get("/api/admin/events", params={"event": "nonsense"}, headers=bob)).status_code == 400


async def test_events_older_than_the_retention_are_purged_on_the_way(
    client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    assert Settings().audit_retention_days == 90
    old = datetime.now(UTC) - timedelta(days=91)
    await db.execute("INSERT INTO audit_events (at, event, username) VALUES (:at, 'signin', 'ghost')", {"at": old})
    await db.execute("INSERT INTO audit_events (at, event, username) VALUES (:at, 'signin', 'recent')",
                     {"at": datetime.now(UTC) - timedelta(days=89)})  # fmt: skip

    await client.post("/api/users/signin", json={"username": "nobody", "password": "Wrong-1"})

    assert await db.column("SELECT username FROM audit_events ORDER BY id") == ["recent", "nobody"]


async def test_each_event_is_one_json_log_line_with_no_secret_in_it(
    database_url: str, start_service: StartService
) -> None:
    service = start_service(database_url, LOG_FORMAT="json")
    async with httpx.AsyncClient(base_url=service.url) as client:
        tokens = await sign_up_and_in(client)
        await client.post("/api/users/signin", json={"username": "alice", "password": "Wrong-Guess-1"})
    service.stop()
    lines = [json.loads(line) for line in service.log().splitlines() if line.startswith("{")]
    audit = [line for line in lines if line["logger"] == "users.audit"]
    assert [line["event"] for line in audit] == ["signup", "signin", "signin_failed"]
    assert audit[2] | {"time": "", "request_id": ""} == {
        "time": "", "level": "INFO", "logger": "users.audit", "request_id": "",
        "message": "signin_failed user_id=1 username=alice address=127.0.0.1 user_agent=python-httpx/"
        + httpx.__version__,
        "event": "signin_failed", "user_id": 1, "username": "alice", "address": "127.0.0.1",
        "user_agent": "python-httpx/" + httpx.__version__,
    }  # fmt: skip
    log = service.log()
    for secret in (PASSWORD, "Wrong-Guess-1", tokens["access_token"], tokens["refresh_token"], "$argon2id$"):
        assert secret not in log
