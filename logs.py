"""Log lines on stdout, as JSON objects (LOG_FORMAT=json) or text, each with the id of the request
it was written in; written in batches, so that a line per request stays cheap."""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import sys
import time

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s request_id=%(request_id)s"
JSON_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s"
FLUSH_SECONDS = 0.2
# C0 and C1 controls, DEL, and Unicode's line and paragraph separators, as \xHH or \uHHHH: a field
# (a path with %0a in it, say) cannot start a line of its own.
ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {0x2028: "\\u2028", 0x2029: "\\u2029"}


class RequestIdFilter(logging.Filter):
    """Every record gets the id of the request it was written in ("" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class TextFormatter(logging.Formatter):
    """logging's own text format, one line a record whatever its fields hold (a traceback follows
    on lines of its own), with the timestamp's seconds formatted once per second."""

    _second: int | None = None
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int(record.msecs):03d}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(ESCAPES)


class StdoutHandler(logging.Handler):
    """Lines to whatever sys.stdout is when they are written (a test runner swaps it), in batches:
    one write a FLUSH_SECONDS, at once for a warning or an error, and at shutdown (with
    PYTHONUNBUFFERED, as in the image, a write a line would be a system call a line)."""

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
    """The service's loggers get a handler; uvicorn's keep theirs (which uvicorn set up before the
    app was loaded) with the same formatter and filter, so that its startup lines and tracebacks
    read the same way."""
    # What logging's documentation lists under "Optimization": no record needs its thread's or
    # process's names.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        formatter: logging.Formatter = JsonFormatter(
            JSON_FORMAT, rename_fields={"levelname": "level", "asctime": "time", "name": "logger"}
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
