"""The transaction contract, point by point, through the real middleware and real databases.

Test-only routes are added to the real app; they use UserStore on request.state.session exactly
as the product's routes do.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from app import create_app
from conftest import DirectDatabase, signup_body
from settings import Settings
from stores import UserStore

# The mail delivery loop idle: these tests count the pool's checkouts, which would count its own too.
pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_delivery")]


def add_route(app: Starlette, path: str, endpoint: Any, methods: list[str] | None = None) -> None:
    app.router.routes.insert(0, Route(path, endpoint, methods=methods or ["POST"]))


async def create_alice(request: Request) -> UserStore:
    store = UserStore(request.state.session)
    await store.create(username="alice", email="alice@example.com", password_hash="x")
    return store


def http_scope(method: str, path: str) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
    }


async def receive_empty_body() -> Message:
    return {"type": "http.request", "body": b"{}", "more_body": False}


def count_checkouts(engine: AsyncEngine) -> list[int]:
    checkouts = [0]

    @event.listens_for(engine.sync_engine.pool, "checkout")
    def on_checkout(*args: Any) -> None:
        checkouts[0] += 1

    return checkouts


async def test_the_commit_is_done_before_the_response_starts(
    app: Starlette, lifespan: LifespanManager, db: DirectDatabase
) -> None:
    async def route(request: Request) -> Response:
        await create_alice(request)
        return JSONResponse({"ok": True}, status_code=201)

    add_route(app, "/t", route)
    committed_at_start: list[list[str]] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            committed_at_start.append(await db.usernames())  # another connection, right now

    await lifespan.app(http_scope("POST", "/t"), receive_empty_body, send)

    assert committed_at_start == [["alice"]]


async def test_a_route_that_writes_then_answers_4xx_leaves_nothing(
    app: Starlette, client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    async def route(request: Request) -> Response:
        await create_alice(request)
        raise HTTPException(409, "Changed my mind")

    add_route(app, "/t", route)

    response = await client.post("/t")

    assert response.status_code == 409
    assert response.json() == {"detail": "Changed my mind"}
    assert await db.usernames() == []


async def test_a_route_that_writes_then_returns_4xx_leaves_nothing(
    app: Starlette, client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    async def route(request: Request) -> Response:
        await create_alice(request)
        return JSONResponse({"detail": "nope"}, status_code=400)

    add_route(app, "/t", route)

    assert (await client.post("/t")).status_code == 400
    assert await db.usernames() == []


async def test_a_route_that_writes_then_raises_leaves_nothing(
    app: Starlette, client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    async def route(request: Request) -> Response:
        await create_alice(request)
        raise RuntimeError("bug after the write")

    add_route(app, "/t", route)

    response = await client.post("/t")

    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error."}
    assert await db.usernames() == []


async def test_commit_failure_from_a_deferred_constraint_answers_500_and_writes_nothing(
    app: Starlette, client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    # A deferred foreign key is checked only at COMMIT: the database itself refuses the commit.
    await db.execute("CREATE TABLE notes (user_id BIGINT NOT NULL REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED)")

    async def route(request: Request) -> Response:
        await create_alice(request)
        await request.state.session.execute(text("INSERT INTO notes (user_id) VALUES (424242)"))
        return JSONResponse({"secret": "the app's own 201 body"}, status_code=201)

    add_route(app, "/t", route)

    response = await client.post("/t")

    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error."}
    assert "the app's own 201 body" not in response.text
    assert await db.usernames() == []
    assert await db.scalar("SELECT count(*) FROM notes") == 0


async def test_commit_failure_from_a_before_commit_hook_answers_500_and_writes_nothing(
    app: Starlette, client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    async def route(request: Request) -> Response:
        await create_alice(request)

        @event.listens_for(request.state.session.sync_session, "before_commit")
        def refuse(session: Any) -> None:
            raise RuntimeError("commit refused")

        return JSONResponse({"secret": "the app's own 200 body"})

    add_route(app, "/t", route)

    response = await client.post("/t")

    assert response.status_code == 500
    assert "the app's own 200 body" not in response.text
    assert await db.usernames() == []


async def test_commit_failure_is_a_500_even_when_the_app_swallows_the_error(
    app: Starlette, client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    class ForgivingResponse(JSONResponse):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await super().__call__(scope, receive, send)
            except Exception:
                await send({"type": "http.response.body", "body": b"leaked"})

    async def route(request: Request) -> Response:
        await create_alice(request)

        @event.listens_for(request.state.session.sync_session, "before_commit")
        def refuse(session: Any) -> None:
            raise RuntimeError("commit refused")

        return ForgivingResponse({"secret": "the app's own body"})

    add_route(app, "/t", route)

    response = await client.post("/t")

    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error."}
    assert await db.usernames() == []


async def test_healthz_checks_out_no_connection(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    checkouts = count_checkouts(engine)

    for _ in range(5):
        assert (await client.get("/healthz")).status_code == 200
    assert checkouts == [0]

    assert (await client.get("/api/users/alice")).status_code == 404
    assert checkouts == [1]  # the counter does see a request that queries
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_cancelled_request_gives_its_connection_back(
    app: Starlette, client: httpx.AsyncClient, engine: AsyncEngine, db: DirectDatabase
) -> None:
    inside = anyio.Event()

    async def route(request: Request) -> Response:
        await create_alice(request)
        inside.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    add_route(app, "/t", route)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(client.post, "/t")
        await inside.wait()
        assert engine.sync_engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        tasks.cancel_scope.cancel()  # what a server does when it cancels a request

    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await db.usernames() == []
    if db.backend == "postgresql":
        stuck = (
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' AND datname = current_database()"
        )
        assert await db.scalar(stuck) == 0


async def test_a_client_that_disconnects_mid_body_leaves_nothing_checked_out(
    app: Starlette, lifespan: LifespanManager, engine: AsyncEngine, db: DirectDatabase
) -> None:
    async def route(request: Request) -> Response:
        await create_alice(request)
        await request.body()  # the client is gone: Starlette raises ClientDisconnect
        return JSONResponse({}, status_code=201)

    add_route(app, "/t", route)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await lifespan.app(http_scope("POST", "/t"), receive, send)

    # Nobody reads it, but the answer is an error, so the transaction was rolled back.
    assert [message["status"] for message in sent if message["type"] == "http.response.start"] == [400]
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await db.usernames() == []


async def test_concurrent_signups_of_one_username_give_one_201_and_the_rest_409(
    client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    statuses: list[int] = []

    async def sign_up(i: int) -> None:
        response = await client.post("/api/users/signup", json=signup_body("alice", email=f"a{i}@example.com"))
        statuses.append(response.status_code)

    async with anyio.create_task_group() as tasks:
        for i in range(20):
            tasks.start_soon(sign_up, i)

    assert sorted(statuses) == [201] + [409] * 19
    assert await db.usernames() == ["alice"]


async def test_concurrent_signups_of_different_users_all_commit(client: httpx.AsyncClient, db: DirectDatabase) -> None:
    statuses: list[int] = []

    async def sign_up(i: int) -> None:
        statuses.append((await client.post("/api/users/signup", json=signup_body(f"user{i:02}"))).status_code)

    async with anyio.create_task_group() as tasks:
        for i in range(20):
            tasks.start_soon(sign_up, i)

    assert statuses == [201] * 20
    assert sorted(await db.usernames()) == [f"user{i:02}" for i in range(20)]


async def test_an_exhausted_pool_answers_503_with_retry_after(settings: Settings, db: DirectDatabase) -> None:
    app = create_app(replace(settings, pool_size=1, max_overflow=0, pool_timeout=0.2))
    release = anyio.Event()
    inside = anyio.Event()

    async def hold(request: Request) -> Response:
        await request.state.session.execute(text("SELECT 1"))
        inside.set()
        await release.wait()
        return JSONResponse({"held": True})

    add_route(app, "/hold", hold, methods=["GET"])
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(client.get, "/hold")
                await inside.wait()
                response = await client.get("/api/users/alice")
                release.set()

            assert response.status_code == 503
            assert response.headers["retry-after"] == "2"
            assert response.json() == {"detail": "The database is unavailable; try again shortly."}
            assert (await client.get("/api/users/alice")).status_code == 404  # served again


@pytest.mark.parametrize(
    "url",
    ["postgresql://postgres@127.0.0.1:1/users", "sqlite+aiosqlite:////nonexistent-directory/users.db"],
)
async def test_an_unreachable_database_answers_503_and_liveness_stays_up(url: str) -> None:
    app = create_app(Settings(database_url=url, connect_timeout=1))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            for path in ("/readyz", "/api/users/alice", "/api/users"):
                response = await client.get(path)
                assert response.status_code == 503, path
                assert response.headers["retry-after"] == "2"
            signup = await client.post("/api/users/signup", json=signup_body())
            assert signup.status_code == 503
            assert (await client.get("/healthz")).status_code == 200
    # aiosqlite stops the thread of a failed connect in the background, with a callback to this
    # test's event loop: let it finish before the loop closes.
    with anyio.fail_after(5):
        while any(t.name.endswith("(_connection_worker_thread)") for t in threading.enumerate()):  # noqa: ASYNC110
            await anyio.sleep(0.01)
