"""Prometheus metrics: one process's, a whole service of workers' (multiprocess mode), and a real
Prometheus scraping them."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app import create_app
from chaos import ServiceProcess, free_port
from clusters import StartService
from conftest import signup_body
from settings import Settings

pytestmark = pytest.mark.anyio

TOKEN = "scrape-token-0123456789abcdefghij"  # METRICS_TOKEN


def samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


async def scrape(
    client: httpx.AsyncClient, token: str | None = None
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return samples(response.text)


# --- metrics, in one process ---------------------------------------------------------------------


async def test_requests_are_counted_and_timed_by_route_template_never_by_raw_path(client: httpx.AsyncClient) -> None:
    await client.post("/api/users/signup", json=signup_body("alice"))
    for name in ("nobody", "someone", "alice", "alice"):
        await client.get(f"/api/users/{name}")
    await client.get("/no/such/path")
    await client.get("/metrics")

    found = await scrape(client)

    user = "/api/users/{username}"
    assert value(found, "http_requests_total", method="GET", route=user, status="404") == 2
    assert value(found, "http_requests_total", method="GET", route=user, status="200") == 2
    assert value(found, "http_requests_total", method="POST", route="/api/users/signup", status="201") == 1
    assert value(found, "http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert not [key for key in found if dict(key[1]).get("route") == "/metrics"]  # not counted in itself
    assert not [key for key in found if "alice" in dict(key[1]).get("route", "")]
    buckets = {dict(key[1])["le"] for key in found if key[0] == "http_request_duration_seconds_bucket"}
    assert {"0.001", "10.0", "+Inf"} <= buckets
    assert value(found, "http_request_duration_seconds_count", method="GET", route=user) == 4


async def test_transactions_are_counted_by_how_they_ended(app: Starlette, client: httpx.AsyncClient) -> None:
    async def refused_commit(request: Request) -> Response:
        await request.state.session.execute(text("SELECT 1"))

        @event.listens_for(request.state.session.sync_session, "before_commit")
        def refuse(session: Any) -> None:
            raise RuntimeError("commit refused")

        return JSONResponse({}, status_code=201)

    app.router.routes.insert(0, Route("/test/refused-commit", refused_commit, methods=["POST"]))
    await client.post("/api/users/signup", json=signup_body("alice"))  # commit
    await client.post("/api/users/signup", json=signup_body("alice"))  # 409: rollback
    await client.get("/healthz")  # no work: nothing to count
    assert (await client.post("/test/refused-commit")).status_code == 500

    found = await scrape(client)

    assert value(found, "db_transactions_total", outcome="commit") >= 1
    assert value(found, "db_transactions_total", outcome="rollback") == 1
    assert value(found, "db_transactions_total", outcome="commit_failed") == 1


async def test_the_pool_gauges_follow_the_pool(no_delivery: None, client: httpx.AsyncClient, engine: Any) -> None:
    for _ in range(3):
        await client.get("/api/users/nobody")

    found = await scrape(client)

    pool = engine.sync_engine.pool
    assert value(found, "db_pool_checked_out") == pool.checkedout() == 0
    assert value(found, "db_pool_size") == pool.checkedin() >= 1


async def test_answers_the_503_mapping_gave_are_counted() -> None:
    app = create_app(Settings(database_url="postgresql://postgres@127.0.0.1:1/users", connect_timeout=1))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            assert (await client.get("/api/users/alice")).status_code == 503
            assert (await client.get("/readyz")).status_code == 503
            found = await scrape(client)
    assert value(found, "db_unavailable_total") == 2


async def test_with_metrics_off_there_is_no_metrics_route(settings: Settings) -> None:
    async with LifespanManager(create_app(replace(settings, metrics=False))) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            assert (await client.get("/metrics")).status_code == 404
            assert (await client.get("/healthz")).status_code == 200


# --- metrics for the whole service -----------------------------------------------------------------


@pytest.fixture
def two_workers(database_url: str, start_service: StartService, tmp_path: Path) -> ServiceProcess:
    (tmp_path / "metrics-token").write_text(TOKEN + "\n")  # as a secret is mounted
    return start_service(
        database_url,
        WEB_CONCURRENCY="2",
        METRICS_DIR=str(tmp_path / "metrics"),
        METRICS_TOKEN_FILE=str(tmp_path / "metrics-token"),
    )


def metric_files(directory: Path) -> set[str]:
    """prometheus-client's files, by kind (a file a kind and process)."""
    return {path.name.rpartition("_")[0] for path in directory.glob("*.db")}


