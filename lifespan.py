"""What runs once per process: the lifespan makes the engine, the Database and the Resources the
routes use, and undoes it at shutdown; SIGTERM starts the drain."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import FrameType
from typing import Any

import anyio
from starlette.applications import Starlette

from breaches import BreachCheck
from db import Database
from engine import make_engine, reads_in_autocommit
from logs import flush_logs, flush_logs_periodically
from metrics import Metrics
from migrate import SchemaRevisions
from password_rules import PasswordRules, blocklist
from passwords import hash_limiter
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
        breaches = BreachCheck(settings.pwned_passwords_url, settings.pwned_passwords_fail_closed, metrics)
        rules = PasswordRules(settings.password_min_length, settings.service_name)
        blocklist(rules.min_length)  # made now, not at the first signup
        flusher = asyncio.create_task(flush_logs_periodically())
        log_accept_failures_once_in_a_while(asyncio.get_running_loop())
        # What start-up made (modules, models, compiled statements) lives as long as the process:
        # kept out of the collector's way, so that its collections stop walking all of it again.
        gc.collect()
        gc.freeze()
        with draining_on_sigterm() as draining:
            try:
                yield {
                    "database": database,
                    "resources": Resources(
                        settings,
                        tokens,
                        hash_limiter(),
                        SchemaRevisions.from_migrations(),
                        metrics,
                        draining,
                        rules,
                        breaches,
                    ),
                }
            finally:
                # Bounded: a database that stopped answering must not keep the process from exiting.
                with anyio.move_on_after(settings.command_timeout) as bound:
                    await engine.dispose()
                if bound.cancelled_caught:
                    logger.warning("closing the pool took over %s s; exiting anyway", settings.command_timeout)
                await breaches.close()
                if metrics is not None:
                    metrics.process_ended()
                flusher.cancel()
                flush_logs()

    return run


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
