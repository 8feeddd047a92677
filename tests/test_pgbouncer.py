"""Two uvicorn workers behind a real PgBouncer in transaction mode: with DB_PGBOUNCER=true the
whole account flow and a burst of concurrent reads and writes work; without it the same setup
fails in the known way (asyncpg's prepared statements meet other clients' server connections)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from chaos import Cluster, Outcome, PgBouncer, Service, postgres_bindir, sign_up
from conftest import in_thread
from db import upgrade_schema

pytestmark = [pytest.mark.pgbouncer, pytest.mark.anyio]


@pytest.fixture(scope="module")
def bouncer() -> Iterator[tuple[Cluster, PgBouncer]]:
    bindir = postgres_bindir()
    missing = "PostgreSQL server binaries" if bindir is None else "pgbouncer" if not shutil.which("pgbouncer") else ""
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the PgBouncer test needs {missing} (scripts/test installs them as root)")
        pytest.skip(f"no {missing}")
    assert bindir is not None
    cluster = Cluster(bindir)
    cluster.start()
    pgbouncer = PgBouncer(cluster.port)
    yield cluster, pgbouncer
    pgbouncer.stop()
    cluster.destroy()


@pytest.fixture
def start_service(bouncer: tuple[Cluster, PgBouncer], tmp_path: Path) -> Iterator[Callable[..., Service]]:
    cluster, pgbouncer = bouncer
    database = f"bouncer_{uuid.uuid4().hex[:8]}"
    in_thread(asyncio.run, cluster.sql(f"CREATE DATABASE {database}"))
    in_thread(upgrade_schema, cluster.url(database))  # migrations go to PostgreSQL directly
    services: list[Service] = []

    def start(**settings: str) -> Service:
        service = Service(pgbouncer.url(database), tmp_path / f"service{len(services)}.log", **settings)
        services.append(service)
        return service

    yield start
    for service in services:
        service.stop()
    with contextlib.suppress(Exception):
        in_thread(asyncio.run, cluster.sql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))


async def burst(url: str, prefix: str) -> tuple[list[Outcome], list[int]]:
    """200 signups and 400 lookups at once, from 32 connections."""
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        signups = [sign_up(client, f"{prefix}{i:04d}") for i in range(200)]

        async def lookup(i: int) -> int:
            try:
                return (await client.get(f"/api/users/{prefix}{i % 50:04d}")).status_code
            except httpx.HTTPError:
                return 0

        results = await asyncio.gather(*signups, *(lookup(i) for i in range(400)))
    return [r for r in results if isinstance(r, Outcome)], [r for r in results if isinstance(r, int)]


async def test_two_workers_work_through_pgbouncer_with_the_flag(start_service: Callable[..., Service]) -> None:
    service = start_service(DB_PGBOUNCER="true", WEB_CONCURRENCY="2")
    async with httpx.AsyncClient(base_url=service.url) as client:
        body = {"username": "alice", "password": "Kiwi-Tango-57", "email": "alice@example.com"}
        assert (await client.post("/api/users/signup", json=body)).status_code == 201
        tokens = (
            await client.post("/api/users/signin", json={"username": "alice", "password": "Kiwi-Tango-57"})
        ).json()
        me = await client.get("/api/users/me", headers={"Authorization": f"Bearer {tokens['access_token']}"})
        assert me.json()["username"] == "alice"
        refreshed = await client.post(
            "/api/users/refresh", headers={"Authorization": f"Bearer {tokens['refresh_token']}"}
        )
        assert refreshed.status_code == 200
        signout = await client.post(
            "/api/users/signout", headers={"Authorization": f"Bearer {refreshed.json()['refresh_token']}"}
        )
        assert signout.status_code == 204
        assert (await client.get("/readyz")).status_code == 200

    signups, lookups = await burst(service.url, "ok")

    assert {o.status for o in signups} == {201}
    assert set(lookups) <= {200, 404}
    assert service.log().count("Started server process") >= 2  # really two workers


async def test_without_the_flag_the_same_setup_fails_in_the_known_way(start_service: Callable[..., Service]) -> None:
    service = start_service(WEB_CONCURRENCY="2")

    signups, lookups = await burst(service.url, "no")

    failures = [o for o in signups if o.status != 201] + [s for s in lookups if s not in (200, 404)]
    assert failures, "expected failures without DB_PGBOUNCER=true"
    known = [line for line in service.log().splitlines() if "prepared statement" in line]
    assert known
    print(f"without DB_PGBOUNCER: {len(failures)} of 600 requests failed, for example: {known[0][:200]}")
