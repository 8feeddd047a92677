"""One error shape for every status: `{"detail": "<one sentence>"}` (plus `errors` for fields)."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from db import is_unavailable
from schemas import PATTERN_RULES

logger = logging.getLogger("users")


def error_response(status_code: int, detail: str, **extra: Any) -> JSONResponse:
    headers = extra.pop("headers", None)
    return JSONResponse({"detail": detail, **extra}, status_code=status_code, headers=headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if detail == HTTPStatus(exc.status_code).phrase:  # Starlette's own 404/405: make it a sentence
        detail = HTTPStatus(exc.status_code).description + "."
    return error_response(exc.status_code, detail, headers=exc.headers)


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ValidationError)
    errors = exc.errors(include_url=False, include_input=False)
    if any(error["type"] == "json_invalid" for error in errors):
        return error_response(400, "Request body is not valid JSON.")
    if any(error["loc"] == () for error in errors):
        return error_response(400, "Request body must be a JSON object.")
    fields: dict[str, str] = {}
    for error in errors:
        field = str(error["loc"][0])  # the models are flat; deeper parts name union branches
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "string_pattern_mismatch":
            message = PATTERN_RULES.get(error.get("ctx", {}).get("pattern", ""), message)
        fields.setdefault(field, message)  # one message per field: the first branch's
    return invalid_fields([{"field": field, "message": message} for field, message in fields.items()])


def invalid_fields(errors: list[dict[str, str]]) -> JSONResponse:
    return error_response(400, "Some fields are missing or invalid.", errors=errors)


async def database_error(request: Request, exc: Exception) -> Response:
    if not is_unavailable(exc):
        raise exc
    logger.warning("database unavailable: %r", exc)
    return error_response(503, "The database is unavailable; try again shortly.", headers={"Retry-After": "2"})


async def server_error(request: Request, exc: Exception) -> Response:
    # uvicorn closes the connection after an unhandled error; say so, or a client that reuses the
    # connection loses its next request.
    return error_response(500, "Internal server error.", headers={"Connection": "close"})
