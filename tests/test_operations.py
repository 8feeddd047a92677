"""Operations: request ids on every answer, one structured log line per request, the drain on
SIGTERM, and the docs page in a real browser."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager

from app import create_app
from chaos import ServiceProcess, sign_up_many
from conftest import PROJECT_DIR, DirectDatabase, signup_body
from settings import Settings

pytestmark = pytest.mark.anyio
# --- request ids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "kept"),
    [("abc-123", True), ("A.b_C-9" * 18, True), ("x" * 129, False), ("has space", False), ("", False), (None, False)],
)
async def test_a_good_request_id_is_kept_and_any_other_replaced(
    client: httpx.AsyncClient, given: str | None, kept: bool
) -> None:
    headers = {} if given is None else {"X-Request-ID": given}
    answered = (await client.get("/api/users/nobody", headers=headers)).headers["x-request-id"]
    if kept:
        assert answered == given
    else:
        assert len(answered) == 32
        assert int(answered, 16) >= 0


async def test_every_answer_carries_a_request_id_500_and_503_included(unmigrated_url: str) -> None:
    async with LifespanManager(create_app(Settings(database_url=unmigrated_url))) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            failed = await client.get("/api/users/alice", headers={"X-Request-ID": "the-500"})
            not_ready = await client.get("/readyz", headers={"X-Request-ID": "the-503"})
    assert (failed.status_code, failed.headers["x-request-id"]) == (500, "the-500")
    assert (not_ready.status_code, not_ready.headers["x-request-id"]) == (503, "the-503")


# --- request logs ----------------------------------------------------------------------------


def json_lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


async def test_one_json_line_per_request_with_its_fields(database_url: str, tmp_path: Path) -> None:
    service = ServiceProcess(database_url, tmp_path / "service.log", LOG_FORMAT="json")
    try:
        async with httpx.AsyncClient(base_url=service.url) as client:
            await client.get("/api/users/nobody", headers={"X-Request-ID": "look-1"})
            await client.post("/api/users/signup", json=signup_body("alice"), headers={"X-Request-ID": "make-1"})
    finally:
        service.stop()
    lines = json_lines(service.log())
    assert len(lines) == len(service.log().splitlines())  # every line is JSON, uvicorn's own included
    requests = {line["request_id"]: line for line in lines if line["logger"] == "users.access"}
    assert {"look-1", "make-1"} <= set(requests)
    assert all(len(rid) == 32 for rid in set(requests) - {"look-1", "make-1"})  # the start-up polls of /healthz
    lookup = requests["look-1"]
    assert {key: lookup[key] for key in ("level", "method", "route", "path", "status", "client")} == {
        "level": "INFO",
        "method": "GET",
        "route": "/api/users/{username}",
        "path": "/api/users/nobody",
        "status": 404,
        "client": "127.0.0.1",
    }
    assert 0 < lookup["duration_ms"] < 10_000
    assert requests["make-1"]["status"] == 201


async def test_warnings_and_errors_during_a_request_carry_its_id(tmp_path: Path) -> None:
    # No schema: a 500 whose traceback uvicorn logs. No server: a 503 the service warns about.
    unmigrated = ServiceProcess(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}", tmp_path / "a.log", LOG_FORMAT="json")
    unreachable = ServiceProcess("postgresql://postgres@127.0.0.1:1/users", tmp_path / "b.log", LOG_FORMAT="json")
    try:
        async with httpx.AsyncClient() as client:
            await client.get(f"{unmigrated.url}/api/users/alice", headers={"X-Request-ID": "boom-1"})
            await client.get(f"{unreachable.url}/api/users/alice", headers={"X-Request-ID": "down-1"})
    finally:
        unmigrated.stop()
        unreachable.stop()
    traceback = [line for line in json_lines(unmigrated.log()) if "Exception in ASGI application" in line["message"]]
    assert len(traceback) == 1
    assert traceback[0]["request_id"] == "boom-1"
    assert traceback[0]["level"] == "ERROR"
    assert "exc_info" in traceback[0]
    warned = [line for line in json_lines(unreachable.log()) if line["message"].startswith("database unavailable")]
    assert warned
    assert warned[0]["request_id"] == "down-1"
    assert warned[0]["level"] == "WARNING"


async def test_the_text_format_says_the_same(database_url: str, tmp_path: Path) -> None:
    service = ServiceProcess(database_url, tmp_path / "service.log", LOG_FORMAT="text")
    try:
        async with httpx.AsyncClient(base_url=service.url) as client:
            await client.get("/api/users/nobody", headers={"X-Request-ID": "look-1"})
    finally:
        service.stop()
    line = next(line for line in service.log().splitlines() if "request_id=look-1" in line)
    assert " INFO [users.access] GET /api/users/nobody 404 " in line
    assert "route=/api/users/{username} client=127.0.0.1" in line
    assert "Started server process" in service.log()


async def test_no_field_can_start_a_forged_line_in_the_text_format(database_url: str, tmp_path: Path) -> None:
    service = ServiceProcess(database_url, tmp_path / "service.log", LOG_FORMAT="text")
    forged = "%0a2026-12-07 21:00:00,000 ERROR [users] forged%0d%1b[31m%e2%80%a8"
    try:
        async with httpx.AsyncClient(base_url=service.url) as client:
            assert (await client.get(f"/api/users/x{forged}", headers={"X-Request-ID": "forge-1"})).status_code == 404
            # uvicorn's own lines go through the same formatter
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
            writer.write(b"GET /\x00\n\r\n\r\n")
            await reader.read()
            writer.close()
    finally:
        service.stop()
    lines = service.log().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \[", line) for line in lines), lines
    line = next(line for line in lines if "request_id=forge-1" in line)
    assert "GET /api/users/x\\x0a2026-12-07 21:00:00,000 ERROR [users] forged\\x0d\\x1b[31m\\u2028 404" in line


# --- the drain ------------------------------------------------------------------------------------


async def test_after_sigterm_readyz_says_the_service_is_shutting_down(settings: Settings) -> None:
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # stands in for uvicorn's own handler
    try:
        async with LifespanManager(create_app(settings)) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                assert (await client.get("/readyz")).status_code == 200
                os.kill(os.getpid(), signal.SIGTERM)
                await anyio.sleep(0.01)
                draining = await client.get("/readyz")
                assert (await client.get("/healthz")).status_code == 200  # alive, not ready
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert draining.status_code == 503
    assert draining.json() == {"detail": "The service is shutting down."}


async def test_sigterm_under_a_signup_load_finishes_and_commits_what_it_started(
    database_url: str, db: DirectDatabase, tmp_path: Path
) -> None:
    service = ServiceProcess(database_url, tmp_path / "service.log", LOG_FORMAT="json")
    names = [f"drain{i:04d}" for i in range(400)]
    try:
        load = asyncio.ensure_future(sign_up_many(service.url, names, concurrency=24, patience=30))
        await asyncio.sleep(1.0)  # signups under way
        service.process.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()
        outcomes = await load
        await anyio.to_thread.run_sync(service.process.wait, 30)
        exited_after = time.monotonic() - sent_at
    finally:
        service.stop()

    existing = set(await db.usernames())
    answered = [o for o in outcomes if o.status is not None]
    unanswered = [o for o in outcomes if o.status is None]
    assert [o for o in answered if o.status == 201 and o.username not in existing] == []  # no 2xx lost
    assert [o for o in answered if o.status != 201] == []  # what it took on, it finished
    # Nothing read by the service was cut without an answer: none of the signups that got no
    # answer was written, and every request the service logged was answered.
    assert [o.username for o in unanswered if o.username in existing] == []
    assert [line for line in json_lines(service.log()) if line.get("status") == 0] == []
    assert exited_after < 20
    print(
        f"drain: {len(answered)} signups answered 201 and committed, {len(unanswered)} refused once it stopped "
        f"accepting (none written), exit {exited_after:.1f} s after SIGTERM"
    )


# --- the docs page, in a real browser ----------------------------------------------------------


@pytest.mark.e2e
def test_the_docs_page_renders_every_operation_and_try_it_out_works(service_url: str, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "scripts/test installs Debian's chromium"
    screenshot = tmp_path / "docs.png"  # kept out of git: in pytest's temporary directory
    result = subprocess.run(
        ["node", "docs-page.mjs", service_url, str(screenshot)],
        cwd=PROJECT_DIR / "tests" / "tools",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    document = httpx.get(f"{service_url}/openapi.json").json()
    documented = [
        f"operations-{op['tags'][0]}-{op['operationId']}" for ops in document["paths"].values() for op in ops.values()
    ]
    assert sorted(found["rendered"]) == sorted(documented)
    assert found["tried"] == {"probes-healthz": "200", "profiles-getUser": "404"}  # "Try it out", against this origin
    assert found["elsewhere"] == []  # no CDN: every request the page made went to the service
    assert screenshot.stat().st_size > 10_000
    assets = httpx.get(f"{service_url}/docs/assets/swagger-ui-bundle.js")
    assert assets.status_code == 200
    assert b"SwaggerUIBundle" in assets.content
