"""Seen from outside: a request id on every answer and log line, one log line per request, and
Prometheus metrics for the whole service (every worker's), cheap enough to leave on."""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from settings import Settings

logger = logging.getLogger("users")
access_logger = logging.getLogger("users.access")

REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


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
        given = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"")
        rid = given.decode("latin-1") if REQUEST_ID.fullmatch(given.decode("latin-1")) else uuid.uuid4().hex
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
                self.log_line(scope, route, status, seconds)

    def log_line(self, scope: Scope, route: str, status: int, seconds: float) -> None:
        level = logging.ERROR if status >= 500 else logging.WARNING if status == 0 else logging.INFO
        if access_logger.isEnabledFor(level):
            access_logger.handle(AccessRecord(level, scope, route, status, seconds))


class AccessRecord(logging.LogRecord):
    """A request's log line, as a record that carries what its formatters read and no more: a
    LogRecord's own __init__ fills in some twenty attributes (the caller's file and module, thread
    and process names...) that cost more than the line, a line per request."""

    def __init__(self, level: int, scope: Scope, route: str, status: int, seconds: float) -> None:
        client = scope.get("client")
        self.method, self.route, self.path, self.status = scope["method"], route, scope["path"], status
        self.duration_ms, self.client = round(seconds * 1000, 3), client[0] if client else None
        self.name, self.levelno, self.levelname = access_logger.name, level, logging.getLevelName(level)
        self.msg = "%s %s %s %.3f ms route=%s client=%s"
        self.args = (self.method, self.path, status, self.duration_ms, route, self.client or "-")
        self.created = time.time()
        self.msecs, self.relativeCreated = self.created % 1 * 1000, 0.0
        self.exc_info = self.exc_text = self.stack_info = None
        # Empty, for any other handler's format that names them (a test runner's does).
        self.pathname = self.filename = self.module = self.funcName = ""
        self.lineno, self.thread, self.threadName, self.process, self.processName = 0, None, None, None, None


class RequestIdFilter(logging.Filter):
    """Every record gets the id of the request it was written in ("" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


TEXT_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s request_id=%(request_id)s"
FLUSH_SECONDS = 0.2


class TextFormatter(logging.Formatter):
    """logging's own text format, with the timestamp's seconds formatted once per second."""

    _second: int | None = None
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int(record.msecs):03d}"


class StdoutHandler(logging.Handler):
    """Lines to whatever sys.stdout is when they are written (a test runner swaps it), in batches:
    one write a FLUSH_SECONDS (a write and a flush a line, with PYTHONUNBUFFERED as in the image,
    cost a system call each), at once for a warning or an error, and at shutdown."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or len(self.lines) >= 512:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self.lines:
                lines, self.lines = self.lines, []
                sys.stdout.write("\n".join(lines) + "\n")
                sys.stdout.flush()


async def flush_logs_periodically() -> None:
    """The lifespan runs this: what the handlers hold is written every FLUSH_SECONDS."""
    while True:
        await asyncio.sleep(FLUSH_SECONDS)
        flush_logs()


def flush_logs() -> None:
    for handler in logging.getLogger("users").handlers:
        handler.flush()


def configure_logging(log_format: str) -> None:
    """Log lines on stdout: JSON objects (LOG_FORMAT=json) or text. The service's own loggers get
    a handler; uvicorn's keep theirs (which uvicorn set up before the app was loaded) with the same
    formatter and filter, so that its startup lines and tracebacks read the same way."""
    # What logging's documentation lists under "Optimization": no record needs its caller's file
    # and line, or thread and process names (a line per request would pay for them each time).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        formatter: logging.Formatter = JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
            rename_fields={"levelname": "level", "asctime": "time", "name": "logger"},
        )
    else:
        formatter = TextFormatter(TEXT_FORMAT)
    handler = StdoutHandler()
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdFilter())
    service = logging.getLogger("users")
    for old in service.handlers:
        old.flush()
    service.handlers = [handler]
    service.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error"):
        for uvicorn_handler in logging.getLogger(name).handlers:
            uvicorn_handler.setFormatter(formatter)
            uvicorn_handler.addFilter(RequestIdFilter())
    if not _flush_at_exit:
        _flush_at_exit.append(atexit.register(flush_logs))


