"""Two uvicorn workers behind a real PgBouncer in transaction mode: with DB_PGBOUNCER=true the
whole account flow and a burst of concurrent reads and writes work; without it the same setup
fails in the known way (asyncpg's prepared statements meet other clients' server connections)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator

import httpx
import pytest

from chaos import Cluster, Outcome, PgBouncer, sign_up
from clusters import StartService

pytestmark = [pytest.mark.pgbouncer, pytest.mark.anyio]


@pytest.fixture(scope="module")
def pgbouncer(cluster: Cluster) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of the module's cluster (migrations go to PostgreSQL
    directly, as the database fixture runs them)."""
    if not shutil.which("pgbouncer") and not os.path.exists("/usr/sbin/pgbouncer"):
        if os.environ.get("CI") == "true":
            pytest.fail("the PgBouncer test needs pgbouncer (scripts/test installs it as root)")
        pytest.skip("no pgbouncer")
    bouncer = PgBouncer(cluster.port)
    yield bouncer
    bouncer.stop()


async def burst(url: str, prefix: str) -> tuple[list[Outcome], list[int]]:
    """200 signups and 400 lookups at once, from 32 connections."""
    limits = httpx.Limits(max_connections=32)
    # At most 32 requests out at once: a request's timeout runs from when it is sent, not from
    # when it joined the client's queue for a connection.
    connections = asyncio.Semaphore(32)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def signup(i: int) -> Outcome:
            async with connections:
                return await sign_up(client, f"{prefix}{i:04d}")

        async def lookup(i: int) -> int:
            async with connections:
                try:
                    return (await client.get(f"/api/users/{prefix}{i % 50:04d}")).status_code
                except httpx.HTTPError:
                    return 0

        results = await asyncio.gather(*(signup(i) for i in range(200)), *(lookup(i) for i in range(400)))
    return [r for r in results if isinstance(r, Outcome)], [r for r in results if isinstance(r, int)]


async def test_two_workers_work_through_pgbouncer_with_the_flag(
    pgbouncer: PgBouncer, database: str, start_service: StartService
) -> None:
    service = start_service(pgbouncer.url(database), DB_PGBOUNCER="true", WEB_CONCURRENCY="2")
    async with httpx.AsyncClient(base_url=service.url) as client:
        body = {"username": "alice", "password": "Kiwi-Tango-Mango-57", "email": "alice@example.com"}
        assert (await client.post("/api/users/signup", json=body)).status_code == 201
        tokens = (
            await client.post("/api/users/signin", json={"username": "alice", "password": "Kiwi-Tango-Mango-57"})
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


async def test_without_the_flag_the_same_setup_fails_in_the_known_way(
    pgbouncer: PgBouncer, database: str, start_service: StartService
) -> None:
    service = start_service(pgbouncer.url(database), WEB_CONCURRENCY="2")

    signups, lookups = await burst(service.url, "no")

    failures = [o for o in signups if o.status != 201] + [s for s in lookups if s not in (200, 404)]
    assert failures, "expected failures without DB_PGBOUNCER=true"
    known = [line for line in service.log().splitlines() if "prepared statement" in line]
    assert known
    print(f"without DB_PGBOUNCER: {len(failures)} of 600 requests failed, for example: {known[0][:200]}")
