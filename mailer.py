"""The delivery loop, one per process (the lifespan runs it): it claims due messages from the outbox,
sends them (mail.py) holding no connection or transaction, and marks each sent, to be tried again
(backing off from 1 s, doubling, jittered, up to MAIL_RETRY_MAX_DELAY) or failed. It wakes at once
when its own process commits a message, and otherwise looks every MAIL_POLL_INTERVAL.

At least once: a message whose process died after claiming it is claimed again after
MAIL_CLAIM_LEASE, and one whose answer was lost after DATA is sent again, with the same Message-ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from db import Database, transaction
from engine import is_unavailable
from mail import Transport, build, deliver, permanent
from metrics import Metrics
from outbox import OutboxStore
from settings import Settings

logger = logging.getLogger("users.mail")

BATCH = 20  # messages a pass claims (and sends over one connection)
STOP_GRACE = 2.0  # seconds the pass in progress has to finish at shutdown
PURGE_SECONDS = 60.0  # how often the loop purges old messages


class Mailer:
    def __init__(self, database: Database, settings: Settings, metrics: Metrics | None) -> None:
        self.database = database
        self.settings = settings
        self.metrics = metrics
        self.transport = Transport.from_url(settings.mail_url)
        self.woken = asyncio.Event()
        self.stopping = False
        self.purged_at = 0.0

    def wake(self) -> None:
        """A message was committed in this process: look now (called after the commit, on the loop)."""
        self.woken.set()

    @asynccontextmanager
    async def delivering(self) -> AsyncIterator[None]:
        """The loop runs in the block. At its end the loop finishes the pass it is in (so that no
        connection is dropped mid-statement), within STOP_GRACE; then it is cancelled, and a
        message it was sending is sent again after MAIL_CLAIM_LEASE."""
        if not self.settings.mail_delivery:
            yield
            return
        task = asyncio.create_task(self.run())
        try:
            yield
        finally:
            self.stopping = True
            self.woken.set()
            try:
                async with asyncio.timeout(STOP_GRACE):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def run(self) -> None:
        while not self.stopping:
            self.woken.clear()
            try:
                busy = await self.deliver_due()
                await self.purge_now_and_then()
            except Exception as error:  # the database may be away: look again at the next poll
                if is_unavailable(error):
                    logger.warning("mail delivery waits for the database: %s", type(error).__name__)
                else:
                    logger.exception("the mail delivery loop failed; trying again")
                busy = False
            if not busy:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
                # comes as the event is set, and the lifespan's shutdown would wait for ever.
                with contextlib.suppress(TimeoutError):  # the poll: nothing woke it
                    async with asyncio.timeout(self.settings.mail_poll_interval):
                        await self.woken.wait()

    async def deliver_due(self) -> bool:
        """One pass: True if it claimed a whole batch (more may be due at once)."""
        now = datetime.now(UTC)
        async with transaction(self.database.reads) as session:  # the cheap look, which is all an idle loop does
            waiting, first_due = await OutboxStore(session).pending()
        if self.metrics is not None:
            self.metrics.mail_pending.set(waiting)
        if not waiting or first_due is None or first_due > now:
            return False
        lease = timedelta(seconds=self.settings.mail_claim_lease)
        async with transaction(self.database.writes) as session:
            claimed = await OutboxStore(session).claim(now, lease, BATCH)
        if claimed:
            await self.send(claimed)
        return len(claimed) == BATCH

    async def send(self, claimed: Any) -> None:
        sender = self.settings.mail_from
        messages = [build(m.message_id, sender, m.recipient, m.subject, m.body or "", m.created_at) for m in claimed]
        outcomes = await deliver(self.transport, messages)
        now = datetime.now(UTC)
        sent = [message for message, error in zip(claimed, outcomes, strict=True) if error is None]
        async with transaction(self.database.writes) as session:
            store = OutboxStore(session)
            if sent:
                await store.sent([message.id for message in sent], now)  # one statement for the batch
            for message in sent:
                self.count("sent")
                logger.info("mail sent: %s %s to %s", message.kind, message.message_id, message.recipient)
            for message, error in zip(claimed, outcomes, strict=True):
                if error is None:
                    continue
                if permanent(error) or message.attempts >= self.settings.mail_max_attempts:
                    await store.failed(message.id, describe(error))
                    self.count("failed")
                    logger.error("mail failed for good: %s %s: %s", message.kind, message.message_id, describe(error))
                else:
                    await store.retry(message.id, now + self.backoff(message.attempts), describe(error))
                    self.count("retried")
                    logger.warning("mail not sent, to be tried again: %s: %s", message.message_id, describe(error))

    def backoff(self, attempts: int) -> timedelta:
        """1 s after the first try, then doubling, each jittered (±50%), at most MAIL_RETRY_MAX_DELAY."""
        delay = min(self.settings.mail_retry_max_delay, 2.0 ** (attempts - 1))
        return timedelta(seconds=min(self.settings.mail_retry_max_delay, delay * random.uniform(0.5, 1.5)))

    async def purge_now_and_then(self) -> None:
        loop_time = asyncio.get_running_loop().time()
        if loop_time - self.purged_at < PURGE_SECONDS:
            return
        self.purged_at = loop_time
        async with transaction(self.database.writes) as session:
            await OutboxStore(session).purge(datetime.now(UTC), timedelta(seconds=self.settings.mail_retention))

    def count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.mail_messages.labels(outcome).inc()


def describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"
