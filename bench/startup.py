"""How long the service takes from nothing to its first 200, as other projects' tests use it.

    .venv/bin/python bench/startup.py [runs]

in-process: fresh SQLite file, migrations, create_app, lifespan, first GET /healthz (httpx ASGI).
subprocess: a uvicorn process on a migrated SQLite file, from spawn to the first 200 over TCP.
Prints the median and the spread of the runs.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
from asgi_lifespan import LifespanManager

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

from app import create_app  # noqa: E402
from migrate import upgrade_schema  # noqa: E402
from settings import Settings  # noqa: E402


async def in_process(directory: Path) -> tuple[float, float]:
    start = time.perf_counter()
    url = f"sqlite+aiosqlite:///{directory / 'users.db'}"
    await anyio.to_thread.run_sync(upgrade_schema, url)
    migrated = time.perf_counter()
    async with LifespanManager(create_app(Settings(database_url=url))) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://users") as client:
            assert (await client.get("/healthz")).status_code == 200
            done = time.perf_counter()
    return done - start, done - migrated


def subprocess_start(directory: Path) -> float:
    url = f"sqlite+aiosqlite:///{directory / 'users.db'}"
    upgrade_schema(url)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "app:create_app",
        "--factory",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=PROJECT_DIR, env={**os.environ, "DATABASE_URL": url})
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                time.sleep(0.005)
    finally:
        process.terminate()
        process.wait()


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    totals, after_migration, spawned = [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as directory:
            total, app_only = anyio.run(in_process, Path(directory))
            totals.append(total)
            after_migration.append(app_only)
        with tempfile.TemporaryDirectory() as directory:
            spawned.append(subprocess_start(Path(directory)))

    def show(name: str, values: list[float]) -> None:
        ms = sorted(v * 1000 for v in values)
        print(f"{name:<44} median {statistics.median(ms):7.1f} ms   (min {ms[0]:.1f}, max {ms[-1]:.1f}, n={runs})")

    show("in-process, incl. migrations", totals)
    show("in-process, app + lifespan + first request", after_migration)
    show("subprocess uvicorn, spawn to first 200", spawned)


if __name__ == "__main__":
    main()
