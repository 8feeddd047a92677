"""Request and response models: they validate input, shape output and describe both in OpenAPI."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException
from starlette.requests import Request

from models import EVENTS
from password_rules import MAX_LENGTH, PasswordRules, normalized

# Fixed paths under /api/users; a user with one of these names could never be looked up.
RESERVED_USERNAMES = ("me", "signup", "signin", "refresh", "signout", "password-reset", "verify-email")
USERNAME_PATTERN = r"^[a-zA-Z0-9_-]{3,20}$"
PHONE_PATTERN = r"^010[0-9]{8}$"
NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f\x7f]*$"


def _password_rules(password: str, info: ValidationInfo) -> str:
    """The length rule and the blocklist, with the service's settings (the validation context's
    PasswordRules: routes pass theirs)."""
    rules = info.context if isinstance(info.context, PasswordRules) else PasswordRules()
    if (refusal := rules.refusal(password)) is not None:
        raise ValueError(refusal)
    return password


def _not_reserved(username: str) -> str:
    if username in RESERVED_USERNAMES:
        raise ValueError("this username is reserved")
    return username


Username = Annotated[str, StringConstraints(pattern=USERNAME_PATTERN)]
NewUsername = Annotated[
    Username, AfterValidator(_not_reserved), Field(json_schema_extra={"not": {"enum": list(RESERVED_USERNAMES)}})
]
# Any characters but control characters (no composition rule); the minimum length and the blocklist
# come from the service's PasswordRules (and reach the document through openapi.py).
Password = Annotated[
    str,
    StringConstraints(max_length=MAX_LENGTH, pattern=NO_CONTROL_CHARACTERS),
    AfterValidator(_password_rules),
    Field(json_schema_extra={"not": {"$ref": "#/components/schemas/CommonPassword"}}),
]
Address = Annotated[str, StringConstraints(max_length=100, pattern=NO_CONTROL_CHARACTERS)]
PhoneNumber = Annotated[str, StringConstraints(pattern=PHONE_PATTERN)]
AnyPassword = Annotated[str, StringConstraints(max_length=100)]  # checked against the hash, not the rules


def _absent_default(schema: dict[str, Any]) -> None:
    del schema["default"]  # absent, not null: a null default would contradict the field's type


class Input(BaseModel):
    # Strict JSON types, and unknown fields are an error: a typo in a curl command gets noticed.
    model_config = ConfigDict(extra="forbid", strict=True)


EMAIL_RULE = "A deliverable address: special-use domains such as .test, .local or .invalid are refused."
# What email-validator accepts, said in JSON Schema so that clients and fuzzers know it too: a
# dot-atom before the @ (no quotes, no specials), a domain of dotted labels with a letter TLD (no
# IP literal), and not a special-use name (RFC 6761) at its end.
_ATOM = r"[^\x00-\x20\x22\x7f-\x9f(),.:;<>@\[\\\]]+"
_LABEL = r"[A-Za-z0-9\u00a1-\uffff](?:[A-Za-z0-9\u00a1-\uffff-]{0,61}[A-Za-z0-9\u00a1-\uffff])?"
EMAIL_PATTERN = rf"^{_ATOM}(?:\.{_ATOM})*@(?:{_LABEL}\.)+[A-Za-z\u00a1-\uffff]{{2,63}}$"
SPECIAL_USE_DOMAIN = r"\.(?:{})$".format(
    "|".join("".join(f"[{c.upper()}{c}]" for c in name) for name in sorted(SPECIAL_USE_DOMAIN_NAMES))
)


# What each pattern means, for error messages a person can act on.
PATTERN_RULES = {
    USERNAME_PATTERN: "use 3 to 20 letters, digits, '_' or '-'",
    PHONE_PATTERN: "use 010 followed by 8 digits",
    NO_CONTROL_CHARACTERS: "control characters are not allowed",
    EMAIL_PATTERN: "use an address such as name@example.com (no quotes, no IP address after the @)",
}


def _deliverable(email: str) -> str:
    try:
        return str(validate_email(email, check_deliverability=False).normalized)
    except EmailNotValidError as exc:
        raise ValueError(f"value is not a valid email address: {exc}") from None


Email = Annotated[
    str,
    StringConstraints(max_length=254, pattern=EMAIL_PATTERN),
    AfterValidator(_deliverable),
    Field(description=EMAIL_RULE, json_schema_extra={"format": "email", "not": {"pattern": SPECIAL_USE_DOMAIN}}),
]


def context_error(field: str, refusal: str) -> PydanticCustomError:
    return PydanticCustomError("password_context", refusal, {"field": field})


class Signup(Input):
    username: NewUsername
    password: Password
    email: Email

    @model_validator(mode="after")
    def _password_is_not_of_its_context(self, info: ValidationInfo) -> Signup:
        rules = info.context if isinstance(info.context, PasswordRules) else PasswordRules()
        if (refusal := rules.context_refusal(self.password, self.username, self.email)) is not None:
            raise context_error("password", refusal)
        return self


class Signin(Input):
    # Any string a username could be, and more (a wrong one is a 401, not a 400); never empty.
    username: Annotated[str, StringConstraints(min_length=1, max_length=254, pattern=NO_CONTROL_CHARACTERS)] = Field(
        description="A username, or the account's email address."
    )
    password: AnyPassword
    device_token: Annotated[str, StringConstraints(max_length=2048)] | SkipJsonSchema[None] = Field(
        default=None,
        description="The `device_token` of an earlier signin of this account on this device: it lets the signin "
        "past the throttles that other addresses' failures set off.",
        json_schema_extra=_absent_default,
    )


def _email_is_optional_not_null(schema: dict[str, Any]) -> None:
    for field in ("email", "password"):
        del schema["properties"][field]["default"]  # absent is no change; null is refused
    schema["dependentRequired"] = {"email": ["password"]}


class ProfileUpdate(Input):
    """Any of the three; `address` and `phone_number` may be null to clear them. Changing the
    email takes the account's `password` too (re-authentication: a stolen token alone must not
    move the account to another address)."""

    model_config = ConfigDict(json_schema_extra=_email_is_optional_not_null)

    email: Email | SkipJsonSchema[None] = None
    address: Address | None = None
    phone_number: PhoneNumber | None = None
    password: AnyPassword | SkipJsonSchema[None] = None

    @model_validator(mode="after")
    def _email_takes_the_password(self) -> ProfileUpdate:
        if "email" in self.model_fields_set and self.password is None:
            raise PydanticCustomError("missing", "is required to change the email", {"field": "password"})
        return self

    @field_validator("email")
    @classmethod
    def _email_not_null(cls, email: str | None) -> str:
        if email is None:
            raise ValueError("email cannot be null")
        return email


class PasswordChange(Input):
    old_password: AnyPassword
    new_password: Password

    @model_validator(mode="after")
    def _new_is_new(self) -> PasswordChange:
        if normalized(self.new_password) == normalized(self.old_password):
            raise PydanticCustomError("same_password", "must differ from the old one", {"field": "new_password"})
        return self


class AccountDeletion(Input):
    """What deleting the account takes: its password (re-authentication, as for a new email)."""

    password: AnyPassword


Token = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=NO_CONTROL_CHARACTERS)]


class PasswordResetRequest(Input):
    email: Email


class PasswordResetConfirm(Input):
    token: Token = Field(description="The token of the link in the password reset mail.")
    new_password: Password


class EmailProof(Input):
    token: Token = Field(description="The token of the link in the verification mail.")


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=20, ge=1, le=100)
    after: Username | None = None


class AdminUsersQuery(ListQuery):
    q: Annotated[str, StringConstraints(max_length=254, pattern=NO_CONTROL_CHARACTERS)] | None = Field(
        default=None, description="Only users whose username or email starts with this, in any case."
    )


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=20, ge=1, le=100)
    after: int | None = Field(default=None, ge=1, le=2**63 - 1, description="The previous page's `next`: older events.")


class AdminEventsQuery(EventsQuery):
    user: Annotated[str, StringConstraints(max_length=254, pattern=NO_CONTROL_CHARACTERS)] | None = Field(
        default=None, description="Only the events of this username (as it was)."
    )
    event: Literal[EVENTS] | None = Field(default=None, description="Only events of this kind.")  # type: ignore[valid-type]


async def read_json_body(request: Request) -> bytes:
    """The body of a JSON request (RequestLimitsMiddleware has read it already, within its limits)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise HTTPException(415, "Content-Type must be application/json.")
    return await request.body()
