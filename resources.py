"""What the lifespan makes for the routes, beside the Database (db.py): one typed object, reached
with `resources(request)`."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from starlette.requests import Request

from breaches import BreachCheck
from mailer import Mailer
from metrics import Metrics
from migrate import SchemaRevisions
from password_rules import PasswordRules
from passwords import Hashing
from settings import Settings
from tokens import Tokens


@dataclass(frozen=True)
class Resources:
    settings: Settings
    tokens: Tokens
    hashing: Hashing  # Argon2id, about one password hash per CPU at a time
    schema: SchemaRevisions  # what /readyz compares the database with
    metrics: Metrics | None  # None with METRICS=false
    draining: threading.Event  # set by SIGTERM: /readyz answers 503 from then on
    password_rules: PasswordRules  # what a new password must meet (the validation context of its models)
    breaches: BreachCheck  # the breached-password lookup (does nothing without PWNED_PASSWORDS_URL)
    mailer: Mailer  # the delivery loop: its wake() after a commit that queued mail


def resources(request: Request) -> Resources:
    made: Resources = request.state.resources
    return made
