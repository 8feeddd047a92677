"""What runs once per process: the lifespan makes the engine, the Database and the Resources the
routes use, and undoes it at shutdown; SIGTERM starts the drain."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import FrameType
from typing import Any

import anyio
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from breaches import BreachCheck
from db import Database
from engine import make_engine, reads_in_autocommit
from logs import flush_logs, flush_logs_periodically
from mailer import Mailer
from metrics import Metrics
from migrate import SchemaRevisions
from password_rules import PasswordRules, blocklist
from passwords import Hashing, argon2id
from protocol import log_accept_failures_once_in_a_while
from resources import Resources
from settings import Settings
from tokens import Tokens

logger = logging.getLogger("users")

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[dict[str, Any]]]


def lifespan(settings: Settings, tokens: Tokens, metrics: Metrics | None) -> Lifespan:
    @asynccontextmanager
    async def run(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        # One engine (and pool) per process, made after the server starts, disposed at shutdown.
        autocommit = reads_in_autocommit(settings)
        engine = make_engine(settings, autocommit=autocommit)
        if metrics is not None:
            metrics.watch_pool(engine.sync_engine)
        database = Database.on(engine, autocommit_reads=autocommit, close_timeout=settings.command_timeout)
        rules = PasswordRules(settings.password_min_length, settings.service_name)
        hashing = Hashing(argon2id(settings.argon2_memory_kib, settings.argon2_time_cost))
        blocklist(rules.min_length)  # made now, not at the first signup
        breaches = BreachCheck(settings.pwned_passwords_url, settings.pwned_passwords_fail_closed, metrics)
        mailer = Mailer(database, settings, metrics)
        if mailer.transport.logs:
            logger.warning("MAIL_URL is log: mail is written to the log, not delivered (docs/mail.md)")
        log_accept_failures_once_in_a_while(asyncio.get_running_loop())
        # What start-up made (modules, models, compiled statements) lives as long as the process:
        # kept out of the collector's way, so that its collections stop walking all of it again.
        gc.collect()
        gc.freeze()
        try:
            async with running(flush_logs_periodically()), mailer.delivering():
                with draining_on_sigterm() as draining:
                    schema = SchemaRevisions.from_migrations()
                    made = Resources(settings, tokens, hashing, schema, metrics, draining, rules, breaches, mailer)
                    yield {"database": database, "resources": made}
        finally:
            await breaches.close()
            await dispose(engine, settings.command_timeout)
            if metrics is not None:
                metrics.process_ended()
        flush_logs()

    return run


@asynccontextmanager
async def running(*loops: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Background loops of the process that hold nothing (the log flusher), cancelled at shutdown."""
    tasks = [asyncio.create_task(loop) for loop in loops]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def dispose(engine: AsyncEngine, seconds: float) -> None:
    """Close the pool, bounded: a database that stopped answering must not keep the process from exiting."""
    with anyio.move_on_after(seconds) as bound:
        await engine.dispose()
    if bound.cancelled_caught:
        logger.warning("closing the pool took over %s s; exiting anyway", seconds)


@contextlib.contextmanager
def draining_on_sigterm() -> Iterator[threading.Event]:
    """An event set when SIGTERM arrives, before uvicorn's own handler (which stops accepting,
    lets the requests in flight finish, then ends the lifespan) is called as usual."""
    draining = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread
        yield draining
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        draining.set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield draining
    finally:
        signal.signal(signal.SIGTERM, previous)