_flush_at_exit: list[object] = []


# --- metrics -------------------------------------------------------------------------------------

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def metrics_directory(settings: Settings) -> Path | None:
    """With several workers, prometheus-client's multiprocess mode: each worker writes its numbers
    to files in one directory, and a scrape of any worker sums them. The directory is the service's
    own, named after uvicorn's supervisor (the workers' parent), so that a restarted service starts
    from zero; those of supervisors that are gone are removed on the way. None with one process."""
    if settings.web_concurrency <= 1:
        return None
    base = Path(settings.metrics_dir or tempfile.gettempdir())
    for stale in base.glob("users-metrics-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and pid != str(os.getppid()) and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    directory = base / f"users-metrics-{os.getppid()}"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


class Metrics:
    """The service's metrics, for one process, or (with a directory) for the whole service."""

    def __init__(self, directory: Path | None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

        self.directory = directory
        if directory is not None:
            # Chosen by prometheus-client when it is imported: choose again, now that the
            # directory exists (the service may have imported it before).
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
            values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        # A registry of its own: several apps in one process (tests) must not clash.
        self.registry = CollectorRegistry()
        registry = None if directory is not None else self.registry  # multiprocess: files, not a registry
        self.requests = Counter(
            "http_requests_total", "Answers, by route template and status.", ["method", "route", "status"],
            registry=registry,
        )  # fmt: skip
        self.duration = Histogram(
            "http_request_duration_seconds", "Time to answer, by route template.", ["method", "route"],
            buckets=BUCKETS, registry=registry,
        )  # fmt: skip
        self.pool_size = Gauge(
            "db_pool_size", "Database connections the pools hold open.", registry=registry, multiprocess_mode="livesum"
        )
        self.pool_checked_out = Gauge(
            "db_pool_checked_out", "Database connections in use by a request.", registry=registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.transactions = Counter(
            "db_transactions_total", "Request transactions that did work, by how they ended.", ["outcome"],
            registry=registry,
        )  # fmt: skip
        self.unavailable = Counter(
            "db_unavailable_total", "Answers that said 503: the database was unavailable.", registry=registry
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._outcomes: dict[str, Any] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:  # label lookups take a lock: do each once
            children = (self.requests.labels(method, route, str(status)), self.duration.labels(method, route))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def transaction_ended(self, outcome: str) -> None:
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self.transactions.labels(outcome)
        child.inc()

    def watch_pool(self, pool_events_target: Any) -> None:
        """Keep the pool gauges current from the pool's own events."""
        from sqlalchemy import event

        event.listen(pool_events_target, "connect", lambda *_: self.pool_size.inc())
        event.listen(pool_events_target, "close", lambda *_: self.pool_size.dec())
        event.listen(pool_events_target, "close_detached", lambda *_: self.pool_size.dec())
        event.listen(pool_events_target, "checkout", lambda *_: self.pool_checked_out.inc())
        event.listen(pool_events_target, "checkin", lambda *_: self.pool_checked_out.dec())

    def exposition(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        if self.directory is None:
            return bytes(generate_latest(self.registry))
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.directory))  # type: ignore[no-untyped-call]
        return bytes(generate_latest(registry))

    def process_ended(self) -> None:
        """This worker's live gauges stop counting (at shutdown)."""
        if self.directory is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), path=str(self.directory))  # type: ignore[no-untyped-call]


async def metrics_endpoint(request: Request) -> Response:
    """The Prometheus text format; touches no database connection (the pool gauges are counters)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    metrics: Metrics = request.state.metrics
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
