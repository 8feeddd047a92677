"""GET /openapi.json: generated from the same models, covering every route, and fuzzed by schemathesis."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.applications import Starlette
from starlette.routing import Route

from app import OPERATIONS
from conftest import PROJECT_DIR
from openapi import openapi_document
from password_rules import PasswordRules

TESTS_DIR = Path(__file__).resolve().parent
DOCUMENT = openapi_document(OPERATIONS, PasswordRules())


def test_every_route_is_documented_and_every_operation_is_routed(app: Starlette) -> None:
    served = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route) and route.include_in_schema
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {(path, method) for path, methods in DOCUMENT["paths"].items() for method in methods}
    assert served == documented
    assert {op["tags"][0] for methods in DOCUMENT["paths"].values() for op in methods.values()} == {
        tag["name"] for tag in DOCUMENT["tags"]
    }


def test_every_operation_documents_its_errors_in_the_one_shape() -> None:
    document = DOCUMENT
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
            if operation["security"]:
                assert "WWW-Authenticate" in responses["401"]["headers"], (method, path)


@pytest.mark.anyio
async def test_the_document_is_served(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.json() == DOCUMENT


@pytest.mark.e2e
def test_schemathesis_finds_no_failure_of_any_check(service_url: str, database_url: str) -> None:
    """All checks, every phase (coverage, fuzzing, stateful links), a fixed seed, bounded examples,
    signed in as a real user, an administrator (made so by the command line); no hooks and no
    custom strategies (tests/schemathesis.toml)."""
    body = {"username": "fuzzed", "password": "Kiwi-Tango-Mango-57", "email": "fuzzed@example.com"}
    assert httpx.post(f"{service_url}/api/users/signup", json=body).status_code == 201
    granted = subprocess.run(
        [sys.executable, "manage.py", "grant-admin", "fuzzed"],
        cwd=PROJECT_DIR, env={**os.environ, "DATABASE_URL": database_url}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert granted.stdout == "fuzzed is an administrator\n"
    credentials = {"username": "fuzzed", "password": body["password"]}
    tokens = [httpx.post(f"{service_url}/api/users/signin", json=credentials).json() for _ in range(3)]
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "run", f"{service_url}/openapi.json"),
        *("--checks", "all", "--seed", "1", "--max-examples", os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25")),
        *("--request-timeout", "10", "--no-color"),
    ]
    env = {
        **os.environ,
        "USERS_ACCESS_TOKEN": tokens[0]["access_token"],
        "USERS_REFRESH_TOKEN": tokens[1]["refresh_token"],
        "USERS_SIGNOUT_TOKEN": tokens[2]["refresh_token"],
    }
    result = subprocess.run(command, cwd=TESTS_DIR, env=env, capture_output=True, text=True, timeout=600)
    print(result.stdout[-6000:], result.stderr[-2000:])
    assert result.returncode == 0, "schemathesis found problems: see the output above"
    assert "Stateful" in result.stdout
    assert "Authentication failed" not in result.stdout  # refresh and signout got real tokens


def test_the_document_is_valid_openapi() -> None:
    validate(DOCUMENT)  # openapi-spec-validator: raises on the first error


def test_redocly_recommended_lint_is_clean(tmp_path: Path) -> None:
    tools = TESTS_DIR / "tools"
    assert (tools / "node_modules" / ".bin" / "redocly").exists(), "scripts/test installs it: npm ci in tests/tools"
    document = tmp_path / "openapi.json"
    document.write_text(json.dumps(DOCUMENT))
    result = subprocess.run(
        [
            str(tools / "node_modules" / ".bin" / "redocly"),
            "lint",
            "--config",
            str(tools / "redocly.yaml"),
            str(document),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Your API description is valid" in output, output
    assert not re.search(r"You have \d+ warnings?", output), output


@pytest.mark.e2e
def test_a_client_generated_from_the_document_runs_the_curl_walkthrough(service_url: str, tmp_path: Path) -> None:
    """openapi-python-client, from the served /openapi.json: the README's flow, typed end to end."""
    (tmp_path / "openapi.json").write_text(httpx.get(f"{service_url}/openapi.json").text)
    generated = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--path", "openapi.json", "--meta", "none"],
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    assert "Warning" not in generated.stdout, generated.stdout
    result = subprocess.run(
        [sys.executable, "-c", GENERATED_CLIENT_FLOW, service_url], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "the walkthrough ran: 11 steps"


# Run beside the generated package (users_client), so kept as text: it imports what is only there.
GENERATED_CLIENT_FLOW = """
import sys
from users_client import AuthenticatedClient, Client
from users_client.api.accounts import get_me, signin, signup, update_me
from users_client.api.sessions import refresh, signout
from users_client.api.probes import healthz, readyz
from users_client.api.profiles import get_user, list_users
from users_client.models import (
    Error, Page, PrivateProfile, ProfileUpdate, PublicProfile, Signin, SigninTokens, Signup, TokenPair,
)

url = sys.argv[1]
client = Client(base_url=url, raise_on_unexpected_status=True)
steps = 0


def step(response, status, model):
    global steps
    assert response.status_code == status, (response.status_code, response.content)
    assert isinstance(response.parsed, model), response.parsed
    steps += 1
    return response.parsed


password = "Kiwi-Tango-Mango-57"
new_user = Signup("carol", password, "carol@example.com")
profile = step(signup.sync_detailed(client=client, body=new_user), 201, PrivateProfile)
assert step(get_user.sync_detailed("carol", client=client), 200, PublicProfile).id == profile.id
pair = step(signin.sync_detailed(client=client, body=Signin("carol", password)), 200, SigninTokens)
me = AuthenticatedClient(base_url=url, token=pair.access_token, raise_on_unexpected_status=True)
assert step(get_me.sync_detailed(client=me), 200, PrivateProfile).email == "carol@example.com"
changes = ProfileUpdate(address="Seoul", phone_number="01012345678")
assert step(update_me.sync_detailed(client=me, body=changes), 200, PrivateProfile).address == "Seoul"
old = AuthenticatedClient(base_url=url, token=pair.refresh_token, raise_on_unexpected_status=True)
new_pair = step(refresh.sync_detailed(client=old), 200, TokenPair)
new = AuthenticatedClient(base_url=url, token=new_pair.refresh_token, raise_on_unexpected_status=True)
assert signout.sync_detailed(client=new).status_code == 204
steps += 1
assert step(refresh.sync_detailed(client=old), 401, Error).detail == "Token has been revoked"
assert [item.username for item in step(list_users.sync_detailed(client=client, limit=20), 200, Page).items] == ["carol"]
assert healthz.sync_detailed(client=client).status_code == 200
assert readyz.sync_detailed(client=client).status_code == 200
steps += 2
print(f"the walkthrough ran: {steps} steps")
"""
