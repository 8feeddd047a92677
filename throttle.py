"""The throttles: attempts counted in the database, so that every worker and replica shares them
(their rules, and their SQL: SigninFailureStore).

A password check (a signin, a re-authentication) is counted before its outcome is known, against
its client address, its account and the pair of both; from a known device (a `device_token` of an
earlier signin of that account), against that device alone. Signups are counted per address.

`count_attempt` is one of the two places where the service writes whatever the request answers
(the other: accounts.end_family). A failed password check is a 4xx, and the middleware rolls every
4xx back, so the count goes in a short transaction of its own, committed at once.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, case, delete, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.exceptions import HTTPException
from starlette.requests import Request

from addresses import client_address, throttle_key
from db import DBSession, database, transaction
from models import SigninFailure
from resources import resources
from settings import Settings

ANY = ""  # a rule over every address, or over every username


@dataclass(frozen=True)
class Rule:
    """At most `limit` attempts of `kind` by (address, username) in `window` seconds; `0` turns it off."""

    kind: str  # "password", "device", "email" (email-taken answers) or "signup"
    address: str
    username: str
    limit: int
    window: int


def signin_rules(settings: Settings, address: str, account: str, device: str | None = None) -> list[Rule]:
    """The rules a password check for `account` from `address` counts against, widest first: the
    address, over any accounts; the account, from any addresses; the pair. From a known device
    (`device`: its token's id), only that device's own."""
    limit, window = settings.signin_failure_limit, settings.signin_failure_window
    if device is not None:
        return [Rule("device", device, account, limit, window)]
    return [
        Rule("password", address, ANY, settings.signin_address_failure_limit, window),
        Rule("password", ANY, account, settings.signin_account_failure_limit, window),
        Rule("password", address, account, limit, window),
    ]


@dataclass(frozen=True)
class Attempt:
    """An attempt, counted before its outcome was known: a failure until it says otherwise, in the
    request's session, so that the word stands only if the request commits."""

    counted: tuple[tuple[Rule, datetime], ...]  # each rule, and the window it was counted in

    async def succeeded(self, session: AsyncSession, *, clear: bool = False) -> None:
        """It was not a failure: take its counts back (`clear`, for a signin: also forget the
        earlier failures of this account from this address or device)."""
        store = SigninFailureStore(session)
        for rule, window_start in self.counted:
            if clear and rule.address and rule.username:
                await store.clear(rule.kind, rule.address, rule.username)
            else:
                await store.uncount(rule.kind, rule.address, rule.username, window_start)


def address_key(request: Request) -> str:
    return throttle_key(client_address(request.scope))


async def count_attempt(
    request: Request,
    rules: Sequence[Rule],
    too_many: str = "Too many failed attempts",
    went_over: Callable[[DBSession, Rule], Awaitable[None]] | None = None,
) -> Attempt:
    """Count an attempt against each rule, widest first, before its outcome is known (before the
    password is checked), so that concurrent guesses cannot all get through. Past a limit: a 429,
    and no hash is spent; the attempt stops counting there (the counts of wider rules are taken
    back, and narrower ones never made), so that a throttled spray adds no rows. `went_over` is
    called, in the same transaction, for the attempt that first passes a rule's limit in its
    window (once, however many follow). Windows that have passed are purged on the way."""
    rules = [rule for rule in rules if rule.limit]
    if not rules:
        return Attempt(())
    now = datetime.now(UTC)
    counted: list[tuple[Rule, datetime]] = []
    async with transaction(database(request).writes) as session:
        store = SigninFailureStore(session)
        for kind, seconds in {(rule.kind, rule.window) for rule in rules}:
            await store.purge(kind, now - timedelta(seconds=seconds))
        for rule in rules:
            window = timedelta(seconds=rule.window)
            count, window_start = await store.count(rule.kind, rule.address, rule.username, now, window, rule.limit)
            if count > rule.limit:
                await Attempt(tuple(counted)).succeeded(session)
                if count == rule.limit + 1 and went_over is not None:
                    await went_over(session, rule)
                seconds = max(1, math.ceil((window_start + window - now).total_seconds()))
                break
            counted.append((rule, window_start))
        else:
            return Attempt(tuple(counted))
    raise HTTPException(429, f"{too_many}; try again in {seconds} seconds.", headers={"Retry-After": str(seconds)})


async def count_signup(request: Request) -> None:
    """Count a signup against its address (every one, whatever its answer: a 409 tells whether an
    address is registered); past SIGNUP_ADDRESS_LIMIT, a 429 before any hash."""
    settings = resources(request).settings
    rule = Rule("signup", address_key(request), ANY, settings.signup_address_limit, settings.signup_window)
    await count_attempt(request, [rule], "Too many signups from this address")


def _count(insert: Callable[..., Any]) -> Any:
    """count's statement, for a dialect's INSERT ... ON CONFLICT."""
    row = SigninFailure
    expired = row.window_start <= bindparam("b_expired_before", type_=row.window_start.type)
    now = bindparam("b_now", type_=row.window_start.type)
    return (
        insert(row)
        .values(kind=bindparam("b_kind"), address=bindparam("b_address"), username=bindparam("b_username"),
                window_start=now, failures=1)
        .on_conflict_do_update(
            index_elements=[row.kind, row.address, row.username],
            set_={
                "failures": case(
                    (expired, 1), (row.failures > bindparam("b_stop", type_=row.failures.type), row.failures),
                    else_=row.failures + 1,
                ),
                "window_start": case((expired, now), else_=row.window_start),
            },
        )
        .returning(row.failures, row.window_start)
    )  # fmt: skip


# Built once, as the hot lookups are: a signin runs five to eight of these, and building a
# statement (and its cache key) per call costs more CPU than running it. Parameters are "b_"
# names: SQLAlchemy keeps a column's own name for the VALUES and SET of an INSERT or UPDATE.
COUNT = {"postgresql": _count(postgresql.insert), "sqlite": _count(sqlite.insert)}
KEY = (
    (SigninFailure.kind == bindparam("b_kind"))
    & (SigninFailure.address == bindparam("b_address"))
    & (SigninFailure.username == bindparam("b_username"))
)
UNCOUNT = (
    update(SigninFailure)
    .where(KEY, SigninFailure.window_start == bindparam("b_window_start"), SigninFailure.failures > 0)
    .values(failures=SigninFailure.failures - 1)
)
CLEAR = delete(SigninFailure).where(KEY)
PURGE = delete(SigninFailure).where(
    SigninFailure.kind == bindparam("b_kind"), SigninFailure.window_start < bindparam("b_before")
)


class SigninFailureStore:
    """The throttles' counts: attempts per (kind, address, username) in a window from the first
    (see models.SigninFailure)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def count(
        self, kind: str, address: str, username: str, now: datetime, window: timedelta, limit: int
    ) -> tuple[int, datetime]:
        """Count one more, in the current window or in a new one if it has passed, in one atomic
        statement (so that concurrent attempts cannot all read the same count), but not past
        `limit + 2`: a rule over its limit stops counting (`limit + 1` is the attempt that went
        over, `limit + 2` any after it). (count, window start)."""
        statement = COUNT[self.session.get_bind().dialect.name]
        values = {"b_kind": kind, "b_address": address, "b_username": username}
        result = await self.session.execute(
            statement, {**values, "b_now": now, "b_expired_before": now - window, "b_stop": limit + 1}
        )
        failures, window_start = result.one()
        return failures, window_start

    async def uncount(self, kind: str, address: str, username: str, window_start: datetime) -> None:
        """Take back one count made in that window (it was not a failure after all)."""
        values = {"b_kind": kind, "b_address": address, "b_username": username, "b_window_start": window_start}
        await self.session.execute(UNCOUNT, values)

    async def clear(self, kind: str, address: str, username: str) -> None:
        await self.session.execute(CLEAR, {"b_kind": kind, "b_address": address, "b_username": username})

    async def forget(self, account: str) -> None:
        """Every count of this account (the account's own, its pairs', its devices')."""
        await self.session.execute(delete(SigninFailure).where(SigninFailure.username == account))

    async def purge(self, kind: str, before: datetime) -> None:
        """Windows of this kind that started before `before` count for nothing any more."""
        await self.session.execute(PURGE, {"b_kind": kind, "b_before": before})
