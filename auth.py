"""Password hashing: Argon2id, off the event loop, with a cap on concurrent hashes."""

from __future__ import annotations

import os

import anyio
import anyio.to_thread
from argon2 import PasswordHasher

# OWASP's Argon2id baseline (19 MiB, 2 passes, 1 lane). argon2-cffi's default takes 64 MiB a hash.
hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


def hash_limiter() -> anyio.CapacityLimiter:
    """About one hash per CPU at a time, so memory stays bounded under a signup burst."""
    return anyio.CapacityLimiter(os.cpu_count() or 1)


async def hash_password(password: str, limiter: anyio.CapacityLimiter) -> str:
    return await anyio.to_thread.run_sync(hasher.hash, password, limiter=limiter)
