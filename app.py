"""The HTTP API: routes, error handlers and `create_app()`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from auth import hash_limiter, hash_password
from db import DBSessionMiddleware, Settings, is_unavailable, make_engine, make_sessionmaker
from schemas import ListQuery, Page, PrivateProfile, PublicProfile, Signup
from stores import UserStore

logger = logging.getLogger("users")


def model_response(model: BaseModel, status_code: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


async def read_json_body(request: Request) -> bytes:
    """The raw body of a JSON request, refused early when it has the wrong type or size."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise HTTPException(415, "Content-Type must be application/json.")
    limit: int = request.state.max_body_bytes
    too_large = HTTPException(413, f"Request body is larger than {limit} bytes.")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large  # stop reading: an oversized body is never buffered whole
    return bytes(body)


# --- routes --------------------------------------------------------------------------------


async def signup(request: Request) -> Response:
    data = Signup.model_validate_json(await read_json_body(request))
    password_hash = await hash_password(data.password, request.state.hash_limiter)
    store = UserStore(request.state.session)
    try:
        user = await store.create(username=data.username, email=data.email, password_hash=password_hash)
    except IntegrityError:
        # The unique constraints decide, so two racing signups cannot both win.
        if await store.get_by_username(data.username) is not None:
            raise HTTPException(409, "Username already exists") from None
        raise HTTPException(409, "Email already exists") from None
    return model_response(PrivateProfile.model_validate(user), 201)


async def get_user(request: Request) -> Response:
    user = await UserStore(request.state.session).get_by_username(request.path_params["username"])
    if user is None:
        raise HTTPException(404, "User not found")
    return model_response(PublicProfile.model_validate(user))


async def list_users(request: Request) -> Response:
    query = ListQuery.model_validate(dict(request.query_params))
    users = await UserStore(request.state.session).list_page(after=query.after, limit=query.limit + 1)
    items = [PublicProfile.model_validate(user) for user in users[: query.limit]]
    more = len(users) > query.limit
    return model_response(Page(items=items, next=items[-1].username if more else None))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    await request.state.session.execute(text("SELECT 1"))  # bounded by the pool and driver timeouts
    return JSONResponse({"status": "ready"})


routes = [
    # Fixed paths before /api/users/{username}: Starlette takes the first match.
    Route("/api/users/signup", signup, methods=["POST"]),
    Route("/api/users", list_users, methods=["GET"]),
    Route("/api/users/{username:str}", get_user, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]


# --- errors: one shape for every status ------------------------------------------------------


def error_response(status_code: int, detail: str, **extra: Any) -> JSONResponse:
    headers = extra.pop("headers", None)
    return JSONResponse({"detail": detail, **extra}, status_code=status_code, headers=headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if detail == HTTPStatus(exc.status_code).phrase:  # Starlette's own 404/405: make it a sentence
        detail = HTTPStatus(exc.status_code).description + "."
    return error_response(exc.status_code, detail, headers=exc.headers)


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ValidationError)
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    if any(error["type"] == "json_invalid" for error in errors):
        return error_response(400, "Request body is not valid JSON.")
    if any(error["loc"] == () for error in errors):
        return error_response(400, "Request body must be a JSON object.")
    fields = [
        {"field": ".".join(str(part) for part in error["loc"]), "message": error["msg"].removeprefix("Value error, ")}
        for error in errors
    ]
    return error_response(400, "Some fields are missing or invalid.", errors=fields)


async def database_error(request: Request, exc: Exception) -> Response:
    if not is_unavailable(exc):
        raise exc
    logger.warning("database unavailable: %r", exc)
    return error_response(503, "The database is unavailable; try again shortly.", headers={"Retry-After": "2"})


async def server_error(request: Request, exc: Exception) -> Response:
    return error_response(500, "Internal server error.")


# --- the application -------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_environ()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        # One engine (and pool) per process, made after the server starts, disposed at shutdown.
        engine = make_engine(settings)
        try:
            yield {
                "engine": engine,
                "sessionmaker": make_sessionmaker(engine),
                "hash_limiter": hash_limiter(),
                "max_body_bytes": settings.max_body_bytes,
            }
        finally:
            await engine.dispose()

    return Starlette(
        routes=routes,
        middleware=[Middleware(DBSessionMiddleware, close_timeout=settings.command_timeout)],
        exception_handlers={
            HTTPException: http_error,
            ValidationError: validation_error,
            DBAPIError: database_error,
            PoolTimeoutError: database_error,
            OSError: database_error,
            Exception: server_error,
        },
        lifespan=lifespan,
    )
