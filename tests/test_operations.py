"""Operations: Prometheus metrics (one process, and a whole service of workers), request ids on
every answer, one structured log line per request, and the drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
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
from chaos import Service, free_port, sign_up_many
from conftest import PROJECT_DIR, Database, signup_body
from openapi import OPERATIONS
from settings import Settings

pytestmark = pytest.mark.anyio


def samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await client.get("/metrics")
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


async def test_the_pool_gauges_follow_the_pool(client: httpx.AsyncClient, engine: Any) -> None:
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
def two_workers(database_url: str, tmp_path: Path) -> Iterator[Service]:
    service = Service(database_url, tmp_path / "service.log", WEB_CONCURRENCY="2", METRICS_DIR=str(tmp_path))
    yield service
    service.stop()


def metric_directories(base: Path) -> list[str]:
    return [path.name for path in base.glob("users-metrics-*")]


async def lookups(url: str, count: int) -> None:
    # A new connection each: uvicorn's workers share the listening socket, so both get some.
    for _ in range(count):
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/api/users/nobody")).status_code == 404


async def test_with_two_workers_every_scrape_counts_the_whole_service(two_workers: Service, tmp_path: Path) -> None:
    await lookups(two_workers.url, 60)

    counts = []
    for _ in range(6):  # whichever worker answers the scrape
        async with httpx.AsyncClient(base_url=two_workers.url) as client:
            found = await scrape(client)
        counts.append(value(found, "http_requests_total", method="GET", route="/api/users/{username}", status="404"))

    assert counts == [60] * 6
    assert two_workers.log().count("Started server process") == 2
    assert metric_directories(tmp_path) == [f"users-metrics-{two_workers.process.pid}"]


async def test_a_restarted_service_counts_from_zero_and_clears_the_old_directory(
    database_url: str, tmp_path: Path
) -> None:
    first = Service(database_url, tmp_path / "first.log", WEB_CONCURRENCY="2", METRICS_DIR=str(tmp_path))
    await lookups(first.url, 5)
    first.stop()
    second = Service(database_url, tmp_path / "second.log", WEB_CONCURRENCY="2", METRICS_DIR=str(tmp_path))
    try:
        async with httpx.AsyncClient(base_url=second.url) as client:
            found = await scrape(client)
    finally:
        second.stop()
    assert value(found, "http_requests_total", method="GET", route="/api/users/{username}", status="404") == 0
    assert metric_directories(tmp_path) == [f"users-metrics-{second.process.pid}"]


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


async def test_every_answer_carries_a_request_id_500_and_503_included(unmigrated: str) -> None:
    async with LifespanManager(create_app(Settings(database_url=unmigrated))) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            failed = await client.get("/api/users/alice", headers={"X-Request-ID": "the-500"})
            not_ready = await client.get("/readyz", headers={"X-Request-ID": "the-503"})
    assert (failed.status_code, failed.headers["x-request-id"]) == (500, "the-500")
    assert (not_ready.status_code, not_ready.headers["x-request-id"]) == (503, "the-503")


@pytest.fixture
def unmigrated(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"


# --- request logs ----------------------------------------------------------------------------


def json_lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


async def test_one_json_line_per_request_with_its_fields(database_url: str, tmp_path: Path) -> None:
    service = Service(database_url, tmp_path / "service.log", LOG_FORMAT="json")
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
    unmigrated = Service(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}", tmp_path / "a.log", LOG_FORMAT="json")
    unreachable = Service("postgresql://postgres@127.0.0.1:1/users", tmp_path / "b.log", LOG_FORMAT="json")
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
    service = Service(database_url, tmp_path / "service.log", LOG_FORMAT="text")
    try:
        async with httpx.AsyncClient(base_url=service.url) as client:
            await client.get("/api/users/nobody", headers={"X-Request-ID": "look-1"})
    finally:
        service.stop()
    line = next(line for line in service.log().splitlines() if "request_id=look-1" in line)
    assert " INFO [users.access] GET /api/users/nobody 404 " in line
    assert "route=/api/users/{username} client=127.0.0.1" in line
    assert "Started server process" in service.log()


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
    database_url: str, db: Database, tmp_path: Path
) -> None:
    service = Service(database_url, tmp_path / "service.log", LOG_FORMAT="json")
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
    documented = [op.operation_id for op in OPERATIONS]
    assert sorted(found["rendered"]) == sorted(f"operations-default-{name}" for name in documented)
    assert found["tried"] == {"healthz": "200", "getUser": "404"}  # "Try it out", against this origin
    assert found["elsewhere"] == []  # no CDN: every request the page made went to the service
    assert screenshot.stat().st_size > 10_000
    assets = httpx.get(f"{service_url}/docs/assets/swagger-ui-bundle.js")
    assert assets.status_code == 200
    assert b"SwaggerUIBundle" in assets.content


# --- a real Prometheus scrapes the service ---------------------------------------------------


@pytest.fixture
def prometheus(two_workers: Service, tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "scripts/test installs Debian's prometheus"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    target = two_workers.url.removeprefix("http://")
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: users\n    static_configs:\n      - targets: ['{target}']\n"
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


async def test_a_real_prometheus_scrapes_the_whole_service(two_workers: Service, prometheus: str) -> None:
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
