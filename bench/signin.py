"""Timing that must not tell who has an account: a signin for an unknown user must cost about what
a wrong password costs, and a password reset for an unknown address what one for an account's.

    .venv/bin/python bench/signin.py [rounds]

In-process (httpx ASGI transport) on a fresh SQLite file, throttles off, rounds alternating between
the cases; prints the median and p90 of each and their ratios to the first case of its group.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
from asgi_lifespan import LifespanManager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app import create_app
from migrate import upgrade_schema
from settings import Settings

SIGNINS = {
    "wrong password": {"username": "alice", "password": "Wrong123!"},
    "unknown user": {"username": "nobody", "password": "Wrong123!"},
    "right password": {"username": "alice", "password": "Kiwi-Tango-Mango-57"},
}
RESETS = {
    "reset, an account's address": {"email": "alice@example.com"},
    "reset, no account": {"email": "x@example.com"},
}
OFF = {
    "signin_failure_limit": 0, "signin_address_failure_limit": 0, "signin_account_failure_limit": 0,
    "password_reset_limit": 0, "password_reset_address_limit": 0,
}  # fmt: skip


async def timed(client: httpx.AsyncClient, path: str, cases: dict[str, Any], rounds: int) -> None:
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, body in cases.items():
            start = time.perf_counter()
            await client.post(path, json=body)
            timings[name].append((time.perf_counter() - start) * 1000)
    reference = statistics.median(next(iter(timings.values())))
    for name, values in timings.items():
        median = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1]
        print(f"{name:<28} median {median:6.2f} ms  p90 {p90:6.2f} ms  ratio {median / reference:.2f}  (n={rounds})")


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite+aiosqlite:///{Path(directory) / 'users.db'}"
        await anyio.to_thread.run_sync(upgrade_schema, url)
        settings = Settings(database_url=url, secret_key="bench-signin-secret-0123456789abcdef", **OFF)  # type: ignore[arg-type]
        async with LifespanManager(create_app(settings)) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://users") as client:
                signup = {"username": "alice", "password": "Kiwi-Tango-Mango-57", "email": "alice@example.com"}
                assert (await client.post("/api/users/signup", json=signup)).status_code == 201
                await timed(client, "/api/users/signin", SIGNINS, rounds)
                await timed(client, "/api/users/password-reset", RESETS, rounds * 5)


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 40)
