"""The routes that machines call: liveness, readiness, the key set that verifies tokens, and the
Prometheus metrics."""

from __future__ import annotations

import hmac

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine import is_unavailable
from errors import error_response
from openapi import Operation
from resources import resources
from responses import KeySet, Readiness, Status
from tokens import JWKS_MAX_AGE


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


async def jwks(request: Request) -> Response:
    """The public keys that verify the service's tokens (RFC 7517), for other services to cache."""
    tokens = resources(request).tokens
    key_set = tokens.key_set()
    if not key_set["keys"]:
        raise HTTPException(404, "No key set: tokens are signed with SECRET_KEY, which is not published.")
    return JSONResponse(key_set, headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE}"})


async def prometheus_metrics(request: Request) -> Response:
    """The Prometheus text format; touches no database connection (the pool gauges are counters).
    With METRICS_TOKEN, only for a request that bears it."""
    metrics, token = resources(request).metrics, resources(request).settings.metrics_token
    assert metrics is not None  # the route exists only with METRICS on
    if token is not None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(
                401,
                "The metrics need the METRICS_TOKEN bearer token.",
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
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
    Operation(
        "GET", "/.well-known/jwks.json", jwks, "jwks", "The public keys that verify the service's tokens (a JWK Set)",
        "tokens", 200, KeySet, (404,), database=False,
        error_notes={404: "No key set: the service signs with SECRET_KEY (HS256), which is never published."},
    ),
)  # fmt: skip
