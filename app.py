"""The HTTP API: the routes and `create_app()`, which composes them with the middleware and error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import signal
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import anyio
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from accounts import change_password, me, refresh, signin, signout, signup
from auth import hash_limiter, make_tokens
from db import (
    DBSessionMiddleware,
    SchemaRevisions,
    is_unavailable,
    make_engine,
    make_sessionmaker,
    reads_in_autocommit,
)
from errors import database_error, error_response, http_error, server_error, validation_error
from headers import SecurityHeadersMiddleware
from limits import RequestLimitsMiddleware
from observability import (
    Metrics,
    RequestIdMiddleware,
    RequestTelemetryMiddleware,
    configure_logging,
    flush_logs,
    flush_logs_periodically,
    metrics_directory,
    metrics_endpoint,
)
from openapi import docs_routes, openapi_document
from schemas import USERNAME_PATTERN, ListQuery, Page, PublicProfile, model_response
from settings import Settings
from stores import UserStore
from throttle import Throttle

logger = logging.getLogger("users")
USERNAME = re.compile(USERNAME_PATTERN)


# --- routes --------------------------------------------------------------------------------


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
    if request.state.draining.is_set():  # SIGTERM came: let the load balancer stop sending
        return error_response(503, "The service is shutting down.")
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


class Service(Starlette):
    """Starlette, with room for middleware outside its ServerErrorMiddleware (which Starlette puts
    outermost): for what must wrap every answer, the 500s that middleware sends included."""

    def __init__(self, *, outer_middleware: Sequence[Middleware], **kwargs: Any) -> None:
        self.outer_middleware = outer_middleware
        super().__init__(**kwargs)

    def build_middleware_stack(self) -> ASGIApp:
        app = super().build_middleware_stack()
        for cls, args, kwargs in reversed(self.outer_middleware):
            app = cls(app, *args, **kwargs)
        return app


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_environ()
    tokens = make_tokens(settings)
    configure_logging(settings.log_format)
    metrics = Metrics(metrics_directory(settings)) if settings.metrics else None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        # One engine (and pool) per process, made after the server starts, disposed at shutdown.
        autocommit = reads_in_autocommit(settings)
        engine = make_engine(settings, autocommit=autocommit)
        if metrics is not None:
            metrics.watch_pool(engine.sync_engine)
        flusher = asyncio.create_task(flush_logs_periodically())
        # What start-up made (modules, models, compiled statements) lives as long as the process:
        # kept out of the collector's way, so that its collections stop walking all of it again.
        gc.collect()
        gc.freeze()
        with draining_on_sigterm() as draining:
            try:
                yield {
                    "engine": engine,
                    "sessionmaker": make_sessionmaker(
                        engine, autocommit=autocommit, close_timeout=settings.command_timeout
                    ),
                    "write_sessionmaker": make_sessionmaker(
                        engine, writes=True, autocommit=autocommit, close_timeout=settings.command_timeout
                    ),
                    "hash_limiter": hash_limiter(),
                    "tokens": tokens,
                    "throttle": Throttle(
                        settings.signin_failure_limit,
                        settings.signin_address_failure_limit,
                        settings.signin_failure_window,
                    ),
                    "schema_revisions": SchemaRevisions.from_migrations(),
                    "metrics": metrics,
                    "draining": draining,
                }
            finally:
                # Bounded: a database that stopped answering must not keep the process from exiting.
                with anyio.move_on_after(settings.command_timeout) as bound:
                    await engine.dispose()
                if bound.cancelled_caught:
                    logger.warning("closing the pool took over %s s; exiting anyway", settings.command_timeout)
                if metrics is not None:
                    metrics.process_ended()
                flusher.cancel()
                flush_logs()

    cors = Middleware(
        CORSMiddleware,
        allow_origins=settings.cors_allow_origins,
        allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=["Retry-After", "WWW-Authenticate", "X-Request-ID"],
        max_age=600,
    )
    return Service(
        routes=[
            *routes,
            *docs_routes(),
            *([Route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)] if metrics else []),
        ],
        # Outermost first. These wrap even Starlette's own error middleware, so that they see, and
        # mark, every answer, a 500 included: the request id first, as everything after it logs.
        outer_middleware=[
            Middleware(RequestIdMiddleware),
            *(
                [Middleware(RequestTelemetryMiddleware, metrics=metrics, log=settings.request_log)]
                if metrics or settings.request_log
                else []
            ),
            Middleware(SecurityHeadersMiddleware),
            *([cors] if settings.cors_allow_origins else []),
        ],
        # The body is read whole before the session is made, so no transaction waits on a client.
        middleware=[
            Middleware(RequestLimitsMiddleware, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout),
            Middleware(DBSessionMiddleware, on_transaction_end=metrics.transaction_ended if metrics else None),
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


@contextlib.contextmanager
def draining_on_sigterm() -> Iterator[threading.Event]:
    """An event set when SIGTERM arrives, before uvicorn's own handler (which stops accepting,
    lets the requests in flight finish, then ends the lifespan) is called as usual."""
    draining = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread
        yield draining
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        draining.set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield draining
    finally:
        signal.signal(signal.SIGTERM, previous)
