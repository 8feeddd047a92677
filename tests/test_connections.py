"""Connections that would hold the service without sending a request: a head has HEAD_TIMEOUT to
arrive whole (from the connection's opening, or from the end of the previous answer), and running
out of file descriptors is logged once in a while, not once per failed accept. Raw sockets against
a real uvicorn, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import resource

import httpx
import pytest

from chaos import ServiceProcess
from clusters import StartService

pytestmark = pytest.mark.anyio

WAIT = 20  # seconds to wait for the service to close a connection: far past HEAD_TIMEOUT=1


async def closed(reader: asyncio.StreamReader) -> bytes:
    """What the service sent before it closed the connection (waits for the close)."""
    return await asyncio.wait_for(reader.read(), timeout=WAIT)


async def connect(service: ServiceProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", service.port)


async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """One byte every 0.3 s, until the service closes the connection."""
    with contextlib.suppress(ConnectionError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.3)


HEAD = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"x" * 100 + b"\r\n\r\n"


async def test_a_head_that_does_not_arrive_whole_in_time_closes_its_connection(
    database_url: str, start_service: StartService
) -> None:
    service = start_service(database_url, HEAD_TIMEOUT="1")
    silent = await connect(service)
    half = await connect(service)
    half[1].write(HEAD[:20])
    slow = await connect(service)
    dripping = asyncio.create_task(trickle(slow[1], HEAD))  # bytes keep coming: still too late
    answered = await connect(service)
    answered[1].write(HEAD)  # one whole request, then the next head never comes

    async with httpx.AsyncClient(base_url=service.url) as client:
        assert (await client.get("/healthz")).status_code == 200  # meanwhile, others are served

    assert await closed(silent[0]) == b""  # nothing came: nothing to say
    timeout = b'{"detail":"The request head did not arrive within 1 seconds."}'
    assert (await closed(half[0])).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    slow_answer = await closed(slow[0])
    assert slow_answer.startswith(b"HTTP/1.1 408 ")
    assert slow_answer.endswith(timeout)
    dripping.cancel()
    first = await closed(answered[0])
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert first.count(b"HTTP/1.1") == 1
    for _, writer in (silent, half, slow, answered):
        writer.close()


async def test_out_of_file_descriptors_is_logged_once_in_a_while_and_the_service_recovers(
    database_url: str, start_service: StartService
) -> None:
    service = start_service(database_url, HEAD_TIMEOUT="1")
    # A limit of 64 descriptors: 150 idle connections run the worker out of them.
    resource.prlimit(service.process.pid, resource.RLIMIT_NOFILE, (64, 64))
    idle = [await connect(service) for _ in range(150)]

    # The worker accepts what it can and fails the rest, then times the idle ones out and accepts
    # the next: this request waits its turn behind them.
    async with httpx.AsyncClient(base_url=service.url, timeout=WAIT) as client:
        assert (await client.get("/healthz")).status_code == 200
    for _, writer in idle:
        writer.close()
    service.stop()  # its log is written out
    log = service.log()
    reports = log.count("cannot accept connections")
    assert 1 <= reports <= 2, log[-3000:]  # one at first, one more every 10 s at most
    assert "socket.accept() out of system resource" not in log
    assert "Too many open files" in log  # the report says why
