"""The deployment files say what the README says they do (the image itself: scripts/test-container)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import uvicorn
import yaml
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from chaos import SERVE_FLAGS
from conftest import PROJECT_DIR
from limits import BoundedHttpToolsProtocol


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
    """scripts/serve, the image and the tests' uvicorn get the same flags (the head limit, no banner)."""
    for script in ("scripts/serve", "scripts/container-start"):
        text = (PROJECT_DIR / script).read_text()
        assert " ".join(SERVE_FLAGS) in text.replace("\\\n    ", ""), script
        assert '--timeout-graceful-shutdown "${GRACEFUL_TIMEOUT:-20}"' in text, script


@pytest.mark.anyio
@pytest.mark.parametrize(("protocol", "nodelay"), [(HttpToolsProtocol, 0), (BoundedHttpToolsProtocol, 1)])
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
    finally:
        server.close()
