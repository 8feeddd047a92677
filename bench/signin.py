"""Signin timing: an unknown user must cost about what a wrong password costs (no user enumeration).

    .venv/bin/python bench/signin.py [rounds]

In-process (httpx ASGI transport) on a fresh SQLite file, rounds alternating between the three
cases; prints the median and p90 of each and their ratios to the wrong-password case.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
from asgi_lifespan import LifespanManager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app import create_app
from migrate import upgrade_schema
from settings import Settings

CASES = {
    "wrong password": {"username": "alice", "password": "Wrong123!"},
    "unknown user": {"username": "nobody", "password": "Wrong123!"},
    "right password": {"username": "alice", "password": "Kiwi-Tango-Mango-57"},
}


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite+aiosqlite:///{Path(directory) / 'users.db'}"
        await anyio.to_thread.run_sync(upgrade_schema, url)
        app = create_app(Settings(database_url=url, secret_key="bench-signin-secret-0123456789abcdef"))
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://users") as client:
                signup = {"username": "alice", "password": "Kiwi-Tango-Mango-57", "email": "alice@example.com"}
                assert (await client.post("/api/users/signup", json=signup)).status_code == 201
                timings: dict[str, list[float]] = {name: [] for name in CASES}
                for _ in range(rounds):
                    for name, body in CASES.items():
                        start = time.perf_counter()
                        await client.post("/api/users/signin", json=body)
                        timings[name].append((time.perf_counter() - start) * 1000)
    reference = statistics.median(timings["wrong password"])
    for name, values in timings.items():
        median = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1]
        print(f"{name:<15} median {median:6.1f} ms  p90 {p90:6.1f} ms  ratio {median / reference:.2f}  (n={rounds})")


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 40)
