"""The promise across a PostgreSQL failover and across service replicas behind a load balancer, on
the real engines (tests/ha.py): etcd, two PostgreSQL 15 nodes run by Patroni in synchronous mode,
HAProxy. Under load the leader is killed hard (SIGKILL to Patroni and to PostgreSQL): no write that
got a 2xx is lost, no answer is a 500, and writes work again within seconds, with no restart.

Run alone with `scripts/test -m ha -s`; the figures are printed at the end of every run that
includes them (docs/high-availability.md quotes them).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from chaos import TIMEOUTS, Cluster, Outcome, Verdict, check_promise, keep_signing_up, postgres_bindir, sign_up
from clusters import StartService
from conftest import in_thread
from ha import FIGURES, HA_SUMMARY, HAProxy, PatroniCluster, missing_tools
from migrate import upgrade_schema

pytestmark = [pytest.mark.ha, pytest.mark.anyio]


@pytest.fixture
def patroni() -> Iterator[PatroniCluster]:
    bindir, missing = postgres_bindir(), missing_tools()
    if bindir is None or missing:
        needs = f"{' '.join(missing)} and PostgreSQL server binaries" if bindir is None else " ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(f"the failover suite needs {needs} (scripts/test installs them)")
        pytest.skip(f"the failover suite needs {needs}")
    cluster = PatroniCluster(bindir)
    yield cluster
    cluster.destroy()


async def keep_looking_up(url: str, username: str, stop: asyncio.Event, outcomes: list[Outcome]) -> None:
    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url) as client:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    response = await client.get(f"/api/users/{username}", timeout=20)
                except httpx.HTTPError:
                    outcomes.append(Outcome(username, None, time.monotonic() - start, started=start))
                    continue
                seconds, headers = time.monotonic() - start, dict(response.headers)
                outcomes.append(Outcome(username, response.status_code, seconds, headers=headers, started=start))

    await asyncio.gather(*(worker() for _ in range(4)))


async def commit_milliseconds(dsn: str, mode: str, connection: asyncpg.Connection) -> float:
    await connection.execute(f"SET synchronous_commit = {mode}")
    start = time.perf_counter()
    for _ in range(200):
        await connection.execute("INSERT INTO commit_probe VALUES (1)")  # one commit each (autocommit)
    return (time.perf_counter() - start) / 200 * 1000


async def measure_synchronous_commit(dsn: str) -> None:
    """What synchronous mode costs a commit: `on` (the standby has it) against `local`, interleaved."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("CREATE TABLE commit_probe (i int)")
        runs: dict[str, list[float]] = {"on": [], "local": []}
        for _ in range(5):
            for mode, times in runs.items():
                times.append(await commit_milliseconds(dsn, mode, connection))
        await connection.execute("DROP TABLE commit_probe")
    finally:
        await connection.close()
    on, local = statistics.median(runs["on"]), statistics.median(runs["local"])
    FIGURES.append(
        f"a commit, synchronous standby: {on:.2f} ms; primary alone (synchronous_commit=local): {local:.2f} ms;"
        f" {on / local:.1f}x (medians of 5 x 200 commits, loopback)"
    )


def record(
    scenario: str, written: list[Outcome], looked_up: list[Outcome], verdict: Verdict, killed_at: float
) -> float:
    """Add the scenario's row to the failover table; return the seconds from the kill to the end
    of the first signup sent after it that succeeded (infinity if none did)."""
    outcomes = written + looked_up
    statuses = [o.status for o in outcomes]
    after = [o.started + o.seconds - killed_at for o in written if o.status == 201 and o.started > killed_at]
    first_write = min(after, default=float("inf"))
    HA_SUMMARY.append(
        {
            "scenario": scenario,
            "requests": len(statuses),
            "2xx": sum(1 for s in statuses if s is not None and s < 300),
            "503": statuses.count(503),
            "other 5xx": sum(1 for s in statuses if s is not None and s >= 500 and s != 503),
            "no answer": statuses.count(None),
            "in doubt": len(verdict.in_doubt),
            "lost": sum(1 for v in verdict.violations if "but no row" in v),
            "first write after the kill, s": f"{first_write:.1f}",
        }
    )
    return first_write


