"""GET /openapi.json: generated from the same models, covering every route, and fuzzed by schemathesis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

from app import routes
from openapi import OPERATIONS, openapi_document

TESTS_DIR = Path(__file__).resolve().parent


def test_every_route_is_documented_and_every_operation_is_routed() -> None:
    served = {
        (route.path.replace("{username:str}", "{username}"), method.lower())
        for route in routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {(op.path, op.method) for op in OPERATIONS}
    assert served == documented


def test_every_operation_documents_its_errors_in_the_one_shape() -> None:
    document = openapi_document()
    assert document["openapi"] == "3.1.0"
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    error = {"$ref": "#/components/schemas/Error"}
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            responses = operation["responses"]
            assert responses["500"]["content"]["application/json"]["schema"] == error, (method, path)
            if "requestBody" in operation:
                assert {"400", "413", "415"} <= set(responses), (method, path)
            if "security" in operation:
                assert "WWW-Authenticate" in responses["401"]["headers"], (method, path)


@pytest.mark.anyio
async def test_the_document_is_served(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.json() == openapi_document()


@pytest.mark.e2e
def test_schemathesis_finds_no_server_error_undocumented_status_or_schema_violation(service_url: str) -> None:
    """All checks, every phase (coverage, fuzzing, stateful links), a fixed seed, bounded examples."""
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "run", f"{service_url}/openapi.json"),
        *("--checks", "all", "--seed", "1", "--max-examples", os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25")),
        *("--request-timeout", "10", "--no-color"),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(TESTS_DIR)}
    result = subprocess.run(command, cwd=TESTS_DIR, env=env, capture_output=True, text=True, timeout=600)
    print(result.stdout[-6000:], result.stderr[-2000:])
    assert result.returncode == 0, "schemathesis found problems: see the output above"
    assert "Stateful" in result.stdout
