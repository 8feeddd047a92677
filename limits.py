"""Limits on what a client may make the service hold or wait for: the request head (request line
and headers) and the request body, which is read whole before any route runs."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import anyio
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("users")

MAX_HEAD_BYTES = 16 * 1024  # request line and headers, as most proxies allow (nginx: 4 x 8 KiB)
HEAD_TOO_LARGE = f"Request headers are larger than {MAX_HEAD_BYTES} bytes."


class RequestLimitsMiddleware:
    """Refuse a head over MAX_HEAD_BYTES (431), then read the whole body, at most `max_bytes`
    (else 413) within `timeout` seconds (else 408), before the app runs.

    So no route can hold a database connection, a lock or a transaction while a slow client sends
    its body: by the time a route runs, the body is in memory.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        # One pass over the headers: their size, and whether a body follows them.
        head, length, chunked = len(scope["raw_path"]) + len(scope["query_string"]), b"", False
        for name, value in scope["headers"]:
            head += len(name) + len(value) + 4
            if name == b"content-length":
                length = value.strip()
            elif name == b"transfer-encoding":
                chunked = True
        if head > MAX_HEAD_BYTES:
            await refuse(scope, receive, send, 431, HEAD_TOO_LARGE)
            return
        if length in (b"", b"0") and not chunked:
            await self.app(scope, receive, send)
            return

        body, refusal = await self.read_body(scope, receive, length)
        if refusal is not None:
            await refuse(scope, receive, send, *refusal)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: only http.disconnect is left to wait for
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def read_body(self, scope: Scope, receive: Receive, length: bytes) -> tuple[bytes, tuple[int, str] | None]:
        """The whole body, or why not: (status, detail)."""
        too_large = (413, f"Request body is larger than {self.max_bytes} bytes.")
        if length.isdigit() and int(length) > self.max_bytes:
            return b"", too_large
        body = bytearray()
        with anyio.move_on_after(self.timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    # Nobody will read an answer; an error status keeps anything from committing.
                    logger.info("client disconnected mid-body: %s %s", scope["method"], scope["path"])
                    return b"", (400, "The client disconnected before sending the whole body.")
                body += message.get("body", b"")
                if len(body) > self.max_bytes:  # stop reading: an oversized body is never buffered whole
                    return b"", too_large
                if not message.get("more_body", False):
                    return bytes(body), None
        return b"", (408, f"The request body did not arrive within {self.timeout:g} seconds.")


async def refuse(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
    # Whatever of the request is unread, this connection cannot carry another one.
    response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
    await response(scope, receive, send)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request head over MAX_HEAD_BYTES while it arrives.

    httptools keeps a head in memory until it ends, however long that is (four 128 MiB headers
    took a worker from 145 to 842 MiB), and the app sees nothing until then. This counts what
    arrives while a head is incomplete and, past the limit, answers 431 and closes: memory stays
    within the limit plus one read. A whole head that arrives in one read is refused by
    RequestLimitsMiddleware instead. Used with `uvicorn --http limits:BoundedHttpToolsProtocol`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_bytes = 0
        self.in_head = True  # between requests too: what comes next is a head

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # asyncio sets TCP_NODELAY only on sockets it made itself for TCP. With several workers
        # uvicorn binds the socket (its protocol field left 0) and hands it over, so accepted
        # connections kept Nagle's algorithm: the body, written after the head, waited for the
        # client's delayed ACK, 40 ms a response (2 workers: 700 lookups/s at 32 connections).
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.in_head:
            self.head_bytes += len(data)
        super().data_received(data)
        if self.in_head and self.head_bytes > MAX_HEAD_BYTES and self.transport.is_reading():
            body = b'{"detail":"%s"}' % HEAD_TOO_LARGE.encode()
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                b"x-content-type-options: nosniff\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            # Read no more, and close a moment later: closing with unread input at once would send
            # a reset, which can destroy the answer before the client has read it.
            self.transport.pause_reading()
            self.loop.call_later(1.0, self.transport.close)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head, self.head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self.in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head, self.head_bytes = True, 0
