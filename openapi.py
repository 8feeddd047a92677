"""The OpenAPI 3.1 document, generated from the pydantic models that validate and shape the API,
and /docs, the interactive page that shows it.

Each route in app.py has one `Operation` here; a test checks that the two lists match.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from schemas import (
    COMMON_PASSWORD_RULE,
    AccountDeletion,
    Error,
    ListQuery,
    Page,
    PasswordChange,
    PrivateProfile,
    ProfileUpdate,
    PublicProfile,
    Readiness,
    Signin,
    Signup,
    Status,
    TokenPair,
    common_password_pattern,
)

ERRORS = {
    400: "The body or query is malformed or a field is invalid; nothing was written.",
    401: "The bearer token is missing, malformed, expired, revoked or of the wrong type.",
    404: "No such user.",
    408: "The body did not arrive within BODY_TIMEOUT seconds; nothing was written.",
    409: "The username or email is taken; nothing was written.",
    413: "The body is larger than MAX_BODY_BYTES.",
    415: "The body is not sent as application/json.",
    429: "Too many failed attempts from this address; retry after Retry-After seconds. Nothing was checked.",
    500: "An internal error, or the commit failed; nothing was written unless the outcome is in doubt.",
    503: "The database cannot be reached or has no free connection; retry after Retry-After seconds.",
}
BODY_ERRORS = (400, 408, 413, 415)


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    operation_id: str
    summary: str
    status: int
    response: type[BaseModel] | None
    errors: tuple[int, ...] = ()
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    auth: bool = False
    database: bool = True
    links: dict[str, Any] = field(default_factory=dict)
    error_notes: dict[int, str] = field(default_factory=dict)  # in place of ERRORS' description


# Links only carry data between operations. Credentials come from schemathesis's own sign-up and
# login, since it counts any credential that a link supplies as generated, hence invalid.
OPERATIONS = (
    Operation(
        "post", "/api/users/signup", "signup", "Create a user", 201, PrivateProfile, (*BODY_ERRORS, 409), body=Signup,
        links={
            "GetUser": {"operationId": "getUser", "parameters": {"path.username": "$response.body#/username"}},
            "Signin": {
                "operationId": "signin",
                "requestBody": {"username": "$request.body#/username", "password": "$request.body#/password"},
            },
        },
    ),
    Operation(
        "post", "/api/users/signin", "signin", "Get an access and a refresh token", 200, TokenPair,
        (*BODY_ERRORS, 401, 429), body=Signin,
    ),
    Operation(
        "post", "/api/users/refresh", "refresh", "Trade a refresh token for a new pair (the old one is revoked)",
        200, TokenPair, (401,), auth=True,
    ),
    Operation("post", "/api/users/signout", "signout", "Revoke a refresh token", 204, None, (401,), auth=True),
    Operation("get", "/api/users/me", "getMe", "Your private profile", 200, PrivateProfile, (401,), auth=True),
    Operation(
        "patch", "/api/users/me", "updateMe", "Change your email (with your password), address or phone number",
        200, PrivateProfile, (*BODY_ERRORS, 401, 409, 429), body=ProfileUpdate, auth=True,
        error_notes={400: "The body is malformed, a field is invalid, or password is missing or wrong; no change."},
    ),
    Operation(
        "delete", "/api/users/me", "deleteMe", "Delete your account (takes its password)", 204, None,
        (*BODY_ERRORS, 401, 429), body=AccountDeletion, auth=True,
        error_notes={400: "The body is malformed, or password is missing or wrong; nothing was written."},
    ),
    Operation(
        "put", "/api/users/me/password", "changePassword", "Change your password (earlier tokens stop working)",
        204, None, (*BODY_ERRORS, 401, 429), body=PasswordChange, auth=True,
        error_notes={400: "The body is malformed, a field is invalid, or old_password is wrong; nothing was written."},
    ),
    Operation("get", "/api/users", "listUsers", "Public profiles by username", 200, Page, (400,), query=ListQuery),
    Operation("get", "/api/users/{username}", "getUser", "A public profile", 200, PublicProfile, (404,)),
    Operation("get", "/healthz", "healthz", "Liveness; touches no database", 200, Status, database=False),
    Operation(
        "get", "/readyz", "readyz", "Readiness: the database answers, at the schema's head", 200, Readiness,
        error_notes={503: "Not ready: the database cannot be reached, or its schema is not at the migrations' head."},
    ),
    Operation("get", "/openapi.json", "openapi", "This document", 200, None, database=False),
)  # fmt: skip


def _json(schema: dict[str, Any] | None, description: str) -> dict[str, Any]:
    if schema is None:
        return {"description": description}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    parameters = []
    for name, schema in model.model_json_schema()["properties"].items():
        # An absent parameter is the "null" choice: document only the others.
        choices = [choice for choice in schema.pop("anyOf", [schema]) if choice.get("type") != "null"]
        if schema.get("default", 0) is None:
            del schema["default"]
        parameters.append({"name": name, "in": "query", "required": False, "schema": {**schema, **choices[0]}})
    return parameters


def _operation(op: Operation, ref: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    ok = _json(ref[op.response] if op.response else None, "Success")
    if op.links:
        ok["links"] = op.links
    responses = {str(op.status): ok}
    for status in sorted({*op.errors, 500, *((503,) if op.database else ())}):
        responses[str(status)] = _json(ref[Error], op.error_notes.get(status, ERRORS[status]))
        if status == 401:
            responses["401"]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        if status in (429, 503):
            responses[str(status)]["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}
    document: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary, "responses": responses}
    if op.body is not None:
        document["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref[op.body]}}}
    if op.query is not None:
        document["parameters"] = _query_parameters(op.query)
    if op.path == "/api/users/{username}":
        document["parameters"] = [{"name": "username", "in": "path", "required": True, "schema": {"type": "string"}}]
    document["security"] = [{"bearer": []}] if op.auth else []  # [] says "public", where absent says nothing
    return document


@functools.cache
def openapi_document() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        *((model, "validation") for model in (Signup, Signin, ProfileUpdate, PasswordChange, AccountDeletion)),
        *(
            (model, "serialization")
            for model in (PublicProfile, PrivateProfile, Page, TokenPair, Error, Status, Readiness)
        ),
    ]
    keys, definitions = models_json_schema(models, ref_template="#/components/schemas/{model}")
    ref: dict[Any, dict[str, Any]] = {model: schema for (model, _mode), schema in keys.items()}
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op, ref)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "users",
            "version": "1.0.0",
            "description": "A small user-account service.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": "/", "description": "The service that serves this document"}],
        "paths": paths,
        "components": {
            "schemas": {
                **definitions["$defs"],
                "CommonPassword": {
                    "type": "string",
                    "pattern": common_password_pattern(),
                    "description": f"A password that is {COMMON_PASSWORD_RULE}.",
                },
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }


# --- /docs: Swagger UI, served by the service itself ---------------------------------------------

DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>users: API documentation</title>
  <link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/assets/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true,
      defaultModelsExpandDepth: -1,  // the schemas show in each operation; the list would repeat them
    });
  </script>
</body>
</html>
"""


async def docs_page(request: Request) -> Response:
    return HTMLResponse(DOCS_PAGE)


def docs_routes() -> list[BaseRoute]:
    """/docs and its assets: Swagger UI (5.x, which reads OpenAPI 3.1) from the pinned swagger-ui-py
    package's files, served from here, so that no CDN is needed (a container often has no outside
    network). "Try it out" calls this same origin (the document's server is "/")."""
    spec = importlib.util.find_spec("swagger_ui")  # only its files: importing it would load Jinja2
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed (requirements.txt)")
    assets = Path(spec.submodule_search_locations[0]) / "static"
    return [
        Route("/docs", docs_page, methods=["GET"], include_in_schema=False),
        Mount("/docs/assets", app=StaticFiles(directory=assets), name="docs-assets"),
    ]
