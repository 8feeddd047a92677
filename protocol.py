"""The service's HTTP protocol for uvicorn (`--http protocol:HttpProtocol`, see server.py):
uvicorn's httptools protocol, with Nagle's algorithm off on every connection and the request head
bounded while it arrives."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from headers import CLOSE, NOSNIFF
from limits import HEAD_TOO_LARGE, MAX_HEAD_BYTES

CLOSE_HEADER = (b"connection", CLOSE["Connection"].encode())


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with TCP_NODELAY, refusing a head over MAX_HEAD_BYTES while it
    arrives.

    httptools keeps a head in memory until it ends, however long that is, and the app sees nothing
    until then. This counts what arrives while a head is incomplete and, past the limit, answers
    431 and closes: memory stays within the limit plus one read. A whole head that arrives in one
    read is refused by RequestLimitsMiddleware instead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_bytes = 0
        self.in_head = True  # between requests too: what comes next is a head

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # asyncio sets TCP_NODELAY only on sockets it made itself for TCP. With several workers
        # uvicorn binds the socket (its protocol field left 0) and hands it over, so accepted
        # connections keep Nagle's algorithm, and a body written after its head waits for the
        # client's delayed ACK.
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
            headers = b"".join(b"%s: %s\r\n" % header for header in (NOSNIFF, CLOSE_HEADER))
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                b"%scontent-length: %d\r\n\r\n%s" % (headers, len(body), body)
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
