"""Password hashing: Argon2id, off the event loop, a bounded number at a time."""

from __future__ import annotations

import functools
import os
import uuid

import anyio
import anyio.to_thread
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# OWASP's Argon2id baseline (19 MiB, 2 passes, 1 lane). argon2-cffi's default takes 64 MiB a hash.
hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


def hash_limiter() -> anyio.CapacityLimiter:
    """About one hash per CPU at a time, so memory stays bounded under a signup burst."""
    return anyio.CapacityLimiter(os.cpu_count() or 1)


async def hash_password(password: str, limiter: anyio.CapacityLimiter) -> str:
    return await anyio.to_thread.run_sync(hasher.hash, password, limiter=limiter)


@functools.cache
def _dummy_hash() -> str:
    return hasher.hash(uuid.uuid4().hex)


def _verify(password_hash: str | None, password: str) -> bool:
    try:
        # Without a user, check against a dummy hash anyway, so both failures take as long.
        return hasher.verify(password_hash or _dummy_hash(), password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


async def verify_password(password_hash: str | None, password: str, limiter: anyio.CapacityLimiter) -> bool:
    return await anyio.to_thread.run_sync(_verify, password_hash, password, limiter=limiter)


def needs_rehash(password_hash: str) -> bool:
    """Made with other parameters than today's: hash it again at the next signin."""
    return hasher.check_needs_rehash(password_hash)
