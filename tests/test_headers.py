"""Request heads are bounded (431 before megabytes are buffered), and every answer carries the
headers a security review expects, through a real uvicorn run as scripts/serve runs it."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import pytest

from chaos import ServiceProcess
from clusters import StartService
from conftest import signup_body

pytestmark = pytest.mark.anyio


@pytest.fixture
def service(database_url: str, start_service: StartService) -> ServiceProcess:
    return start_service(database_url)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def raw_request(port: int, head: bytes, *, chunk: int | None = None) -> tuple[bytes, int]:
    """Send a request head (all at once, or `chunk` bytes at a time until the server answers);
    the server's answer and how many bytes of the head were sent by then."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0

    async def send() -> None:
        nonlocal sent
        step = chunk or len(head)
        with contextlib.suppress(ConnectionError):
            while sent < len(head):
                writer.write(head[sent : sent + step])
                await writer.drain()
                sent += step

    sending = asyncio.create_task(send())
    try:
        # Read the answer by its length: a server that stops reading a client that goes on writing
        # ends with a reset, after its answer.
        head_of_answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=20)
        length = int(head_of_answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answer = head_of_answer + await reader.readexactly(length)
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        writer.transport.abort()  # drop what is still buffered to send
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return answer, sent


def head_with(header_value_bytes: int) -> bytes:
    return b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * header_value_bytes + b"\r\n\r\n"


async def test_a_head_over_16_kib_that_arrives_at_once_is_431(service: ServiceProcess) -> None:
    answer, _ = await raw_request(service.port, head_with(64 * 1024))
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert answer.endswith(b'{"detail":"Request headers are larger than 16384 bytes."}')

    fits, _ = await raw_request(service.port, head_with(15 * 1024))
    assert fits.startswith(b"HTTP/1.1 200 "), fits[:200]


async def test_a_head_that_keeps_coming_is_refused_before_it_is_buffered(service: ServiceProcess) -> None:
    before = rss_kib(service.process.pid)
    # 32 MiB of one header, 64 KiB at a time: the server must answer long before the end.
    head = head_with(32 * 1024 * 1024)
    answer, sent = await raw_request(service.port, head, chunk=64 * 1024)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert sent < len(head)  # answered early; what was sent by then, the kernel's socket buffers mostly took
    grown = rss_kib(service.process.pid) - before
    print(f"head limit: a 32 MiB header was answered after {sent // 1024} KiB sent; RSS grew {grown} KiB")
    assert grown < 8 * 1024
    async with httpx.AsyncClient(base_url=service.url) as client:
        assert (await client.get("/healthz")).status_code == 200  # and the service is fine


async def test_every_answer_says_nosniff_and_no_server_banner(service: ServiceProcess) -> None:
    async with httpx.AsyncClient(base_url=service.url) as client:
        answers = [
            await client.get("/healthz"),
            await client.get("/api/users/nobody"),
            await client.delete("/api/users/signup"),  # 405
            await client.post("/api/users/signup", content=b"{"),  # 415
            await client.post("/api/users/signup", json={}),  # 400
            await client.get("/api/users/me"),  # 401
        ]
    for response in answers:
        assert response.headers["x-content-type-options"] == "nosniff", response.status_code
        assert "server" not in response.headers, response.status_code


async def test_the_500_page_says_nosniff_too(unmigrated_url: str, start_service: StartService) -> None:
    async with httpx.AsyncClient(base_url=start_service(unmigrated_url).url) as client:
        response = await client.get("/api/users/alice")  # no schema: a 500
    assert response.status_code == 500
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_answers_with_tokens_or_private_data_are_not_stored(service: ServiceProcess) -> None:
    async with httpx.AsyncClient(base_url=service.url) as client:
        signup = await client.post("/api/users/signup", json=signup_body("alice"))
        signin = await client.post("/api/users/signin", json={"username": "alice", "password": "Kiwi-Tango-Mango-57"})
        tokens = signin.json()
        access = {"Authorization": f"Bearer {tokens['access_token']}"}
        private = [
            signup,
            signin,
            await client.get("/api/users/me", headers=access),
            await client.patch("/api/users/me", json={"address": "Seoul"}, headers=access),
            await client.post("/api/users/refresh", headers={"Authorization": f"Bearer {tokens['refresh_token']}"}),
        ]
        public = [await client.get("/api/users/alice"), await client.get("/api/users")]
    for response in private:
        assert response.is_success, response.text
        assert response.headers["cache-control"] == "no-store", response.url
    for response in public:
        assert "cache-control" not in response.headers, response.url
