"""Request and response models: one place that validates input and shapes output."""

from __future__ import annotations

import string
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field, StringConstraints

USERNAME_PATTERN = r"^[a-zA-Z0-9_-]{3,20}$"
# Fixed paths under /api/users; a user with one of these names could never be looked up.
RESERVED_USERNAMES = frozenset({"me", "signup", "signin", "refresh", "signout"})


def _not_reserved(username: str) -> str:
    if username in RESERVED_USERNAMES:
        raise ValueError("this username is reserved")
    return username


def _mixed(password: str) -> str:
    classes = (string.ascii_uppercase, string.ascii_lowercase, string.digits)
    kinds = {next((i for i, chars in enumerate(classes) if c in chars), 3) for c in password}
    if len(kinds) < 2:
        raise ValueError("password needs at least two of: uppercase, lowercase, digit, other")
    return password


UsernameField = Annotated[str, StringConstraints(pattern=USERNAME_PATTERN)]
NewUsername = Annotated[UsernameField, AfterValidator(_not_reserved)]
Password = Annotated[str, StringConstraints(min_length=8, max_length=20), AfterValidator(_mixed)]


class Signup(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    username: NewUsername
    password: Password
    email: EmailStr


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=20, ge=1, le=100)
    after: UsernameField | None = None


class PublicProfile(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    username: str
    created_at: datetime


class PrivateProfile(PublicProfile):
    email: str
    address: str | None
    phone_number: str | None


class Page(BaseModel):
    items: list[PublicProfile]
    next: str | None
