"""One request, one AsyncSession, one transaction, committed before the response is sent.

`DBSessionMiddleware` gives each HTTP request its own session at `request.state.session`; routes
and stores never commit. A response below 400 is sent only after its transaction has committed;
anything else rolls back, and a failed commit becomes a 500 instead of the app's response.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("users.db")


class CommitFailed(Exception):
    """The commit before the response failed; the response was not sent."""


class DBSessionMiddleware:
    """Give each HTTP request its own AsyncSession at `request.state.session` (from the Database the
    lifespan put at `state["database"]`), and end its transaction before the response starts."""

    def __init__(self, app: ASGIApp, on_transaction_end: Callable[[str], None] | None = None) -> None:
        self.app = app
        # Told how each transaction that did work ended: "commit", "rollback" or "commit_failed".
        self.on_transaction_end = on_transaction_end or (lambda outcome: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        database: Database = scope["state"]["database"]
        # Cheap: the session checks out a pooled connection only when first used.
        session = database.session(writes=scope["method"] not in ("GET", "HEAD", "OPTIONS"))
        # A copy: some servers (and asgi-lifespan) hand every request the same state dict.
        scope["state"] = {**scope["state"], "session": session}
        commit_error: CommitFailed | None = None
        closed = False

        async def send_wrapper(message: Message) -> None:
            nonlocal commit_error, closed
            if commit_error is not None:
                return  # the app's response is dropped: the client gets the 500
            if message["type"] == "http.response.start":
                did_work = session.in_transaction()
                try:
                    if message["status"] < 400:
                        # Don't send the start message until we know the commit worked.
                        try:
                            await session.commit()
                        except Exception as exc:
                            self.on_transaction_end("commit_failed")
                            commit_error = CommitFailed("the commit failed, so the response was not sent")
                            raise commit_error from exc
                    else:
                        await session.rollback()
                    if did_work:
                        self.on_transaction_end("commit" if message["status"] < 400 else "rollback")
                finally:
                    # The request's transaction is over. Closed for good, a later use of this
                    # session (a background task, a streaming body) fails loudly instead of
                    # writing in a new transaction that nobody would commit.
                    await close_session(session)
                    closed = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
            if commit_error is not None:
                raise commit_error  # the app swallowed it; the outer error middleware answers 500
        finally:
            if not closed:  # the app raised (or was cancelled) before it answered
                if session.in_transaction():
                    self.on_transaction_end("rollback")
                await close_session(session)


class DBSession(AsyncSession):
    """An AsyncSession that knows how it ends: whether its connection is in autocommit (a reading
    request on PostgreSQL: there is no transaction to commit or roll back), how long closing it
    may take, and what to do once its transaction has committed."""

    def __init__(self, *args: Any, autocommit: bool = False, close_timeout: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.autocommit = autocommit
        self.close_timeout = close_timeout
        self.committed: list[Callable[[], None]] = []

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` once this transaction has committed, never if it rolls back: for what
        must not be said of work that did not happen (an audit log line, waking the mail loop)."""
        self.committed.append(callback)

    async def commit(self) -> None:
        if not self.autocommit:  # in autocommit every statement has committed on its own
            await super().commit()
        callbacks, self.committed = self.committed, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # the commit happened: nothing after it may turn it into a 500
                logger.exception("a callback after a commit failed")

    async def rollback(self) -> None:
        self.committed.clear()
        await super().rollback()

    async def close(self) -> None:
        self.committed.clear()  # closed without a commit: rolled back
        await super().close()


async def close_session(session: DBSession) -> None:
    """Close a session and give back its connection, even when cancelled, within its close_timeout."""
    if not session.in_transaction() or session.autocommit:
        # Committed, rolled back or never used, or in autocommit: close() does no I/O, so it cannot
        # be interrupted, and there is nothing to shield.
        await session.close()
        return
    # The work failed or was cancelled mid-transaction: close() rolls back and returns the
    # connection. Shielded, because cancelled work must still give its connection back; bounded,
    # because a dead socket must not hold a pool slot forever.
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(session.close_timeout) as bound:
            await session.close()
        if bound.cancelled_caught:
            logger.warning("closing a session took over %s s; invalidating its connection", session.close_timeout)
            await session.invalidate()


@asynccontextmanager
async def transaction(sessionmaker: async_sessionmaker[DBSession]) -> AsyncIterator[DBSession]:
    """A session and transaction of its own, outside the request's: committed when the block ends,
    rolled back if it raises, always closed (as the middleware closes the request's session).

    For background work that runs after the response (the request's session is closed by then),
    and for short reads that must not hold the request's transaction open while CPU work runs.
    """
    session = sessionmaker()
    try:
        yield session
        await session.commit()
    finally:
        await close_session(session)


@dataclass(frozen=True)
class Database:
    """The process's engine, and its sessions: `reads` for GET and HEAD, `writes` for the rest.

    On SQLite a writing session begins with BEGIN IMMEDIATE (engine.py). With an engine in
    autocommit (`autocommit_reads`, PostgreSQL), reads run statement by statement and writes ask
    for READ COMMITTED transactions. A closed session stays closed (close_resets_only=False):
    whatever uses it after its transaction ended gets an error, not a new transaction.
    """

    engine: AsyncEngine
    reads: async_sessionmaker[DBSession]
    writes: async_sessionmaker[DBSession]

    @classmethod
    def on(cls, engine: AsyncEngine, *, autocommit_reads: bool = False, close_timeout: float = 10.0) -> Database:
        options = {"isolation_level": "READ COMMITTED"} if autocommit_reads else {"sqlite_begin": "IMMEDIATE"}

        def sessions(bind: AsyncEngine, autocommit: bool) -> async_sessionmaker[DBSession]:
            return async_sessionmaker(
                bind,
                class_=DBSession,
                expire_on_commit=False,
                close_resets_only=False,
                autocommit=autocommit,
                close_timeout=close_timeout,
            )

        return cls(engine, sessions(engine, autocommit_reads), sessions(engine.execution_options(**options), False))

    def session(self, *, writes: bool) -> DBSession:
        return self.writes() if writes else self.reads()


def database(request: Request) -> Database:
    """The Database the lifespan made (for routes that need a short transaction of their own)."""
    made: Database = request.state.database
    return made
