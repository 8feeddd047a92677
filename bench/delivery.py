"""Mail delivery, measured: the delay from a request's commit (its answer) to the SMTP server, and
the delivery loop's throughput, one uvicorn worker against aiosmtpd on loopback.

    .venv/bin/python bench/delivery.py DATABASE_URL    (bench/run.py prints the same lines in its results)
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "tests"))

from chaos import ServiceProcess  # noqa: E402
from smtp import SmtpServer  # noqa: E402

SETTINGS = {"PASSWORD_RESET_LIMIT": "1000000", "PASSWORD_RESET_ADDRESS_LIMIT": "0", "REQUEST_LOG": "false"}


class Clock(SmtpServer):
    """The SMTP server, noting when each message arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: list[float] = []

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.arrived.append(time.perf_counter())
        return await super().handle_DATA(server, session, envelope)  # type: ignore[arg-type]


async def delays(url: str, smtp: Clock, count: int) -> list[float]:
    """One reset at a time, as a user would ask: from its 202 (sent after the commit) to the SMTP server."""
    found = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for _ in range(count):
            before = len(smtp.arrived)
            response = await client.post("/api/users/password-reset", json={"email": "bench@example.com"})
            answered = time.perf_counter()
            assert response.status_code == 202, response.text
            await asyncio.to_thread(smtp.wait_for, before + 1)
            found.append(smtp.arrived[before] - answered)
    return found


async def queue(url: str, count: int) -> None:
    gate = asyncio.Semaphore(32)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=32)) as client:

        async def ask() -> None:
            async with gate:
                await client.post("/api/users/password-reset", json={"email": "bench@example.com"})

        await asyncio.gather(*(ask() for _ in range(count)))


def throughput(database_url: str, smtp: Clock, count: int, log: Path) -> float:
    """The loop alone: `count` messages queued by a process that does not deliver (MAIL_DELIVERY=false),
    then sent by one that does; messages per second at the SMTP server, from the first to the last."""
    queuer = ServiceProcess(database_url, log.with_name("queuer.log"), MAIL_DELIVERY="false", **SETTINGS)
    try:
        asyncio.run(queue(queuer.url, count))
    finally:
        queuer.stop()
    before = len(smtp.arrived)
    sender = ServiceProcess(database_url, log.with_name("sender.log"), MAIL_URL=smtp.url, **SETTINGS)
    try:
        smtp.wait_for(before + count, 300)
    finally:
        sender.stop()
    times = smtp.arrived[before:]
    return (len(times) - 1) / (times[-1] - times[0])


def figures(database_url: str, smoke: bool = False) -> list[str]:
    smtp = Clock().start()
    log = Path(tempfile.mkdtemp()) / "mail-bench.log"
    service = ServiceProcess(database_url, log, MAIL_URL=smtp.url, **SETTINGS)
    try:
        signup = {"username": "bench", "password": "Kiwi-Tango-Mango-57", "email": "bench@example.com"}
        httpx.post(f"{service.url}/api/users/signup", json=signup)
        smtp.wait_for(1)
        measured = asyncio.run(delays(service.url, smtp, 20 if smoke else 300))
    finally:
        service.stop()
    try:
        rate = throughput(database_url, smtp, 100 if smoke else 2000, log)
    finally:
        smtp.stop()
    p50, p99 = statistics.median(measured) * 1000, statistics.quantiles(measured, n=100)[98] * 1000
    return [
        "| delivery, one worker, SMTP on loopback | figure |",
        "|---|---|",
        f"| delay from the answer (after the commit) to the SMTP server, {len(measured)} resets one at a time: "
        f"p50 / p99 | {p50:.1f} / {p99:.1f} ms |",
        f"| throughput of one process's loop, {100 if smoke else 2000} messages waiting | {rate:,.0f} messages/s |",
    ]


if __name__ == "__main__":
    print("\n".join(figures(sys.argv[1])))
