"""The signin throttle: failures counted in the database, so every worker and replica shares them.

`count_attempt` is one of the two places where the service writes whatever the request answers
(the other: accounts.end_family). A failed password check is a 4xx, and the middleware rolls every 4xx
back, so the count goes in a short transaction of its own, committed at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.exceptions import HTTPException
from starlette.requests import Request

from db import database, transaction
from models import ADDRESS_LENGTH
from resources import resources
from stores import SigninFailureStore

Kind = Literal["password", "email"]  # a password check, or an "Email already exists" answer


@dataclass(frozen=True)
class Attempt:
    """An attempt, counted by count_attempt before its outcome was known: a failure until it says
    otherwise, in the request's session, so that the word stands only if the request commits."""

    kind: Kind
    address: str
    username: str
    windows: dict[str, datetime]  # username ("" for the address's rule): the window it was counted in

    async def succeeded(self, session: AsyncSession, *, clear: bool = False) -> None:
        """It was not a failure: take its count back (`clear`, for a signin: also forget this
        username's earlier failures from this address)."""
        store = SigninFailureStore(session)
        for username, window_start in self.windows.items():
            if clear and username:
                await store.clear(self.kind, self.address, username)
            else:
                await store.uncount(self.kind, self.address, username, window_start)


def client_address(request: Request) -> str:
    """The address uvicorn reports (it honours X-Forwarded-For only from FORWARDED_ALLOW_IPS);
    anything longer than an address is cut to fit its column."""
    host = request.client.host if request.client else ""
    return (host or "unknown")[:ADDRESS_LENGTH]


async def count_attempt(request: Request, username: str, kind: Kind = "password") -> Attempt:
    """Count an attempt before its outcome is known (before the password is checked), so that
    concurrent guesses cannot all get through; over a limit, a 429, and no hash is spent.
    Windows that have passed are purged on the way."""
    settings = resources(request).settings
    address = client_address(request)
    limits = {username: settings.signin_failure_limit}
    if kind == "password":  # email-taken answers are counted per (address, username) only
        limits[""] = settings.signin_address_failure_limit
    rules = {name: limit for name, limit in limits.items() if limit}  # a limit of 0 turns its rule off
    if not rules:
        return Attempt(kind, address, username, {})
    now, window = datetime.now(UTC), timedelta(seconds=settings.signin_failure_window)
    waits, windows = [], {}
    async with transaction(database(request).writes) as session:
        store = SigninFailureStore(session)
        await store.purge(now - window)
        for name, limit in rules.items():
            failures, windows[name] = await store.count(kind, address, name, now, window)
            if failures > limit:
                waits.append(math.ceil((windows[name] + window - now).total_seconds()))
    if waits:
        seconds = max(1, *waits)
        raise HTTPException(
            429, f"Too many failed attempts; try again in {seconds} seconds.", headers={"Retry-After": str(seconds)}
        )
    return Attempt(kind, address, username, windows)
