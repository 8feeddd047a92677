"""The service's connections: its HTTP protocol for uvicorn (`--http protocol:HttpProtocol`, see
server.py), uvicorn's httptools protocol with Nagle's algorithm off on every connection and the
request head bounded in size and time while it arrives; and what is logged when the process runs
out of file descriptors to accept connections with."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from headers import CLOSE, NOSNIFF
from limits import HEAD_TOO_LARGE, MAX_HEAD_BYTES
from settings import Settings

logger = logging.getLogger("users")

CLOSE_HEADER = (b"connection", CLOSE["Connection"].encode())
ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's message
ACCEPT_FAILURE_LOG_SECONDS = 10.0


@functools.cache
def head_timeout() -> float:
    """HEAD_TIMEOUT, read once per worker (uvicorn makes the protocol; the settings are the environment's)."""
    return Settings.from_environ().head_timeout


def answer(status: bytes, detail: str) -> bytes:
    """A whole HTTP answer in the one error shape, for a connection that is closed after it."""
    body = b'{"detail":"%s"}' % detail.encode()
    headers = b"".join(b"%s: %s\r\n" % header for header in (NOSNIFF, CLOSE_HEADER))
    return b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n%scontent-length: %d\r\n\r\n%s" % (
        status, headers, len(body), body,
    )  # fmt: skip


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with TCP_NODELAY, refusing a head over MAX_HEAD_BYTES while it
    arrives, and closing a connection whose head is not whole within HEAD_TIMEOUT.

    httptools keeps a head in memory until it ends, however long that is, and the app sees nothing
    until then. This counts what arrives while a head is incomplete and, past the limit, answers
    431 and closes: memory stays within the limit plus one read. A whole head that arrives in one
    read is refused by RequestLimitsMiddleware instead. uvicorn's keep-alive timeout ends at the
    first byte of the next head, and nothing times a new connection: a client that sends nothing,
    or a byte now and then, would hold its connection (and a file descriptor) for ever.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_bytes = 0
        self.in_head = True  # between requests too: what comes next is a head
        self.head_deadline: asyncio.TimerHandle | None = None

    def _start_head_deadline(self) -> None:
        self._stop_head_deadline()
        self.head_deadline = self.loop.call_later(head_timeout(), self._head_timed_out)

    def _stop_head_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_timed_out(self) -> None:
        self.head_deadline = None
        if not self.in_head or self.transport.is_closing() or (self.cycle and not self.cycle.response_complete):
            return  # a request is being answered
        if self.head_bytes:  # part of a head came: say why it ends
            self.transport.write(
                answer(b"408 Request Timeout", f"The request head did not arrive within {head_timeout():g} seconds.")
            )
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # asyncio sets TCP_NODELAY only on sockets it made itself for TCP. With several workers
        # uvicorn binds the socket (its protocol field left 0) and hands it over, so accepted
        # connections keep Nagle's algorithm, and a body written after its head waits for the
        # client's delayed ACK.
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        self._start_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.in_head:
            self.head_bytes += len(data)
        super().data_received(data)
        if self.in_head and self.head_bytes > MAX_HEAD_BYTES and self.transport.is_reading():
            self._stop_head_deadline()
            self.transport.write(answer(b"431 Request Header Fields Too Large", HEAD_TOO_LARGE))
            # Read no more, and close a moment later: closing with unread input at once would send
            # a reset, which can destroy the answer before the client has read it.
            self.transport.pause_reading()
            self.loop.call_later(1.0, self.transport.close)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._stop_head_deadline()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head, self.head_bytes = True, 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._start_head_deadline()  # the next head's time starts now


def log_accept_failures_once_in_a_while(loop: asyncio.AbstractEventLoop) -> None:
    """Out of file descriptors, asyncio reports every failed accept (each a traceback, up to a
    hundred per wake-up): report them once every ACCEPT_FAILURE_LOG_SECONDS instead, counted. Every
    other error goes to the loop's usual handler."""
    state = {"last": 0.0, "failed": 0}

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_FAILED:
            loop.default_exception_handler(context)
            return
        state["failed"] += 1
        now = time.monotonic()
        if now - state["last"] >= ACCEPT_FAILURE_LOG_SECONDS:
            logger.error(
                "cannot accept connections: %s (%d failed accepts since the last report); raise the file "
                "descriptor limit, or limit connections per client at the proxy", context.get("exception"),
                state["failed"],
            )  # fmt: skip
            state["last"], state["failed"] = now, 0

    loop.set_exception_handler(handler)
