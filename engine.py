"""The engine and its driver: URLs, the pool, asyncpg's and SQLite's settings, and which errors
mean "the database cannot be reached right now" (a 503, not a 500)."""

from __future__ import annotations

import re
from typing import Any

from asyncpg.exceptions import InternalClientError, TargetServerAttributeNotMatched
from sqlalchemy import event
from sqlalchemy.engine import URL, ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from pool import FairPool
from settings import Settings

# libpq's multi-host form, as managed providers print it: postgresql://app@h1:5432,h2:5432/users
MULTI_HOST = re.compile(r"^(?P<scheme>[\w+]+://)(?P<user>[^@/?]*@)?(?P<hosts>[^/?@]*,[^/?@]*)(?P<rest>[/?].*)?$")
DRIVERS = {"postgres": "postgresql+asyncpg", "postgresql": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}

# "cannot execute ... in a read-only transaction": this node is a standby (or a demoted primary).
READ_ONLY_SQLSTATE = "25006"
# SQLSTATEs that mean "not now": connection exceptions (08), insufficient resources such as too
# many connections (53), shutdowns and "the database system is starting up" (57P01-57P03), and a
# read-only node. asyncpg's errors for these reach SQLAlchemy as plain DBAPIErrors.
UNAVAILABLE_SQLSTATES = ("08", "53", "57P01", "57P02", "57P03", READ_ONLY_SQLSTATE)
# SQLite's result codes for "not now": busy or locked past busy_timeout, the file cannot be
# opened, an I/O error. A plain SQLITE_ERROR (such as "no such table") is not one of them.
UNAVAILABLE_SQLITE_ERRORS = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_PROTOCOL")
SQLITE_PRAGMAS = ("journal_mode=WAL", "busy_timeout=5000", "foreign_keys=ON", "synchronous=NORMAL")


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
    return parsed.set(drivername=DRIVERS.get(parsed.drivername, parsed.drivername))


def is_postgresql(settings: Settings) -> bool:
    return async_url(settings.database_url).get_backend_name() == "postgresql"


def reads_in_autocommit(settings: Settings) -> bool:
    """On PostgreSQL a reading request runs in autocommit: under READ COMMITTED every statement has
    its own snapshot anyway, so it loses nothing, and it saves the BEGIN and COMMIT round trips. Not
    behind PgBouncer in transaction mode: there asyncpg's prepare and execute must stay inside one
    transaction, or they may reach two different servers."""
    return is_postgresql(settings) and not settings.pgbouncer


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
        engine = create_async_engine(url, connect_args=asyncpg_connect_args(settings), **kwargs)
        event.listen(engine.sync_engine, "handle_error", _read_only_is_a_disconnect)
    else:
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "connect", _configure_sqlite_connection)
        event.listen(engine.sync_engine, "begin", _begin_sqlite_transaction)
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
        # replaced by the next Parse), so none is left behind for another client to meet.
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


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy emit BEGIN itself, so SAVEPOINT and transactional DDL work (see SQLAlchemy's
    # "Transactions with SQLite and the sqlite3 driver").
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in SQLITE_PRAGMAS:
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _begin_sqlite_transaction(connection: Any) -> None:
    # IMMEDIATE takes the write lock up front (waiting up to busy_timeout for it). A DEFERRED
    # transaction that reads and then writes fails at once, without waiting, when another writer
    # committed after its read began: WAL cannot upgrade a stale snapshot.
    connection.exec_driver_sql(f"BEGIN {connection.get_execution_options().get('sqlite_begin', 'DEFERRED')}")


def is_unavailable(exc: BaseException) -> bool:
    """True for the errors that mean "the database cannot be reached right now" (a 503).

    Not for a permanent fault such as a missing table: retrying that would not help.
    """
    if isinstance(exc, PoolTimeoutError | OSError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    # ...or no host takes writes yet (target_session_attrs=read-write, mid-failover), or asyncpg's
    # protocol lost its state on a connection the server ended as it was being set up.
    if exc.connection_invalidated or isinstance(
        getattr(exc.orig, "__cause__", None), TargetServerAttributeNotMatched | InternalClientError
    ):
        return True
    sqlite_error = getattr(exc.orig, "sqlite_errorname", None)
    if sqlite_error is not None:
        return str(sqlite_error).startswith(UNAVAILABLE_SQLITE_ERRORS)
    sqlstate = str(getattr(exc.orig, "sqlstate", "") or "")
    return isinstance(exc, OperationalError | InterfaceError) or sqlstate.startswith(UNAVAILABLE_SQLSTATES)
