"""Fixtures for the suites that run the service as real uvicorn processes, and for those that need
a PostgreSQL cluster of their own, which they may stop, restart or put a pooler in front of (the
fault, failover and PgBouncer suites). A pytest plugin of conftest.py's; the tools are in chaos.py
and ha.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import chaos
import ha
from chaos import Cluster, ServiceProcess, postgres_bindir
from conftest import in_thread
from migrate import upgrade_schema

StartService = Callable[..., ServiceProcess]


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[StartService]:
    """start_service(database_url, app="app:create_app", **settings): the service as a real uvicorn
    process, stopped after the test, whose log must show no leaked connection."""
    services: list[ServiceProcess] = []

    def start(database_url: str, app: str = chaos.APP, **settings: str) -> ServiceProcess:
        service = ServiceProcess(database_url, tmp_path / f"service{len(services)}.log", app, **settings)
        services.append(service)
        return service

    yield start
    for service in services:
        service.stop()
        log = service.log()
        assert "non-checked-in connection" not in log, log[-3000:]
        assert "was garbage collected" not in log, log[-3000:]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster of the module's own, which its tests may stop and restart."""
    bindir = postgres_bindir()
    if bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the fault and failover suites need PostgreSQL server binaries (PG_BINDIR)")
        pytest.skip("no PostgreSQL server binaries: these tests need a cluster they can restart")
    cluster = Cluster(bindir)
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def database(cluster: Cluster) -> Iterator[str]:
    """A fresh, migrated database on the module's cluster."""
    name = f"faults_{uuid.uuid4().hex[:10]}"
    in_thread(asyncio.run, cluster.sql(f"CREATE DATABASE {name}"))
    in_thread(upgrade_schema, cluster.url(name))
    yield name
    with contextlib.suppress(Exception):
        in_thread(asyncio.run, cluster.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


# The summary tables' rows travel with each test's report, so that they reach the terminal from
# pytest-xdist's workers too: (rows a test appends to, where its report carries them).
TABLES: dict[str, list[Any]] = {"faults": chaos.SUMMARY, "failovers": ha.HA_SUMMARY, "figures": ha.FIGURES}
REPORTED: dict[str, list[Any]] = {name: [] for name in TABLES}


@pytest.fixture(autouse=True)
def _summary_rows(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name, rows in TABLES.items():
        request.node.user_properties.extend((f"table:{name}", row) for row in rows)
        rows.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown":
        for key, row in report.user_properties:
            if key.startswith("table:"):
                REPORTED[key.removeprefix("table:")].append(row)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    write_table(terminalreporter, "the promise under faults", REPORTED["faults"])
    write_table(terminalreporter, "the promise across failovers", REPORTED["failovers"], REPORTED["figures"])


def write_table(
    reporter: pytest.TerminalReporter, title: str, rows: list[dict[str, Any]], notes: list[str] | None = None
) -> None:
    if not rows and not notes:
        return
    reporter.section(title)
    if rows:
        columns = list(rows[0])
        widths = [max(len(str(column)), *(len(str(row[column])) for row in rows)) for column in columns]
        reporter.write_line("  ".join(str(c).ljust(w) for c, w in zip(columns, widths, strict=True)))
        for row in rows:
            reporter.write_line("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))
    for note in notes or []:
        reporter.write_line(note)
