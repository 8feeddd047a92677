"""Password hashing: Argon2id, off the event loop, a bounded number at a time, of the password's
NFKC form (password_rules.normalized)."""

from __future__ import annotations

import functools
import os
import uuid

import anyio
import anyio.to_thread
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from password_rules import normalized

# OWASP's Argon2id baseline (19 MiB, 2 passes, 1 lane). argon2-cffi's default takes 64 MiB a hash.
hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


def hash_limiter() -> anyio.CapacityLimiter:
    """About one hash per CPU at a time, so memory stays bounded under a signup burst."""
    return anyio.CapacityLimiter(os.cpu_count() or 1)


async def hash_password(password: str, limiter: anyio.CapacityLimiter) -> str:
    return await anyio.to_thread.run_sync(hasher.hash, normalized(password), limiter=limiter)


@functools.cache
def _dummy_hash() -> str:
    return hasher.hash(uuid.uuid4().hex)


def _matches(password_hash: str, password: str) -> bool:
    try:
        return hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _verify(password_hash: str | None, password: str) -> tuple[bool, bool]:
    """(whether it matches, whether it matched as typed rather than in its NFKC form)."""
    # Without a user, check against a dummy hash anyway, so both failures take as long.
    known, checked = password_hash is not None, password_hash or _dummy_hash()
    if _matches(checked, normalized(password)):
        return known, False
    # Hashes made before passwords were normalized hold the form that was typed: where that
    # differs, it is checked too (for a user and for the dummy alike).
    if normalized(password) != password and _matches(checked, password):
        return known, known
    return False, False


async def verify_password(
    password_hash: str | None, password: str, limiter: anyio.CapacityLimiter
) -> tuple[bool, bool]:
    """Whether `password` is the one `password_hash` was made from, and whether that hash must be
    made again (in today's form or with today's parameters) now that the password is known."""
    matches, as_typed = await anyio.to_thread.run_sync(_verify, password_hash, password, limiter=limiter)
    return matches, matches and (as_typed or hasher.check_needs_rehash(password_hash or ""))
