"""Headers that every answer carries, whoever made it (a route, a middleware, or the 500 page)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

NOSNIFF = (b"x-content-type-options", b"nosniff")


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
