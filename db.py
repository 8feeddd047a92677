"""The engine and sessionmakers, the 503 mapping, and the session-per-request middleware."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from asyncpg.exceptions import TargetServerAttributeNotMatched
from sqlalchemy import (
    event,
)
from sqlalchemy.engine import URL, ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pool import FairPool
from settings import Settings

logger = logging.getLogger("users.db")

PROJECT_DIR = Path(__file__).resolve().parent


# libpq's multi-host form, as managed providers print it: postgresql://app@h1:5432,h2:5432/users
MULTI_HOST = re.compile(r"^(?P<scheme>[\w+]+://)(?P<user>[^@/?]*@)?(?P<hosts>[^/?@]*,[^/?@]*)(?P<rest>[/?].*)?$")


def async_url(url: str) -> URL:
    """Accept plain `postgresql://` and `sqlite://` URLs and pick the asyncio driver.

    libpq's multi-host form, which SQLAlchemy's parser rejects, becomes SQLAlchemy's own
    (`/users?host=h1:5432&host=h2:5432`); asyncpg tries the hosts in turn, and with
    `target_session_attrs=read-write` keeps the first that takes writes: the primary.
    """
    if match := MULTI_HOST.match(url):
        path, _, query = (match["rest"] or "/").partition("?")
        # asyncpg wants every port spelled out; libpq's default is 5432.
        hosts = "&".join(f"host={host}" + ("" if ":" in host else ":5432") for host in match["hosts"].split(","))
        url = f"{match['scheme']}{match['user'] or ''}{path or '/'}?{hosts}" + (f"&{query}" if query else "")
    parsed = make_url(url)
    driver = {"postgres": "postgresql+asyncpg", "postgresql": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}
    return parsed.set(drivername=driver.get(parsed.drivername, parsed.drivername))


def make_engine(settings: Settings, *, pooled: bool = True, autocommit: bool = False) -> AsyncEngine:
    """One engine per process: it owns the connection pool. `autocommit`: its connections are in
    autocommit unless a session asks for a transaction (see reads_in_autocommit)."""
    url = async_url(settings.database_url)
    # hide_parameters: a failed statement's error (and so its logged traceback) must not carry its
    # bound values, which may be a password hash, an email or a token id.
    kwargs: dict[str, Any] = {"pool_pre_ping": settings.pool_pre_ping, "hide_parameters": True}
    if autocommit:
        kwargs["isolation_level"] = "AUTOCOMMIT"
    if pooled:
        kwargs.update(
            poolclass=FairPool,
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=settings.pool_timeout,
            pool_recycle=settings.pool_recycle,
        )
    else:
        kwargs["poolclass"] = NullPool
    if url.get_backend_name() == "postgresql":
        kwargs["connect_args"] = asyncpg_connect_args(settings)
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "handle_error", _read_only_is_a_disconnect)
        return engine
    engine = create_async_engine(url, **kwargs)
    _configure_sqlite(engine)
    return engine


def asyncpg_connect_args(settings: Settings) -> dict[str, Any]:
    # asyncpg waits 60 s to connect and forever for a statement unless told otherwise.
    connect_args: dict[str, Any] = {
        "timeout": settings.connect_timeout,
        "command_timeout": settings.command_timeout,
        # So that pg_stat_activity tells the service's connections apart.
        "server_settings": {"application_name": settings.application_name},
    }
    if settings.pgbouncer:
        # PgBouncer in transaction mode gives each transaction whichever server connection is
        # free, so nothing may outlive its transaction on a server connection: no statement is
        # cached, and each is unnamed (prepared, bound and run in its own transaction, then
        # replaced by the next Parse), so none is left behind for another client to meet. The
        # pool keeps client connections to PgBouncer open: connecting was the most of the cost.
        connect_args |= {
            "statement_cache_size": 0,
            "prepared_statement_cache_size": 0,
            "prepared_statement_name_func": lambda: "",
        }
    return connect_args


def _read_only_is_a_disconnect(context: ExceptionContext) -> None:
    """A connection to a node that no longer takes writes (a demoted primary, a standby reached
    through a stale address) would fail every write after this one: drop it, and with it the
    pool's other connections made before it, so that the next checkout connects afresh and finds
    the primary of now."""
    if getattr(context.original_exception, "sqlstate", None) == READ_ONLY_SQLSTATE:
        context.is_disconnect = True


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself, so SAVEPOINT and transactional DDL work (see
        # SQLAlchemy's "Transactions with SQLite and the sqlite3 driver").
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "busy_timeout=5000", "foreign_keys=ON", "synchronous=NORMAL"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front (waiting up to busy_timeout for it). A DEFERRED
        # transaction that reads and then writes fails at once, without waiting, when another
        # writer committed after its read began: WAL cannot upgrade a stale snapshot.
        connection.exec_driver_sql(f"BEGIN {connection.get_execution_options().get('sqlite_begin', 'DEFERRED')}")


def reads_in_autocommit(settings: Settings) -> bool:
    """On PostgreSQL a reading request runs in autocommit: under READ COMMITTED every statement has
    its own snapshot anyway, so it loses nothing, and it saves the BEGIN and COMMIT round trips. Not
    behind PgBouncer in transaction mode: there asyncpg's prepare and execute must stay inside one
    transaction, or they may reach two different servers."""
    return async_url(settings.database_url).get_backend_name() == "postgresql" and not settings.pgbouncer


def make_sessionmaker(
    engine: AsyncEngine, *, writes: bool = False, autocommit: bool = False, close_timeout: float = 10.0
) -> async_sessionmaker[AsyncSession]:
    """Sessions for requests that may write, or (writes=False) for GET and HEAD, which only read.

    On SQLite a writing request begins with BEGIN IMMEDIATE (see _configure_sqlite). With an
    engine whose connections are in autocommit (`autocommit`: make_engine's, for reads), a writing
    request asks for READ COMMITTED transactions: reads, the most of the traffic, then switch no
    isolation level.

    A closed session stays closed (close_resets_only=False): whatever uses it after its
    transaction ended gets an error instead of a new transaction that nobody would commit.
    """
    if writes:
        options = {"isolation_level": "READ COMMITTED"} if autocommit else {"sqlite_begin": "IMMEDIATE"}
        bind = engine.execution_options(**options)
    else:
        bind = engine
    info = {"close_timeout": close_timeout, "autocommit": autocommit and not writes}
    return async_sessionmaker(bind, expire_on_commit=False, close_resets_only=False, info=info)


# SQLSTATEs that mean "not now": connection exceptions (08), insufficient resources such as too
# many connections (53), and shutdowns or "the database system is starting up" (57P01-57P03).
# asyncpg's errors for these reach SQLAlchemy as plain DBAPIErrors.
# And 25006, "cannot execute ... in a read-only transaction": this node is (now) a standby.
READ_ONLY_SQLSTATE = "25006"
UNAVAILABLE_SQLSTATES = ("08", "53", "57P01", "57P02", "57P03", READ_ONLY_SQLSTATE)


# SQLite's result codes for "not now": busy or locked past busy_timeout, the file cannot be
# opened, an I/O error. A plain SQLITE_ERROR (such as "no such table") is not one of them.
UNAVAILABLE_SQLITE_ERRORS = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_PROTOCOL")


def is_unavailable(exc: BaseException) -> bool:
    """True for the errors that mean "the database cannot be reached right now" (a 503).

    Not for a permanent fault such as a missing table: retrying that would not help.
    """
    if isinstance(exc, PoolTimeoutError | OSError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(getattr(exc.orig, "__cause__", None), TargetServerAttributeNotMatched):
        return True  # ...or no host takes writes yet (target_session_attrs=read-write, mid-failover)
    sqlite_error = getattr(exc.orig, "sqlite_errorname", None)
    if sqlite_error is not None:
        return str(sqlite_error).startswith(UNAVAILABLE_SQLITE_ERRORS)
    sqlstate = str(getattr(exc.orig, "sqlstate", "") or "")
    return isinstance(exc, OperationalError | InterfaceError) or sqlstate.startswith(UNAVAILABLE_SQLSTATES)


def _alembic_config(database_url: str | None = None) -> Any:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig(str(PROJECT_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_DIR / "migrations"))
    config.attributes["database_url"] = database_url
    return config


def upgrade_schema(database_url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations (blocking; from async code, run it in a thread)."""
    from alembic import command

    command.upgrade(_alembic_config(database_url), revision)


@dataclass(frozen=True)
class SchemaRevisions:
    """The migrations' head, and every revision this code knows (read once, at startup)."""

    head: str
    known: frozenset[str]

    @classmethod
    def from_migrations(cls) -> SchemaRevisions:
        from alembic.script import ScriptDirectory

        script = ScriptDirectory.from_config(_alembic_config())
        return cls(str(script.get_current_head()), frozenset(rev.revision for rev in script.walk_revisions()))

    def behind(self, found: str | None) -> bool:
        """True if the database needs this code's migrations. A revision this code does not know
        is taken to be newer (a later release migrated first, during a rolling deploy): ready."""
        return found is None or (found != self.head and found in self.known)


# --- the session middleware -----------------------------------------------------------------


class CommitFailed(Exception):
    """The commit before the response failed; the response was not sent."""


class DBSessionMiddleware:
    """Give each HTTP request its own AsyncSession at `request.state.session`.

    A response below 400 is sent only after its transaction has committed; anything else rolls
    back, and a failed commit becomes a 500 instead of the app's response.
    """

    def __init__(self, app: ASGIApp, on_transaction_end: Callable[[str], None] | None = None) -> None:
        self.app = app
        # Told how each transaction that did work ended: "commit", "rollback" or "commit_failed".
        self.on_transaction_end = on_transaction_end or (lambda outcome: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        ended = self.on_transaction_end
        writes = scope["method"] not in ("GET", "HEAD", "OPTIONS")
        # Cheap: the session checks out a pooled connection only when first used.
        session: AsyncSession = scope["state"]["write_sessionmaker" if writes else "sessionmaker"]()
        # A copy: some servers (and asgi-lifespan) hand every request the same state dict.
        scope["state"] = {**scope["state"], "session": session}
        commit_error: CommitFailed | None = None
        closed = False

        async def send_wrapper(message: Message) -> None:
            nonlocal commit_error, closed
            if commit_error is not None:
                return  # the app's response is dropped: the client gets the 500
            if message["type"] == "http.response.start":
                worked = session.in_transaction()
                try:
                    if message["status"] < 400:
                        # Don't send the start message until we know the commit worked. (In
                        # autocommit every statement has committed on its own: nothing to do.)
                        try:
                            if not session.info["autocommit"]:
                                await session.commit()
                        except Exception as exc:
                            ended("commit_failed")
                            commit_error = CommitFailed("the commit failed, so the response was not sent")
                            raise commit_error from exc
                        if worked:
                            ended("commit")
                    else:
                        if worked:
                            ended("rollback")
                        await session.rollback()
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
                    ended("rollback")
                await close_session(session)


async def close_session(session: AsyncSession) -> None:
    """Close a session and give back its connection, even when cancelled, within close_timeout."""
    if not session.in_transaction() or session.info["autocommit"]:
        # Committed, rolled back or never used: the connection is back in the pool already; or
        # in autocommit, where there is no transaction to roll back. Either way close() does no
        # I/O, so it cannot be interrupted, and there is nothing to shield (the shield and the
        # bound cost a tenth of a lookup).
        await session.close()
        return
    # The work failed or was cancelled mid-transaction: close() rolls back and returns the
    # connection. Shielded, because cancelled work must still give its connection back; bounded,
    # because a dead socket must not hold a pool slot forever.
    timeout: float = session.info["close_timeout"]
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(timeout) as bound:
            await session.close()
        if bound.cancelled_caught:
            logger.warning("closing a session took over %s s; invalidating its connection", timeout)
            await session.invalidate()


@asynccontextmanager
async def transaction(sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
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
