"""The routes that machines call: liveness, readiness, and the Prometheus metrics."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine import is_unavailable
from errors import error_response
from openapi import Operation
from resources import resources
from schemas import Readiness, Status


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    if resources(request).draining.is_set():  # SIGTERM came: let the load balancer stop sending
        return error_response(503, "The service is shutting down.")
    # Bounded by the pool and driver timeouts; an unreachable database answers 503 (database_error).
    try:
        revision = await request.state.session.scalar(text("SELECT version_num FROM alembic_version"))
    except DBAPIError as exc:
        if is_unavailable(exc):
            raise
        revision = None  # no alembic_version table: never migrated
    schema = resources(request).schema
    if schema.behind(revision):
        return error_response(
            503, f"The database schema is at revision {revision or 'none'}, not {schema.head}: run the migrations."
        )
    return JSONResponse({"status": "ready", "revision": revision})


async def prometheus_metrics(request: Request) -> Response:
    """The Prometheus text format; touches no database connection (the pool gauges are counters)."""
    metrics = resources(request).metrics
    assert metrics is not None  # the route exists only with METRICS on
    return Response(metrics.exposition(), media_type=metrics.content_type)


OPERATIONS = (
    Operation(
        "GET", "/healthz", healthz, "healthz", "Liveness; touches no database", "probes", 200, Status, database=False
    ),
    Operation(
        "GET", "/readyz", readyz, "readyz", "Readiness: the database answers, at the schema's head", "probes", 200,
        Readiness,
        error_notes={503: "Not ready: the database cannot be reached, or its schema is not at the migrations' head."},
    ),
)  # fmt: skip
