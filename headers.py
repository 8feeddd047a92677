"""Headers that every answer carries, whoever made it (a route, a middleware, or the 500 page),
and the header values the service sends from more than one place."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

NOSNIFF = (b"x-content-type-options", b"nosniff")
# The connection cannot carry another request (an unread body, or an unhandled error).
CLOSE = {"Connection": "close"}
# The body holds tokens or private data, which no cache may keep.
NO_STORE = {"Cache-Control": "no-store"}
RETRY_AFTER_SECONDS = 2  # on a 503: the database is expected back within seconds


class SecurityHeadersMiddleware:
    """`X-Content-Type-Options: nosniff` on every response: a browser must take a JSON answer for
    JSON, never sniff it into something it would run. (Responses that carry tokens or private data
    say `Cache-Control: no-store` themselves; uvicorn runs with --no-server-header.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), NOSNIFF]
            await send(message)

        await self.app(scope, receive, send_wrapper)