@pytest.mark.parametrize("route", ["haproxy", "multi-host"])
async def test_a_failover_loses_no_acknowledged_write_and_answers_no_500(
    patroni: PatroniCluster, route: str, start_service: StartService
) -> None:
    await patroni.create_database("users")
    url = patroni.proxy_url("users") if route == "haproxy" else patroni.multi_host_url("users")
    in_thread(upgrade_schema, url)  # migrations take the same URL
    if route == "haproxy":
        await measure_synchronous_commit(url)
    service = start_service(url, **TIMEOUTS)
    async with httpx.AsyncClient(base_url=service.url) as client:
        assert (await sign_up(client, "seeded")).status == 201

    stop, written, looked_up = asyncio.Event(), list[Outcome](), list[Outcome]()
    load = asyncio.gather(
        keep_signing_up(service.url, "fo", stop, workers=12, outcomes=written),
        keep_looking_up(service.url, "seeded", stop, outcomes=looked_up),
    )
    await asyncio.sleep(3)
    old_leader = patroni.leader()
    old_leader.kill()
    killed_at = time.monotonic()
    FIGURES.append(f"{route}: killed {old_leader.name} (Patroni and PostgreSQL, SIGKILL)")
    deadline = killed_at + 30
    while time.monotonic() < deadline:  # until a signup sent after the kill succeeds
        await asyncio.sleep(0.2)
        if any(o.status == 201 and o.started > killed_at for o in written):
            break
    await asyncio.sleep(1)
    stop.set()
    await load

    verdict = await check_promise(f"failover via {route}", patroni, "users", service.url, written)
    first_write = record(f"failover via {route}", written, looked_up, verdict, killed_at)
    statuses = [o.status for o in written + looked_up]
    assert patroni.leader() is not old_leader
    assert verdict.violations == [], patroni.logs()
    assert verdict.leaked == 0
    assert 500 not in statuses
    assert {s for s in statuses if s is not None} <= {200, 201, 503}
    assert all(o.headers.get("retry-after") for o in written + looked_up if o.status == 503)
    assert first_write < 15, service.log()[-3000:]
    assert statuses.count(None) == 0  # every request got an answer: a 503 at worst


async def test_replicas_behind_a_load_balancer_share_users_and_tokens_and_survive_one_dying(
    cluster: Cluster, database: str, start_service: StartService, tmp_path: Path
) -> None:
    replicas = [start_service(cluster.url(database), **TIMEOUTS) for _ in range(2)]  # one SECRET_KEY for both
    servers = "".join(f"  server s{i} 127.0.0.1:{r.port} check\n" for i, r in enumerate(replicas))
    balancer = HAProxy(
        tmp_path,
        "service",
        # As a production setup would: a new server connection for each request (a replica that
        # died then refuses it, and the request goes to the other: nothing of it was sent), and a
        # retry after a request was sent only for the methods that are safe to repeat.
        "  mode http\n  balance roundrobin\n  option http-server-close\n  retries 3\n  option redispatch 1\n"
        "  retry-on conn-failure empty-response response-timeout\n"
        "  http-request disable-l7-retry if !METH_GET !METH_HEAD\n"
        "  option httpchk GET /readyz\n  http-check expect status 200\n"
        "  http-response set-header X-Replica %s\n  default-server inter 500ms fall 2 rise 1\n" + servers,
    )
    url = f"http://127.0.0.1:{balancer.port}"
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            seen: set[str] = set()
            while len(seen) < 2:
                seen.add((await client.get("/healthz")).headers.get("x-replica", ""))
                await asyncio.sleep(0.05)
        # Signed up on one, signed in on the other, refreshed on the first, read on both.
        one, other = (httpx.AsyncClient(base_url=r.url) for r in replicas)
        async with one, other:
            assert (await sign_up(one, "roamer")).status == 201
            body = {"username": "roamer", "password": "Kiwi-Tango-Mango-57"}
            tokens = (await other.post("/api/users/signin", json=body)).json()
            bearer = {"Authorization": f"Bearer {tokens['refresh_token']}"}
            refreshed = await one.post("/api/users/refresh", headers=bearer)
            assert refreshed.status_code == 200, refreshed.text
            access = {"Authorization": f"Bearer {refreshed.json()['access_token']}"}
            for replica in (other, one):
                assert (await replica.get("/api/users/me", headers=access)).json()["username"] == "roamer"

        stop, written, looked_up = asyncio.Event(), list[Outcome](), list[Outcome]()
        load = asyncio.gather(
            keep_signing_up(url, "lb", stop, workers=12, outcomes=written),
            keep_looking_up(url, "roamer", stop, outcomes=looked_up),
        )
        await asyncio.sleep(2)
        killed_at = time.monotonic()  # on the clock the outcomes' `started` use
        replicas[1].process.kill()  # hard: no drain, no goodbye
        replicas[1].process.wait()
        await asyncio.sleep(4)
        stop.set()
        await load
    finally:
        balancer.stop()

    failed = [o for o in written + looked_up if o.status is None or o.status >= 500]
    verdict = await check_promise("replica killed", cluster, database, replicas[0].url, written)
    record("one of two replicas killed", written, looked_up, verdict, killed_at)
    assert verdict.violations == []
    # The promise: only requests that were on the killed replica when it died fail (at most one a
    # client); every request sent after it died is answered by the survivor.
    assert len(failed) <= 16
    assert all(o.started < killed_at for o in failed), [(o.status, o.started - killed_at) for o in failed]
    assert {o.status for o in written + looked_up if o.started > killed_at} <= {200, 201}  # the survivor serves
