"""The session contract under concurrency and slow clients, on SQLite and PostgreSQL, through real
HTTP where it matters: nothing is held while a request waits on its client or on a hash; racing
writes cannot lose an update or answer 500; a write after the response is refused loudly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from typing import Literal

import anyio
import httpx
import pytest
from argon2 import PasswordHasher
from asgi_lifespan import LifespanManager
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

import background_app
from clusters import StartService
from conftest import DirectDatabase, app_resources, bearer, sign_in, sign_up_and_in, signup_body
from settings import Settings

pytestmark = pytest.mark.anyio

ROUNDS = 20  # rounds of each race
# These tests make many wrong guesses on purpose; the throttle has tests of its own.
NO_THROTTLE = {"SIGNIN_FAILURE_LIMIT": "0", "SIGNIN_ADDRESS_FAILURE_LIMIT": "0"}


async def signin_status(client: httpx.AsyncClient, username: str, password: str) -> int:
    return (await client.post("/api/users/signin", json={"username": username, "password": password})).status_code


def sqlite_path(database_url: str) -> str:
    return str(make_url(database_url).database)


def write_lock_is_free(path: str) -> bool:
    """Whether another SQLite connection could take the write lock right now (no waiting)."""
    connection = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        connection.close()


async def held_by_the_service(db: DirectDatabase) -> list[str]:
    """What the service holds in the database right now: its PostgreSQL sessions that are inside a
    transaction (in this test's database: other workers' services share the cluster), or SQLite's
    write lock."""
    if db.backend == "sqlite":
        return [] if write_lock_is_free(sqlite_path(db.url)) else ["the SQLite write lock"]
    rows = await db.rows(
        "SELECT state FROM pg_stat_activity WHERE application_name = 'users'"
        " AND datname = current_database() AND state LIKE 'idle in transaction%'"
    )
    return [row[0] for row in rows]


# --- 1. nothing is held while the request waits ---------------------------------------------


async def send_headers_and_part_of_the_body(
    port: int, method: str, path: str, token: str, body: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body[: len(body) // 2])  # the rest never comes
    await writer.drain()
    return reader, writer


async def test_a_slow_body_holds_nothing_and_gets_408_after_body_timeout(
    database_url: str, start_service: StartService, db: DirectDatabase
) -> None:
    # A pool of 2 and 3 slow clients: if a slow body held a connection, lookups would wait for one
    # past the pool timeout (2 s), which ends before the body timeout (3 s) would free it.
    service = start_service(database_url, BODY_TIMEOUT="3", DB_POOL_SIZE="2", DB_MAX_OVERFLOW="0", DB_POOL_TIMEOUT="2")
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as client, contextlib.AsyncExitStack() as stack:
        token = (await sign_up_and_in(client, "alice"))["access_token"]
        patch = json.dumps({"address": "Seoul"}).encode()
        password = json.dumps({"old_password": "Kiwi-Tango-Mango-57", "new_password": "Better-Plum-456-Pear?"}).encode()
        slow = [
            await send_headers_and_part_of_the_body(service.port, "PATCH", "/api/users/me", token, patch),
            await send_headers_and_part_of_the_body(service.port, "PATCH", "/api/users/me", token, patch),
            await send_headers_and_part_of_the_body(service.port, "PUT", "/api/users/me/password", token, password),
        ]
        for _, writer in slow:  # closed even when an assertion fails, not left to the collector
            stack.callback(writer.transport.abort)
        await anyio.sleep(0.3)  # the service has read their headers and is waiting for the rest

        held = await held_by_the_service(db)
        signups, lookups = await asyncio.gather(
            asyncio.gather(*(client.post("/api/users/signup", json=signup_body(f"user{i}")) for i in range(4))),
            asyncio.gather(*(client.get(f"/api/users/user{i % 4}") for i in range(20))),
        )

        assert held == []
        assert [r.status_code for r in signups] == [201] * 4
        assert {r.status_code for r in lookups} <= {200, 404}
        for reader, writer in slow:
            answer = await asyncio.wait_for(reader.read(), timeout=10)  # the service closes the connection
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), answer
            assert json.loads(body) == {"detail": "The request body did not arrive within 3 seconds."}
        me = (await client.get("/api/users/me", headers=bearer(token))).json()
        assert me["address"] is None  # nothing was written
        assert await signin_status(client, "alice", "Kiwi-Tango-Mango-57") == 200


class ProbingHasher(PasswordHasher):
    """The service's Argon2id parameters, calling `probe` (in the hashing thread) before each hash
    and each verification."""

    def __init__(self, probe: Callable[[str], None]) -> None:
        super().__init__(time_cost=2, memory_cost=19 * 1024, parallelism=1)
        self.probe = probe

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        self.probe("hash")
        return super().hash(password, salt=salt)

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        self.probe("verify")
        return super().verify(hash, password)


async def test_no_connection_lock_or_transaction_is_held_while_a_password_is_hashed(
    no_delivery: None,
    app: Starlette,
    client: httpx.AsyncClient,
    engine: AsyncEngine,
    db: DirectDatabase,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = engine.sync_engine.pool
    seen: list[tuple[str, int, bool]] = []

    def probe(what: str) -> None:
        lock_free = db.backend != "sqlite" or write_lock_is_free(sqlite_path(db.url))
        seen.append((what, pool.checkedout(), lock_free))  # type: ignore[attr-defined]

    monkeypatch.setattr((await app_resources(app, client)).hashing, "hasher", ProbingHasher(probe))
    token = (await sign_up_and_in(client, "alice"))["access_token"]  # a hash, a verification
    assert await signin_status(client, "alice", "Wrong123!") == 401
    assert await signin_status(client, "nobody", "Kiwi-Tango-Mango-57") == 401  # against a dummy hash
    old = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash("Kiwi-Tango-Mango-57")
    await db.execute("UPDATE users SET password_hash = :hash", {"hash": old})
    token = (await sign_in(client, "alice", "Kiwi-Tango-Mango-57"))["access_token"]  # verify, then upgrade the hash
    body = {"old_password": "Kiwi-Tango-Mango-57", "new_password": "Better-Plum-456-Pear?"}
    assert (await client.put("/api/users/me/password", json=body, headers=bearer(token))).status_code == 204

    kinds = [what for what, _, _ in seen]
    assert kinds.count("hash") >= 3, kinds  # signup, the upgrade, the new password (and the dummy, once)
    assert kinds.count("verify") == 5, kinds
    assert [
        (what, checked_out, lock_free) for what, checked_out, lock_free in seen if checked_out or not lock_free
    ] == []


async def test_a_signin_flood_does_not_starve_the_pool(database_url: str, start_service: StartService) -> None:
    # One connection for everything, and the pool timeout a user gets: every request of the flood
    # is answered, none with a 503. That no hash runs while a connection is held is proven above,
    # without a clock; here the bound is the contract's (DB_POOL_TIMEOUT), not a guess at how fast
    # this machine is (one second was not enough for 240 statements on a loaded two-core machine).
    service = start_service(database_url, DB_POOL_SIZE="1", DB_MAX_OVERFLOW="0", DB_POOL_TIMEOUT="5", **NO_THROTTLE)
    limits = httpx.Limits(max_connections=80)
    async with httpx.AsyncClient(base_url=service.url, timeout=30, limits=limits) as client:
        await sign_up_and_in(client, "alice")
        signins, lookups = await asyncio.gather(
            asyncio.gather(
                *(signin_status(client, "alice", "Kiwi-Tango-Mango-57" if i % 2 else "Wrong123!") for i in range(60))
            ),
            asyncio.gather(*(client.get("/api/users/alice") for _ in range(60))),
        )
    assert sorted(set(signins)) == [200, 401]
    assert {r.status_code for r in lookups} == {200}


# --- 2 and 3. racing writes: the database decides ------------------------------------------


async def change_password(client: httpx.AsyncClient, token: str, old: str, new: str) -> int:
    body = {"old_password": old, "new_password": new}
    return (await client.put("/api/users/me/password", json=body, headers=bearer(token))).status_code


@pytest.fixture
async def clients(database_url: str, start_service: StartService) -> AsyncIterator[tuple[httpx.AsyncClient, ...]]:
    """Two clients on their own connections to a real uvicorn, so that their requests overlap."""
    service = start_service(database_url, **NO_THROTTLE)
    async with (
        httpx.AsyncClient(base_url=service.url, timeout=30) as first,
        httpx.AsyncClient(base_url=service.url, timeout=30) as second,
    ):
        yield first, second


async def test_two_racing_password_changes_one_wins_and_only_its_password_works(
    clients: tuple[httpx.AsyncClient, ...], db: DirectDatabase
) -> None:
    first, second = clients
    for round in range(ROUNDS):
        name = f"race{round:02d}"
        token = (await sign_up_and_in(first, name))["access_token"]
        passwords = (f"First-Plum-Pear-{round:02d}!", f"Second-Plum-Pear-{round:02d}?")

        statuses = await asyncio.gather(
            change_password(first, token, "Kiwi-Tango-Mango-57", passwords[0]),
            change_password(second, token, "Kiwi-Tango-Mango-57", passwords[1]),
        )

        assert sorted(statuses) == [204, 401], (round, statuses)
        won, lost = passwords if statuses[0] == 204 else passwords[::-1]
        assert await signin_status(first, name, won) == 200, round
        assert await signin_status(first, name, lost) == 401, round
        assert await signin_status(first, name, "Kiwi-Tango-Mango-57") == 401, round
        version = await db.scalar("SELECT token_version FROM users WHERE username = :name", {"name": name})
        assert version == 1, round


async def test_a_signin_that_upgrades_the_hash_cannot_undo_a_racing_password_change(
    clients: tuple[httpx.AsyncClient, ...], db: DirectDatabase
) -> None:
    first, second = clients
    old_parameters = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1)
    signins = []
    for round in range(ROUNDS):
        name = f"rehash{round:02d}"
        token = (await sign_up_and_in(first, name))["access_token"]
        await db.execute(
            "UPDATE users SET password_hash = :hash WHERE username = :name",
            {"hash": old_parameters.hash("Kiwi-Tango-Mango-57"), "name": name},
        )
        new = f"Better-Plum-Pear-{round:02d}?"

        signin, change = await asyncio.gather(
            signin_status(first, name, "Kiwi-Tango-Mango-57"),
            change_password(second, token, "Kiwi-Tango-Mango-57", new),
        )

        signins.append(signin)
        assert change == 204, round  # a signin never ends a token, so the change always wins
        assert signin in (200, 401), round
        assert await signin_status(first, name, new) == 200, round
        assert await signin_status(first, name, "Kiwi-Tango-Mango-57") == 401, round
    print(f"signins racing a password change: {signins.count(200)} answered 200, {signins.count(401)} 401")


async def test_a_password_change_racing_deletion_never_answers_500(
    clients: tuple[httpx.AsyncClient, ...], db: DirectDatabase
) -> None:
    first, second = clients
    for round in range(ROUNDS):
        name = f"gone{round:02d}"
        token = (await sign_up_and_in(first, name))["access_token"]
        new = f"Better-Plum-Pear-{round:02d}?"

        change, deletion = await asyncio.gather(
            change_password(first, token, "Kiwi-Tango-Mango-57", new),
            second.request("DELETE", "/api/users/me", json={"password": "Kiwi-Tango-Mango-57"}, headers=bearer(token)),
        )

        assert sorted([change, deletion.status_code]) == [204, 401], (round, change, deletion.text)
        exists = await db.scalar("SELECT count(*) FROM users WHERE username = :name", {"name": name})
        if deletion.status_code == 204:
            assert exists == 0, round
        else:
            assert deletion.json() == {"detail": "Token is no longer valid"}
            assert await signin_status(first, name, new) == 200, round


async def test_a_profile_update_racing_deletion_never_answers_500(
    clients: tuple[httpx.AsyncClient, ...], db: DirectDatabase
) -> None:
    first, second = clients
    for round in range(ROUNDS):
        name = f"upd{round:02d}"
        token = (await sign_up_and_in(first, name))["access_token"]

        update, deletion = await asyncio.gather(
            first.patch("/api/users/me", json={"address": "Seoul"}, headers=bearer(token)),
            second.request("DELETE", "/api/users/me", json={"password": "Kiwi-Tango-Mango-57"}, headers=bearer(token)),
        )

        assert deletion.status_code == 204, round  # an update does not end the token
        assert update.status_code in (200, 401), (round, update.text)
        assert await db.scalar("SELECT count(*) FROM users WHERE username = :name", {"name": name}) == 0


# --- 4. writes after the response -----------------------------------------------------------


async def test_a_write_through_the_request_session_after_the_response_is_refused_loudly(
    settings: Settings, db: DirectDatabase
) -> None:
    async with LifespanManager(background_app.create_app(settings)) as manager:
        transport = httpx.ASGITransport(app=manager.app)  # app exceptions reach the "server": this test
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            with pytest.raises(InvalidRequestError, match="permanently closed"):
                await client.post("/test/late-write/request-session")
    assert await db.usernames() == []


async def test_over_real_http_the_refused_late_write_is_logged_and_writes_nothing(
    database_url: str, start_service: StartService, db: DirectDatabase
) -> None:
    service = start_service(database_url, "background_app:create_app")
    async with httpx.AsyncClient(base_url=service.url) as client:
        response = await client.post("/test/late-write/request-session")
        assert response.status_code == 201  # sent before the background task ran
    async with httpx.AsyncClient(base_url=service.url) as client:  # uvicorn closed that connection
        assert (await client.get("/healthz")).status_code == 200
    service.stop()
    log = service.log()
    assert "Exception in ASGI application" in log
    assert "This Session has been permanently closed" in log
    assert await db.usernames() == []


async def test_background_work_in_a_session_of_its_own_commits(
    database_url: str, start_service: StartService, db: DirectDatabase
) -> None:
    service = start_service(database_url, "background_app:create_app")
    async with httpx.AsyncClient(base_url=service.url) as client:
        assert (await client.post("/test/late-write/own-session")).status_code == 201
        for _ in range(200):  # the task runs after the response: give it a moment
            if (await client.get("/api/users/late")).status_code == 200:
                break
            await anyio.sleep(0.05)
    assert await db.usernames() == ["late"]
    assert "Traceback" not in service.log()
