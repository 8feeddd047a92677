"""The deployment files say what the README says they do (the image itself: scripts/test-container)."""

from __future__ import annotations

import asyncio
import inspect
import socket
from typing import Any

import pytest
import uvicorn
import yaml
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

import server
from chaos import ServiceProcess
from conftest import PROJECT_DIR
from protocol import HttpProtocol
from settings import Settings


def test_compose_runs_the_service_beside_postgresql_with_health_checks_and_a_volume() -> None:
    compose: dict[str, Any] = yaml.safe_load((PROJECT_DIR / "compose.yaml").read_text())
    db, api = compose["services"]["db"], compose["services"]["api"]
    assert db["image"] == "postgres:15"
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert db["volumes"] == ["pgdata:/var/lib/postgresql/data"]
    assert "pgdata" in compose["volumes"]
    assert api["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert api["environment"]["DATABASE_URL"].startswith("postgresql://users:users@db:5432/")
    assert api["ports"] == ["127.0.0.1:8000:8000"]


def test_the_image_copies_every_module_the_app_imports() -> None:
    # Every top-level module is the app's, so the image takes them all (scripts/test-container
    # then proves that the image runs).
    dockerfile = (PROJECT_DIR / "Dockerfile").read_text()
    dockerignore = (PROJECT_DIR / ".dockerignore").read_text().split()
    assert "COPY alembic.ini *.py ./" in dockerfile
    assert {"!*.py", "!alembic.ini", "!migrations/", "!requirements.txt"} <= set(dockerignore)
    assert "USER 10001:10001" in dockerfile
    assert "HEALTHCHECK" in dockerfile


def test_the_service_is_served_the_same_way_everywhere() -> None:
    """scripts/serve, the image and the tests' processes all run server.py: one uvicorn command line."""
    assert "exec .venv/bin/python server.py" in (PROJECT_DIR / "scripts/serve").read_text()
    assert "exec python server.py" in (PROJECT_DIR / "scripts/container-start").read_text()
    assert '"server.py"' in inspect.getsource(ServiceProcess)
    command = server.command(Settings(host="0.0.0.0", port=9000, graceful_timeout=7), "--port", "9001")
    assert command[3:5] == ["app:create_app", "--factory"]
    assert "protocol:HttpProtocol" in command
    assert {"--no-server-header", "--no-access-log", "--no-proxy-headers"} <= set(command)  # none trusted by default
    behind = " ".join(server.command(Settings(forwarded_allow_ips="10.0.0.5")))
    assert "--proxy-headers --forwarded-allow-ips 10.0.0.5" in behind
    joined = " ".join(command)
    assert "--host 0.0.0.0 --port 9000 --timeout-graceful-shutdown 7" in joined
    assert joined.endswith("--port 9001")  # given later, it wins
    assert (
        server.command(Settings(), "background_app:create_app", "--app-dir", "tests")[3] == "background_app:create_app"
    )


@pytest.mark.anyio
@pytest.mark.parametrize(("protocol", "nodelay"), [(HttpToolsProtocol, 0), (HttpProtocol, 1)])
async def test_connections_accepted_on_a_handed_over_socket_send_without_delay(
    protocol: type[HttpToolsProtocol], nodelay: int
) -> None:
    # With several workers uvicorn binds the listening socket itself (protocol field 0) and each
    # worker serves it on asyncio, which then leaves Nagle's algorithm on: 40 ms a response. The
    # service's protocol turns it off; uvicorn's own shows the trap.
    async def app(scope: Any, receive: Any, send: Any) -> None: ...

    config = uvicorn.Config(app, loop="asyncio", lifespan="off")
    config.load()
    made: list[HttpToolsProtocol] = []

    def factory() -> HttpToolsProtocol:
        made.append(protocol(config=config, server_state=ServerState(), app_state={}))
        return made[-1]

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # as uvicorn's bind_socket makes it
    listener.bind(("127.0.0.1", 0))
    server = await asyncio.get_running_loop().create_server(factory, sock=listener)
    try:
        _, writer = await asyncio.open_connection(*listener.getsockname())
        while not made or made[0].transport is None:  # noqa: ASYNC110 (until the server accepted)
            await asyncio.sleep(0.01)
        accepted = made[0].transport.get_extra_info("socket")
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == nodelay
        writer.close()
        await writer.wait_closed()
    finally:
        for protocol_made in made:  # the accepted side: server.close() leaves it open
            protocol_made.transport.close()
        server.close()
        await server.wait_closed()
