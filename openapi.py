"""The API's operations, each declared once beside its endpoint (route modules list theirs in
OPERATIONS), made into the Starlette routes and into the OpenAPI 3.1 document, whose schemas come
from the pydantic models that validate and shape the API; and /docs, the page that shows it."""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from password_rules import PasswordRules, blocklist_pattern
from resources import resources
from responses import Error

ERRORS = {
    400: "The body or query is malformed or a field is invalid; nothing was written.",
    401: "The bearer token is missing, malformed, expired, revoked or of the wrong type.",
    403: "A proof the request carries (the current password) is wrong; nothing was written.",
    404: "No such user.",
    408: "The body did not arrive within BODY_TIMEOUT seconds; nothing was written.",
    409: "The username or email is taken; nothing was written.",
    413: "The body is larger than MAX_BODY_BYTES.",
    415: "The body is not sent as application/json.",
    429: "Too many attempts from this address or for this account; retry after Retry-After seconds. Nothing was "
    "checked.",
    500: "An internal error, or the commit failed; nothing was written unless the outcome is in doubt.",
    503: "The database cannot be reached or has no free connection; retry after Retry-After seconds.",
}
BODY_ERRORS = (400, 408, 413, 415)
TAGS = [
    {"name": "accounts", "description": "Signing up and in, and your own account."},
    {"name": "sessions", "description": "Your sessions (one a signin), their tokens, and your security history."},
    {"name": "recovery", "description": "Proving an address: password resets and email verification, by mail."},
    {"name": "profiles", "description": "Public profiles, by username or as a list."},
    {"name": "tokens", "description": "The public keys that verify the service's tokens."},
    {"name": "admin", "description": "What operators do: users, disabled accounts, sessions, the security trail."},
    {"name": "probes", "description": "Liveness, readiness and this document."},
]
PATH_PARAMETER = re.compile(r"{(\w+)}")

Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, eq=False)  # compared by identity: a document is cached per tuple of them
class Operation:
    """One operation of the API: its route is made from it (routes_of), and so is its part of the
    document. Links only carry data between operations: credentials come from schemathesis's own
    sign-up and login, since it counts any credential that a link supplies as generated."""

    method: str
    path: str
    endpoint: Endpoint
    operation_id: str
    summary: str
    tag: str
    status: int
    response: type[BaseModel] | None
    errors: tuple[int, ...] = ()
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    auth: bool = False
    database: bool = True
    links: dict[str, Any] = field(default_factory=dict)
    error_notes: dict[int, str] = field(default_factory=dict)  # in place of ERRORS' description


def routes_of(operations: Sequence[Operation]) -> list[BaseRoute]:
    """A route per path, in the order of first mention (Starlette takes the first match), and
    /openapi.json (which reads the app's `state.operations`)."""
    by_path: dict[str, dict[str, Endpoint]] = {}
    for op in (*operations, OPENAPI):
        by_path.setdefault(op.path, {})[op.method] = op.endpoint
    return [Route(path, by_method(endpoints), methods=list(endpoints)) for path, endpoints in by_path.items()]


def by_method(endpoints: dict[str, Endpoint]) -> Endpoint:
    if len(endpoints) == 1:
        return next(iter(endpoints.values()))

    async def endpoint(request: Request) -> Response:
        # One route for the methods of one path, so that its 405 lists all of them in Allow.
        return await endpoints["GET" if request.method == "HEAD" else request.method](request)

    return endpoint


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi_document(request.app.state.operations, resources(request).password_rules))


OPENAPI = Operation(
    "GET", "/openapi.json", openapi_json, "openapi", "This document", "probes", 200, None, database=False
)


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
    document: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "responses": responses,
    }
    if op.body is not None:
        document["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref[op.body]}}}
    if op.query is not None:
        document["parameters"] = _query_parameters(op.query)
    if names := PATH_PARAMETER.findall(op.path):
        document["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in names
        ]
    document["security"] = [{"bearer": []}] if op.auth else []  # [] says "public", where absent says nothing
    return document


COMMON_PASSWORD = {"$ref": "#/components/schemas/CommonPassword"}


def _password_rules(definitions: dict[str, Any], rules: PasswordRules) -> None:
    """The rules of the service's settings on each new password (those that refuse the blocklist)."""
    for model in definitions.values():
        for schema in model.get("properties", {}).values():
            if schema.get("not") == COMMON_PASSWORD:
                schema["minLength"] = rules.min_length
                schema["description"] = (
                    f"{rules.min_length} to {schema['maxLength']} characters of any kind (no control characters), "
                    f"compared in Unicode's NFKC form; not one of the most common passwords (CommonPassword), and "
                    f"not containing your username, the name of your email address or {rules.service_name!r}."
                )


@functools.cache
def openapi_document(operations: tuple[Operation, ...], rules: PasswordRules) -> dict[str, Any]:
    """The document of these operations and of /openapi.json itself, with the password rules of
    the service's settings."""
    operations = (*operations, OPENAPI)
    inputs = dict.fromkeys(op.body for op in operations if op.body is not None)
    outputs: dict[type[BaseModel], None] = dict.fromkeys([*(op.response for op in operations if op.response), Error])
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        *((model, "validation") for model in inputs),
        *((model, "serialization") for model in outputs),
    ]
    keys, definitions = models_json_schema(models, ref_template="#/components/schemas/{model}")
    _password_rules(definitions["$defs"], rules)
    ref: dict[Any, dict[str, Any]] = {model: schema for (model, _mode), schema in keys.items()}
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, ref)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "users",
            "version": "1.0.0",
            "description": "A small user-account service.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": "/", "description": "The service that serves this document"}],
        "tags": TAGS,
        "paths": paths,
        "components": {
            "schemas": {
                **definitions["$defs"],
                "CommonPassword": {
                    "type": "string",
                    "pattern": blocklist_pattern(rules.min_length),
                    "description": "One of the most common passwords (zxcvbn's list), in any case.",
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
