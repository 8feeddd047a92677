"""What the API answers: the response models (their JSON Schema is the OpenAPI document's), and
the one way a route turns a model into a response."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema
from starlette.responses import Response

from headers import NO_STORE


def _absent_default(schema: dict[str, Any]) -> None:
    del schema["default"]  # absent, not null: a null default would contradict the field's type


class PublicProfile(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    username: str
    created_at: datetime


class PrivateProfile(PublicProfile):
    email: str
    email_verified: bool = Field(description="Whether the address was proved, by the link of a verification mail.")
    address: str | None
    phone_number: str | None


class Accepted(BaseModel):
    detail: str


class Page(BaseModel):
    items: list[PublicProfile]
    next: str | None = Field(description="Pass as `after` to get the next page; null on the last page.")


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"]


class SigninTokens(TokenPair):
    device_token: str = Field(description="Keep it, and send it with this account's next signin on this device.")


class FieldError(BaseModel):
    field: str
    message: str


class Error(BaseModel):
    """The body of every error response."""

    detail: str
    errors: list[FieldError] | SkipJsonSchema[None] = Field(
        default=None, description="Only for invalid fields.", json_schema_extra=_absent_default
    )


class JsonWebKey(BaseModel):
    """A public key (RFC 7517): `crv`, `x` and `y` for EC and OKP keys, `n` and `e` for RSA."""

    kty: Literal["EC", "OKP", "RSA"]
    kid: str = Field(description="The key's RFC 7638 thumbprint, as in the header of the tokens it signed.")
    alg: Literal["ES256", "EdDSA", "RS256"]
    use: Literal["sig"]
    crv: str | SkipJsonSchema[None] = Field(default=None, json_schema_extra=_absent_default)
    x: str | SkipJsonSchema[None] = Field(default=None, json_schema_extra=_absent_default)
    y: str | SkipJsonSchema[None] = Field(default=None, json_schema_extra=_absent_default)
    n: str | SkipJsonSchema[None] = Field(default=None, json_schema_extra=_absent_default)
    e: str | SkipJsonSchema[None] = Field(default=None, json_schema_extra=_absent_default)


class KeySet(BaseModel):
    keys: list[JsonWebKey]


class Status(BaseModel):
    status: str


class Readiness(Status):
    revision: str = Field(description="The schema revision the database is at (Alembic's).")


class AdminUser(PrivateProfile):
    is_admin: bool
    disabled: bool
    last_signin_at: datetime | None


class AdminPage(BaseModel):
    items: list[AdminUser]
    next: str | None = Field(description="Pass as `after` to get the next page; null on the last page.")


class SessionView(BaseModel):
    """A session: one signin's token family."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    created_at: datetime = Field(description="When its signin was.")
    last_used_at: datetime = Field(description="Its signin, or its latest refresh.")
    user_agent: str | None
    address: str | None
    current: bool = Field(description="The session of the token that asked.")


class Sessions(BaseModel):
    items: list[SessionView]


class EventView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    event: str
    user_id: int | None
    username: str | None = Field(description="As it was, or, for a failed signin, as it was typed.")
    address: str | None
    user_agent: str | None
    actor: str | None = Field(description="The operator, for what an operator did.")
    detail: str | None


class EventPage(BaseModel):
    items: list[EventView]
    next: int | None = Field(description="Pass as `after` to get the next (older) page; null on the last page.")


def event_page(events: Sequence[Any], limit: int) -> EventPage:
    """A page of events, of a query for one more than `limit` (whether there is a next page)."""
    items = [EventView.model_validate(event) for event in events[:limit]]
    return EventPage(items=items, next=items[-1].id if len(events) > limit else None)


def model_response(model: BaseModel, status_code: int = 200, *, private: bool = False) -> Response:
    """`private`: the body holds tokens or private data, which no cache may keep."""
    headers = NO_STORE if private else None
    return Response(model.model_dump_json(), status_code=status_code, headers=headers, media_type="application/json")
