"""The application: `create_app()` composes the routes, the middleware, the error handlers and the
lifespan. Nothing here does I/O; the lifespan (lifespan.py) does, once the server runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp

import accounts
import admin
import me
import probes
import profiles
import recovery
from db import DBSessionMiddleware
from errors import database_error, http_error, server_error, validation_error
from headers import SecurityHeadersMiddleware
from lifespan import lifespan
from limits import RequestLimitsMiddleware
from logs import configure_logging
from metrics import Metrics
from observability import RequestIdMiddleware, RequestTelemetryMiddleware
from openapi import docs_routes, routes_of
from settings import Settings
from tokens import make_tokens

# The fixed paths (/api/users/signup, /api/users/me...) come before the profiles'
# /api/users/{username}: Starlette takes the first match.
OPERATIONS = (
    *accounts.OPERATIONS, *recovery.OPERATIONS, *me.OPERATIONS, *profiles.OPERATIONS, *admin.OPERATIONS,
    *probes.OPERATIONS,
)  # fmt: skip


class ServiceApp(Starlette):
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
    configure_logging(settings.log_format)
    tokens = make_tokens(settings)  # before serving: a missing or weak key stops startup here
    metrics = Metrics(settings.web_concurrency) if settings.metrics else None
    cors = Middleware(
        CORSMiddleware,
        allow_origins=settings.cors_allow_origins,
        allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=["Retry-After", "WWW-Authenticate", "X-Request-ID"],
        max_age=600,
    )
    app = ServiceApp(
        routes=[
            *routes_of(OPERATIONS),
            *docs_routes(),
            *([Route("/metrics", probes.prometheus_metrics, include_in_schema=False)] if metrics else []),
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
        lifespan=lifespan(settings, tokens, metrics),
    )
    app.state.operations = OPERATIONS  # what /openapi.json documents
    return app
