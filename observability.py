"""Seen from outside: a request id on every answer and log line, and for every request one log
line and its count and time in the metrics. Two pure ASGI middlewares, cheap enough to leave on."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from addresses import client_address
from logs import request_id
from metrics import Metrics

access_logger = logging.getLogger("users.access")

REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
ACCESS_FORMAT = "%s %s %s %.3f ms route=%s client=%s"


class RequestIdMiddleware:
    """Take the request's `X-Request-ID` if it is 1 to 128 of `[A-Za-z0-9._-]`, else make one (32
    hex digits); put it on the answer and, through a context variable, on every log line written
    while the request runs. Outermost, so that even Starlette's own 500 page carries it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"").decode("latin-1")
        rid = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        # Not reset afterwards: each request runs in a task of its own, and what uvicorn logs
        # after the app has raised should still carry the id.
        request_id.set(rid)
        header = (b"x-request-id", rid.encode())

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_wrapper)


def route_of(scope: Scope) -> str:
    """The matched route's path template ("/api/users/{username}"), or "unmatched": a label per
    raw path would make a time series per username."""
    route: BaseRoute | None = scope.get("route")
    return str(getattr(route, "path_format", "unmatched"))


class RequestTelemetryMiddleware:
    """One log line per request, in place of uvicorn's access log, written once the answer is out
    (so it adds nothing to the response's latency), and the request counted and timed for the
    metrics, by method, route template and status (not /metrics itself). One class for both: each
    wrapper around `send` costs every request."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None, log: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0  # none sent: the client left, or the server is shutting down

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            seconds, route = time.perf_counter() - start, route_of(scope)
            if self.metrics is not None and route != "/metrics":
                self.metrics.observe(scope["method"], route, status, seconds)
            if self.log:
                log_request(scope, route, status, seconds)


def log_request(scope: Scope, route: str, status: int, seconds: float) -> None:
    level = logging.ERROR if status >= 500 else logging.WARNING if status == 0 else logging.INFO
    if not access_logger.isEnabledFor(level):
        return
    fields = {
        "method": scope["method"],
        "route": route,
        "path": scope["path"],
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
        "client": client_address(scope),  # canonical: a proxy header cannot put words in the log
    }
    # makeLogRecord, not logger.info: the caller's file and line (a walk up the stack) are of no
    # use in a line per request.
    record = logging.makeLogRecord(
        {
            "name": access_logger.name,
            "levelno": level,
            "levelname": logging.getLevelName(level),
            "msg": ACCESS_FORMAT,
            "args": (fields["method"], fields["path"], status, fields["duration_ms"], route, fields["client"]),
            **fields,
        }
    )
    access_logger.handle(record)
