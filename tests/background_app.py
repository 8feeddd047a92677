"""The service plus two test-only routes that write after the response, in a BackgroundTask:
one through the request's session (refused: it is closed by then), one through a session of its
own from db.transaction (the documented way). Served by uvicorn in tests/test_concurrency.py."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import app
from db import database, transaction
from settings import Settings
from stores import UserStore


async def write_through_the_request_session(request: Request) -> Response:
    async def later() -> None:
        store = UserStore(request.state.session)
        await store.create(username="late", email="late@example.com", password_hash="x")

    return JSONResponse({"queued": True}, status_code=201, background=BackgroundTask(later))


async def write_through_its_own_session(request: Request) -> Response:
    sessionmaker = database(request).writes

    async def later() -> None:
        async with transaction(sessionmaker) as session:
            await UserStore(session).create(username="late", email="late@example.com", password_hash="x")

    return JSONResponse({"queued": True}, status_code=201, background=BackgroundTask(later))


def create_app(settings: Settings | None = None) -> Starlette:
    service = app.create_app(settings)
    service.router.routes[:0] = [
        Route("/test/late-write/request-session", write_through_the_request_session, methods=["POST"]),
        Route("/test/late-write/own-session", write_through_its_own_session, methods=["POST"]),
    ]
    return service
