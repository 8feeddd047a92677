"""The connection pool's queue: first come, first served (make_engine's poolclass)."""

from __future__ import annotations

import asyncio
from collections import deque

from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry
from sqlalchemy.util.concurrency import await_
from sqlalchemy.util.queue import Empty, Full, QueueCommon


class FairQueue(QueueCommon[ConnectionPoolEntry]):
    """The pool's queue of idle connections, first come first served.

    SQLAlchemy's AsyncAdaptedQueue is an asyncio.Queue: a connection put back goes to the queue,
    the first waiter is only woken, and a request that arrives before it runs takes the connection;
    the waiter queues again at the back, so under load some requests can wait until the pool
    timeout while others pass them. Here a connection put back goes straight to the longest
    waiter, and nobody passes a waiter.

    SQLAlchemy has no public way to choose a pool's queue: this uses its internals (the pool's
    `_queue_class`, sqlalchemy.util's queue and await_), with SQLAlchemy pinned, and a test
    (tests/test_schema.py) that fails with a clear message the day an upgrade moves them.
    """

    def __init__(self, maxsize: int = 0, use_lifo: bool = False):
        self.maxsize = maxsize
        self.use_lifo = use_lifo
        self._idle: deque[ConnectionPoolEntry] = deque()
        self._waiters: deque[asyncio.Future[ConnectionPoolEntry]] = deque()

    def empty(self) -> bool:
        return not self._idle

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._idle)

    def qsize(self) -> int:
        return len(self._idle)

    def put_nowait(self, item: ConnectionPoolEntry) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(item)
                return
        if self.full():
            raise Full()
        self._idle.append(item)

    def put(self, item: ConnectionPoolEntry, block: bool = True, timeout: float | None = None) -> None:
        self.put_nowait(item)  # the pool never blocks to put back: a full pool closes the connection

    def get_nowait(self) -> ConnectionPoolEntry:
        if not self._idle or self._waiters:
            raise Empty()
        return self._idle.pop() if self.use_lifo else self._idle.popleft()

    def get(self, block: bool = True, timeout: float | None = None) -> ConnectionPoolEntry:
        if self._idle and not self._waiters:
            return self.get_nowait()
        if not block:
            raise Empty()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return await_(self._wait(waiter, timeout))

    async def _wait(self, waiter: asyncio.Future[ConnectionPoolEntry], seconds: float | None) -> ConnectionPoolEntry:
        try:
            async with asyncio.timeout(seconds):
                return await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                self.put_nowait(waiter.result())  # handed over as the wait ended: pass it on
            else:
                waiter.cancel()
            if isinstance(error, TimeoutError):
                raise Empty() from error
            raise


class FairPool(AsyncAdaptedQueuePool):
    """SQLAlchemy's asyncio pool with the FairQueue."""

    _queue_class = FairQueue
