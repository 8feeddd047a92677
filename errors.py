"""One error shape for every status: `{"detail": "<one sentence>"}` (plus `errors` for fields)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from db import CommitFailed
from engine import is_unavailable
from headers import CLOSE, RETRY_AFTER_SECONDS
from resources import resources
from schemas import PATTERN_RULES

logger = logging.getLogger("users")
MAX_FIELD_ERRORS = 20


def error_response(
    status_code: int,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    background: BackgroundTask | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {"detail": detail, **extra}
    return JSONResponse(body, status_code=status_code, headers=headers, background=background)


def field_error(field: str, message: str) -> ValidationError:
    """A 400 with a field error, for a rule that needs what the body does not hold (rendered by
    validation_error, as the models' own errors are)."""
    return ValidationError.from_exception_data(
        "Input", [{"type": "value_error", "loc": (field,), "input": None, "ctx": {"error": ValueError(message)}}]
    )


class ProofRefused(HTTPException):
    """A well-formed request whose proof is wrong (a current password): 403, naming the field. Not
    a 401, which would tell a client that its token is bad, nor a 400: the request is valid."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(403, "The request is valid, but its proof was refused; nothing was changed.")
        self.errors = [{"field": field, "message": message}]


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if detail == HTTPStatus(exc.status_code).phrase:  # Starlette's own 404/405: make it a sentence
        detail = HTTPStatus(exc.status_code).description + "."
    if isinstance(exc, ProofRefused):
        return error_response(exc.status_code, detail, errors=exc.errors)
    return error_response(exc.status_code, detail, headers=exc.headers)


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ValidationError)
    errors = exc.errors(include_url=False, include_input=False)
    if any(error["type"] == "json_invalid" for error in errors):
        return error_response(400, "Request body is not valid JSON.")
    # A rule across fields (a model validator) names its field in its context.
    named = [(error["loc"][0] if error["loc"] else error.get("ctx", {}).get("field"), error) for error in errors]
    if any(field is None for field, _ in named):
        return error_response(400, "Request body must be a JSON object.")
    fields: dict[str, str] = {}
    for field, error in named:  # the models are flat; deeper parts of a location name union branches
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "string_pattern_mismatch":
            message = PATTERN_RULES.get(error.get("ctx", {}).get("pattern", ""), message)
        fields.setdefault(str(field), message)  # one message per field: the first branch's
    listed = [{"field": field, "message": message} for field, message in fields.items()][:MAX_FIELD_ERRORS]
    if len(fields) > MAX_FIELD_ERRORS:  # a body of thousands of unknown keys gets a short answer
        return error_response(
            400, f"Some fields are missing or invalid (the first {MAX_FIELD_ERRORS} are listed).", errors=listed
        )
    return invalid_fields(listed)


def invalid_fields(errors: list[dict[str, str]]) -> JSONResponse:
    return error_response(400, "Some fields are missing or invalid.", errors=errors)


async def database_error(request: Request, exc: Exception) -> Response:
    if not is_unavailable(exc):
        raise exc
    return unavailable(request, exc, "The database is unavailable; try again shortly.")


def unavailable(request: Request, exc: BaseException, detail: str, **headers: str) -> Response:
    logger.warning("database unavailable: %r", exc)
    if (metrics := resources(request).metrics) is not None:
        metrics.unavailable.inc()
    return error_response(503, detail, headers={"Retry-After": str(RETRY_AFTER_SECONDS), **headers})


async def server_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, CommitFailed) and exc.__cause__ is not None and is_unavailable(exc.__cause__):
        # The connection died under the COMMIT (a failover cut it): the commit may have happened
        # or not, and nobody can tell now. A retry can: a 503 says to make one.
        detail = "The database connection was lost during the commit, which may or may not have happened; retry."
        return unavailable(request, exc.__cause__, detail, **CLOSE)  # as for a 500, below
    # uvicorn closes the connection after an unhandled error; say so, or a client that reuses the
    # connection loses its next request.
    return error_response(500, "Internal server error.", headers=CLOSE)