async def lookups(url: str, count: int) -> None:
    # A new connection each: uvicorn's workers share the listening socket, so both get some.
    for _ in range(count):
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/api/users/nobody")).status_code == 404


async def test_with_two_workers_every_scrape_counts_the_whole_service(
    two_workers: ServiceProcess, tmp_path: Path
) -> None:
    await lookups(two_workers.url, 60)

    counts = []
    for _ in range(6):  # whichever worker answers the scrape
        async with httpx.AsyncClient(base_url=two_workers.url) as client:
            found = await scrape(client, TOKEN)
        counts.append(value(found, "http_requests_total", method="GET", route="/api/users/{username}", status="404"))

    assert counts == [60] * 6
    assert two_workers.log().count("Started server process") == 2
    assert {"counter", "histogram", "gauge_livesum"} <= metric_files(tmp_path / "metrics")


async def test_a_restarted_service_counts_from_zero(
    database_url: str, start_service: StartService, tmp_path: Path
) -> None:
    directory = tmp_path / "metrics"
    first = start_service(database_url, WEB_CONCURRENCY="2", METRICS_DIR=str(directory))
    await lookups(first.url, 5)
    first.stop()
    second = start_service(database_url, WEB_CONCURRENCY="2", METRICS_DIR=str(directory))
    async with httpx.AsyncClient(base_url=second.url) as client:
        found = await scrape(client)
    assert value(found, "http_requests_total", method="GET", route="/api/users/{username}", status="404") == 0


async def test_with_a_metrics_token_only_a_request_bearing_it_is_answered(settings: Settings) -> None:
    async with LifespanManager(create_app(replace(settings, metrics_token=TOKEN))) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            answers = [
                await client.get("/metrics", headers=headers)
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"})
            ]
            assert await scrape(client, TOKEN)
    for answer in answers:
        assert answer.status_code == 401
        assert answer.json() == {"detail": "The metrics need the METRICS_TOKEN bearer token."}
        assert answer.headers["www-authenticate"] == 'Bearer realm="metrics"'


# --- a real Prometheus scrapes the service ---------------------------------------------------


@pytest.fixture
def prometheus(two_workers: ServiceProcess, tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "scripts/test installs Debian's prometheus"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    target = two_workers.url.removeprefix("http://")
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: users\n    static_configs:\n      - targets: ['{target}']\n"
        f"    authorization:\n      credentials: {TOKEN}\n"
    )
    command = [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"]
    with (tmp_path / "prometheus.log").open("w") as log:
        process = subprocess.Popen([*command, f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(20)


def query(prometheus: str, promql: str) -> float | None:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5).json()
    results = answer["data"]["result"]
    return float(results[0]["value"][1]) if results else None


async def test_a_real_prometheus_scrapes_the_whole_service(two_workers: ServiceProcess, prometheus: str) -> None:
    await lookups(two_workers.url, 75)
    promql = 'sum(http_requests_total{route="/api/users/{username}"})'
    seen = None
    for _ in range(150):  # a scrape a second; wait for one after the load
        with contextlib.suppress(httpx.HTTPError):
            seen = await anyio.to_thread.run_sync(query, prometheus, promql)
        if seen == 75:
            break
        await anyio.sleep(0.2)
    assert seen == 75
    up = await anyio.to_thread.run_sync(query, prometheus, 'up{job="users"}')
    assert up == 1
