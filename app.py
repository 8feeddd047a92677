"""The HTTP API: routes, error handlers and `create_app()`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

import anyio
from pydantic import BaseModel, ValidationError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from auth import (
    Tokens,
    authenticate,
    hash_limiter,
    hash_password,
    hasher,
    revoke,
    token_secret,
    verify_password,
)
from db import DBSessionMiddleware, Settings, is_unavailable, make_engine, make_sessionmaker
from openapi import openapi_document
from schemas import (
    PATTERN_RULES,
    ListQuery,
    Page,
    PasswordChange,
    PrivateProfile,
    ProfileUpdate,
    PublicProfile,
    Signin,
    Signup,
    TokenPair,
)
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
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
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


async def signin(request: Request) -> Response:
    data = Signin.model_validate_json(await read_json_body(request))
    user = await UserStore(request.state.session).get_by_username(data.username)
    limiter = request.state.hash_limiter
    if not await verify_password(user.password_hash if user else None, data.password, limiter):
        raise HTTPException(401, "Invalid username or password")
    assert user is not None
    if hasher.check_needs_rehash(user.password_hash):  # made with older parameters: upgrade it
        user.password_hash = await hash_password(data.password, limiter)
    return model_response(TokenPair.model_validate(request.state.tokens.issue(user.id, user.token_version)))


async def refresh(request: Request) -> Response:
    user, claims = await authenticate(request, "refresh")
    await revoke(request, claims)  # rotation: this refresh token is spent
    return model_response(TokenPair.model_validate(request.state.tokens.issue(user.id, user.token_version)))


async def signout(request: Request) -> Response:
    _, claims = await authenticate(request, "refresh")
    await revoke(request, claims)
    return Response(status_code=204)


async def get_me(request: Request) -> Response:
    user, _ = await authenticate(request, "access")
    return model_response(PrivateProfile.model_validate(user))


async def update_me(request: Request) -> Response:
    user, _ = await authenticate(request, "access")
    data = ProfileUpdate.model_validate_json(await read_json_body(request))
    try:
        await UserStore(request.state.session).update(user, data.model_dump(exclude_unset=True))
    except IntegrityError:
        raise HTTPException(409, "Email already exists") from None
    return model_response(PrivateProfile.model_validate(user))


async def change_password(request: Request) -> Response:
    user, _ = await authenticate(request, "access")
    data = PasswordChange.model_validate_json(await read_json_body(request))
    limiter = request.state.hash_limiter
    if not await verify_password(user.password_hash, data.old_password, limiter):
        raise HTTPException(401, "Old password is incorrect")
    new_hash = await hash_password(data.new_password, limiter)
    # A new token version: every token issued before this moment stops working.
    await UserStore(request.state.session).update(
        user, {"password_hash": new_hash, "token_version": user.token_version + 1}
    )
    return Response(status_code=204)


async def delete_me(request: Request) -> Response:
    user, _ = await authenticate(request, "access")
    await UserStore(request.state.session).delete(user)  # its tokens name a user that is gone
    return Response(status_code=204)


async def me(request: Request) -> Response:
    # One route for the three methods, so that a 405 on /api/users/me lists all of them in Allow.
    handlers = {"GET": get_me, "HEAD": get_me, "PATCH": update_me, "DELETE": delete_me}
    return await handlers[request.method](request)


async def get_user(request: Request) -> Response:
    user = await UserStore(request.state.session).public_by_username(request.path_params["username"])
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


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi_document())


routes = [
    # Fixed paths before /api/users/{username}: Starlette takes the first match.
    Route("/api/users/signup", signup, methods=["POST"]),
    Route("/api/users/signin", signin, methods=["POST"]),
    Route("/api/users/refresh", refresh, methods=["POST"]),
    Route("/api/users/signout", signout, methods=["POST"]),
    Route("/api/users/me", me, methods=["GET", "PATCH", "DELETE"]),
    Route("/api/users/me/password", change_password, methods=["PUT"]),
    Route("/api/users", list_users, methods=["GET"]),
    Route("/api/users/{username:str}", get_user, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
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
    fields: dict[str, str] = {}
    for error in errors:
        field = str(error["loc"][0])  # the models are flat; deeper parts name union branches
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "string_pattern_mismatch":
            message = PATTERN_RULES.get(field, message)
        fields.setdefault(field, message)  # one message per field: the first branch's
    return invalid_fields([{"field": field, "message": message} for field, message in fields.items()])


def invalid_fields(errors: list[dict[str, str]]) -> JSONResponse:
    return error_response(400, "Some fields are missing or invalid.", errors=errors)


async def database_error(request: Request, exc: Exception) -> Response:
    if not is_unavailable(exc):
        raise exc
    logger.warning("database unavailable: %r", exc)
    return error_response(503, "The database is unavailable; try again shortly.", headers={"Retry-After": "2"})


async def client_gone(request: Request, exc: Exception) -> Response:
    # Nobody will read this answer; what matters is that it is an error, so nothing is committed.
    logger.info("client disconnected before sending the whole body: %s %s", request.method, request.url.path)
    return error_response(400, "The client disconnected before sending the whole body.")


async def server_error(request: Request, exc: Exception) -> Response:
    # uvicorn closes the connection after an unhandled error; say so, or a client that reuses the
    # connection loses its next request.
    return error_response(500, "Internal server error.", headers={"Connection": "close"})


# --- the application -------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_environ()
    tokens = Tokens(token_secret(settings), settings.access_token_ttl, settings.refresh_token_ttl)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        # One engine (and pool) per process, made after the server starts, disposed at shutdown.
        engine = make_engine(settings)
        try:
            yield {
                "engine": engine,
                "sessionmaker": make_sessionmaker(engine, autocommit_reads=not settings.pgbouncer),
                "write_sessionmaker": make_sessionmaker(engine, writes=True),
                "hash_limiter": hash_limiter(),
                "tokens": tokens,
                "max_body_bytes": settings.max_body_bytes,
            }
        finally:
            # Bounded: a database that stopped answering must not keep the process from exiting.
            with anyio.move_on_after(settings.command_timeout) as bound:
                await engine.dispose()
            if bound.cancelled_caught:
                logger.warning("closing the pool took over %s s; exiting anyway", settings.command_timeout)

    return Starlette(
        routes=routes,
        middleware=[Middleware(DBSessionMiddleware, close_timeout=settings.command_timeout)],
        exception_handlers={
            HTTPException: http_error,
            ValidationError: validation_error,
            ClientDisconnect: client_gone,
            DBAPIError: database_error,
            PoolTimeoutError: database_error,
            OSError: database_error,
            Exception: server_error,
        },
        lifespan=lifespan,
    )
