"""Limits on what a client may make the service wait for: the request body, read whole first."""

from __future__ import annotations

import logging

import anyio
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("users")


class RequestBodyMiddleware:
    """Read the whole request body, at most `max_bytes` within `timeout` seconds, before the app runs.

    So no route can hold a database connection, a lock or a transaction while a slow client sends
    its body: by the time a route runs, the body is in memory. Too large is a 413, too slow a 408.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return

        body, refusal = await self.read_body(scope, receive)
        if refusal is not None:
            # The rest of the body is unread, so this connection cannot carry another request.
            status, detail = refusal
            response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
            await response(scope, receive, send)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: only http.disconnect is left to wait for
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, tuple[int, str] | None]:
        """The whole body, or why not: (status, detail)."""
        too_large = (413, f"Request body is larger than {self.max_bytes} bytes.")
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > self.max_bytes:
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


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    return (length != "" and length != "0") or _header(scope, b"transfer-encoding") != ""


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1").strip())
    return ""
