"""Password hashing: Argon2id with the service's parameters (OWASP's baseline unless configured
otherwise), off the event loop, about one hash per CPU at a time, of the password's NFKC form
(password_rules.normalized)."""

from __future__ import annotations

import os
import uuid

import anyio
import anyio.to_thread
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from password_rules import normalized

# OWASP's Argon2id baseline: 19 MiB, 2 passes, 1 lane. argon2-cffi's default takes 64 MiB a hash.
MEMORY_KIB, TIME_COST = 19 * 1024, 2


def argon2id(memory_kib: int = MEMORY_KIB, time_cost: int = TIME_COST) -> PasswordHasher:
    return PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1)


class Hashing:
    """The process's hashing: one per process (the lifespan makes it)."""

    def __init__(self, hasher: PasswordHasher) -> None:
        self.hasher = hasher
        # About one hash per CPU at a time, so that memory stays bounded under a signup burst.
        self.limiter = anyio.CapacityLimiter(os.cpu_count() or 1)
        self.dummy = hasher.hash(uuid.uuid4().hex)  # what an unknown user's signin is checked against

    async def hash(self, password: str) -> str:
        return await anyio.to_thread.run_sync(self.hasher.hash, normalized(password), limiter=self.limiter)

    async def verify(self, password_hash: str | None, password: str) -> tuple[bool, bool]:
        """Whether `password` is the one `password_hash` was made from, and whether that hash must
        be made again (in today's form or with today's parameters) now that the password is known."""
        matches, as_typed = await anyio.to_thread.run_sync(self._verify, password_hash, password, limiter=self.limiter)
        return matches, matches and (as_typed or self.hasher.check_needs_rehash(password_hash or ""))

    def _matches(self, password_hash: str, password: str) -> bool:
        try:
            return self.hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    def _verify(self, password_hash: str | None, password: str) -> tuple[bool, bool]:
        """(whether it matches, whether it matched as typed rather than in its NFKC form)."""
        # Without a user, check against a dummy hash anyway, so both failures take as long.
        known, checked = password_hash is not None, password_hash or self.dummy
        if self._matches(checked, normalized(password)):
            return known, False
        # Hashes made before passwords were normalized hold the form that was typed: where that
        # differs, it is checked too (for a user and for the dummy alike).
        if normalized(password) != password and self._matches(checked, password):
            return known, known
        return False, False
