"""Breached passwords: a new password is looked up in a Pwned Passwords range API
(PWNED_PASSWORDS_URL), by k-anonymity: only the first 5 hex digits of its SHA-1 leave the process,
and the answer lists every suffix with that prefix."""

from __future__ import annotations

import hashlib
import logging

import httpx
from starlette.exceptions import HTTPException

from headers import RETRY_AFTER_SECONDS
from metrics import Metrics
from password_rules import normalized

logger = logging.getLogger("users")

TIMEOUT = 2.0  # seconds: a signup waits at most this for the range API
BREACHED = "appeared in a data breach (Pwned Passwords): choose another"


class BreachCheck:
    """The range API client, one per process (its connections are kept alive between checks)."""

    def __init__(self, url: str | None, fail_closed: bool, metrics: Metrics | None) -> None:
        self.url = url.rstrip("/") if url else None
        self.fail_closed = fail_closed
        self.metrics = metrics
        self.client = httpx.AsyncClient(timeout=TIMEOUT, headers={"Add-Padding": "true"}) if url else None

    async def breached(self, password: str) -> bool:
        """Whether the password appears in the breach corpus. When the range API does not answer:
        False (logged and counted), or with PWNED_PASSWORDS_FAIL_CLOSED a 503."""
        if self.client is None:
            return False
        digest = hashlib.sha1(normalized(password).encode(), usedforsecurity=False).hexdigest().upper()
        prefix, suffix = digest[:5], digest[5:]
        try:
            response = await self.client.get(f"{self.url}/range/{prefix}")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            then = "refusing the password" if self.fail_closed else "accepting the password unchecked"
            logger.warning("the breached-password check failed (%s); %s", type(exc).__name__, then)
            if self.metrics is not None:
                self.metrics.breach_check_failures.inc()
            if self.fail_closed:
                raise HTTPException(
                    503, "The breached-password check is unavailable; try again shortly.",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                ) from None  # fmt: skip
            return False
        for line in response.text.splitlines():
            found, _, count = line.strip().partition(":")
            if found.upper() == suffix and count.strip().isdigit() and int(count) > 0:  # padding lines count 0
                return True
        return False

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
