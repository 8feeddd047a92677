"""End to end: the service as a real uvicorn process on 127.0.0.1, over real HTTP."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from chaos import ServiceProcess, free_port
from conftest import PROJECT_DIR, DirectDatabase, signup_body
from migrate import upgrade_schema

pytestmark = pytest.mark.e2e


@pytest.mark.anyio
async def test_signup_then_lookup_over_real_http(service_url: str, db: DirectDatabase) -> None:
    async with httpx.AsyncClient(base_url=service_url) as client:
        created = await client.post("/api/users/signup", json=signup_body("alice"))
        assert created.status_code == 201
        # Read-after-write on a new request: the 201 was sent after the commit.
        found = await client.get("/api/users/alice")
        assert found.status_code == 200
        assert found.json()["id"] == created.json()["id"]
        assert (await client.post("/api/users/signup", json=signup_body("alice"))).status_code == 409
        assert (await client.get("/api/users")).json()["items"][0]["username"] == "alice"
        assert (await client.get("/readyz")).status_code == 200
    assert await db.usernames() == ["alice"]


def test_curl_style_requests(service_url: str) -> None:
    # What the README's curl examples send: no client library, just the bytes.
    response = httpx.post(
        f"{service_url}/api/users/signup",
        content=b'{"username": "bob", "password": "Kiwi-Tango-Mango-57", "email": "bob@example.com"}',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 201
    assert httpx.get(f"{service_url}/api/users/bob").json()["username"] == "bob"
    assert httpx.get(f"{service_url}/api/users?limit=1").json()["next"] is None


def test_sigterm_stops_the_service_cleanly(database_url: str) -> None:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "app:create_app", "--factory", "--port", str(port)]
    env = {**os.environ, "DATABASE_URL": database_url}
    process = subprocess.Popen(command, cwd=PROJECT_DIR, env=env, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(500):
            try:
                httpx.get(f"http://127.0.0.1:{port}/readyz")
                break
            except httpx.TransportError:
                time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status reports it.
    assert process.returncode == -signal.SIGTERM
    assert "Application shutdown complete." in stderr
    assert "Traceback" not in stderr


def test_the_readme_curl_walkthrough_works_verbatim(tmp_path: Path) -> None:
    readme = (PROJECT_DIR / "README.md").read_text()
    walkthrough = readme.split("## Try it with curl", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    expected = re.findall(r"^# (\d{3})\b", walkthrough, flags=re.MULTILINE)
    assert shutil.which("curl"), "curl is needed to run the README's curl examples (apt-get install curl)"
    # As scripts/serve runs it, its log where the walkthrough says (mail goes there: MAIL_URL=log:).
    database = f"sqlite+aiosqlite:///{tmp_path / 'users.db'}"
    upgrade_schema(database)  # scripts/serve migrates first
    service = ServiceProcess(database, tmp_path / "users.log")
    try:
        script = walkthrough.replace("http://127.0.0.1:8000", service.url)
        result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    finally:
        service.stop()

    statuses = re.findall(r"HTTP/1\.1 (\d{3}) ", result.stdout)  # bodies end without a newline
    assert statuses == expected, result.stdout + result.stderr
    assert len(expected) == 14


def test_a_failed_statement_logs_no_bound_parameter(tmp_path: Path) -> None:
    # No schema: the signup's INSERT fails, and uvicorn logs the error with its traceback.
    service = ServiceProcess(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}", tmp_path / "service.log")
    try:
        body = signup_body("alice", email="secret.address@example.com")
        assert httpx.post(f"{service.url}/api/users/signup", json=body).status_code == 500
    finally:
        service.stop()
    log = service.log()
    assert "INSERT INTO users" in log  # the statement is there, so the error was logged
    assert "SQL parameters hidden due to hide_parameters=True" in log
    assert "secret.address" not in log
    assert "$argon2id$" not in log
