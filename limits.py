"""Limits on what a client may make the service hold or wait for: the request head (request line
and headers) and the request body, which is read whole before any route runs. (A head that
arrives in pieces is bounded as it arrives, by protocol.py.)"""

from __future__ import annotations

import logging

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from errors import error_response
from headers import CLOSE

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
    await error_response(status, detail, headers=CLOSE)(scope, receive, send)
