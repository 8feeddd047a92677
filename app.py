"""The HTTP API: the routes and `create_app()`, which composes them with the middleware and error handlers."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from pydantic import BaseModel, ValidationError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from auth import (
    Throttle,
    authenticate,
    bad_credentials,
    count_attempt,
    hash_limiter,
    hash_password,
    hasher,
    make_tokens,
    no_longer_valid,
    revoke,
    token_claims,
    verify_password,
)
from db import (
    DBSessionMiddleware,
    SchemaRevisions,
    Settings,
    is_unavailable,
    make_engine,
    make_sessionmaker,
    transaction,
)
from errors import (
    database_error,
    error_response,
    http_error,
    invalid_fields,
    server_error,
    validation_error,
)
from limits import RequestBodyMiddleware
from openapi import openapi_document
from schemas import (
    USERNAME_PATTERN,
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
USERNAME = re.compile(USERNAME_PATTERN)


def model_response(model: BaseModel, status_code: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


async def read_json_body(request: Request) -> bytes:
    """The body of a JSON request (RequestBodyMiddleware has read it already, within its limits)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise HTTPException(415, "Content-Type must be application/json.")
    return await request.body()


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
    attempt = await count_attempt(request, data.username)  # a 429 here costs no hash
    # A short read of its own, so that no connection or transaction is held while the hash runs.
    async with transaction(request.state.sessionmaker) as session:
        user = await UserStore(session).get_by_username(data.username)
    limiter = request.state.hash_limiter
    if not await verify_password(user.password_hash if user else None, data.password, limiter):
        raise bad_credentials()
    assert user is not None
    # Made with older parameters: upgrade it.
    new_hash = await hash_password(data.password, limiter) if hasher.check_needs_rehash(user.password_hash) else None
    # Only if the hash just verified is still the user's: a password change may have committed meanwhile.
    version = await UserStore(request.state.session).confirm_password(user.id, user.password_hash, new_hash)
    if version is None:
        raise bad_credentials()
    await attempt.succeeded(request.state.session)
    return model_response(TokenPair.model_validate(request.state.tokens.issue(user.id, version)))


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
    claims = token_claims(request, "access")
    data = ProfileUpdate.model_validate_json(await read_json_body(request))
    try:
        user = await UserStore(request.state.session).update(
            claims.user_id, claims.version, data.model_dump(exclude_unset=True)
        )
    except IntegrityError:
        raise HTTPException(409, "Email already exists") from None
    if user is None:
        raise no_longer_valid()
    return model_response(PrivateProfile.model_validate(user))


async def change_password(request: Request) -> Response:
    claims = token_claims(request, "access")
    data = PasswordChange.model_validate_json(await read_json_body(request))
    # A short read of its own, so that no connection or transaction is held while the hashes run.
    async with transaction(request.state.sessionmaker) as session:
        user = await UserStore(session).current(claims.user_id, claims.version)
    if user is None:
        raise no_longer_valid()
    attempt = await count_attempt(request, user.username)  # a password guess like a signin's
    limiter = request.state.hash_limiter
    if not await verify_password(user.password_hash, data.old_password, limiter):
        # The token is good, so this is not an authentication failure: a client that treats 401
        # as "signed out" would drop its session over a typo.
        return invalid_fields([{"field": "old_password", "message": "is not your current password"}])
    new_hash = await hash_password(data.new_password, limiter)
    # Only if the token's version is still the user's: a racing change or deletion that committed
    # first makes this one fail (and ends this token) instead of being overwritten.
    if not await UserStore(request.state.session).change_password(user.id, claims.version, new_hash):
        raise no_longer_valid()
    await attempt.succeeded(request.state.session)
    return Response(status_code=204)


async def delete_me(request: Request) -> Response:
    claims = token_claims(request, "access")
    if not await UserStore(request.state.session).delete(claims.user_id, claims.version):
        raise no_longer_valid()
    return Response(status_code=204)  # its tokens name a user that is gone


async def me(request: Request) -> Response:
    # One route for the three methods, so that a 405 on /api/users/me lists all of them in Allow.
    handlers = {"GET": get_me, "HEAD": get_me, "PATCH": update_me, "DELETE": delete_me}
    return await handlers[request.method](request)


async def get_user(request: Request) -> Response:
    username: str = request.path_params["username"]
    # No stored username is anything else (signup's rule), so nothing can match; and PostgreSQL
    # could not even compare a string with a NUL byte in it.
    found = USERNAME.fullmatch(username) is not None
    user = await UserStore(request.state.session).public_by_username(username) if found else None
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
    # Bounded by the pool and driver timeouts; an unreachable database answers 503 (database_error).
    try:
        found = await request.state.session.scalar(text("SELECT version_num FROM alembic_version"))
    except DBAPIError as exc:
        if is_unavailable(exc):
            raise
        found = None  # no alembic_version table: never migrated
    revisions: SchemaRevisions = request.state.schema_revisions
    if revisions.behind(found):
        return error_response(
            503, f"The database schema is at revision {found or 'none'}, not {revisions.head}: run the migrations."
        )
    return JSONResponse({"status": "ready", "revision": found})


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


# --- the application -------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_environ()
    tokens = make_tokens(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        # One engine (and pool) per process, made after the server starts, disposed at shutdown.
        engine = make_engine(settings)
        try:
            yield {
                "engine": engine,
                "sessionmaker": make_sessionmaker(
                    engine, autocommit_reads=not settings.pgbouncer, close_timeout=settings.command_timeout
                ),
                "write_sessionmaker": make_sessionmaker(engine, writes=True, close_timeout=settings.command_timeout),
                "hash_limiter": hash_limiter(),
                "tokens": tokens,
                "throttle": Throttle(
                    settings.signin_failure_limit, settings.signin_address_failure_limit, settings.signin_failure_window
                ),
                "schema_revisions": SchemaRevisions.from_migrations(),
            }
        finally:
            # Bounded: a database that stopped answering must not keep the process from exiting.
            with anyio.move_on_after(settings.command_timeout) as bound:
                await engine.dispose()
            if bound.cancelled_caught:
                logger.warning("closing the pool took over %s s; exiting anyway", settings.command_timeout)

    # Outermost first. CORS wraps everything, so that its headers are on every answer (a 408 or 413
    # included); the body is read whole before the session is made, so no transaction waits on a client.
    cors = Middleware(
        CORSMiddleware,
        allow_origins=settings.cors_allow_origins,
        allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=["Retry-After", "WWW-Authenticate"],
        max_age=600,
    )
    return Starlette(
        routes=routes,
        middleware=[
            *([cors] if settings.cors_allow_origins else []),
            Middleware(RequestBodyMiddleware, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout),
            Middleware(DBSessionMiddleware),
        ],
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
