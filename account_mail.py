"""The mails an account gets: a link to reset its password, a link to verify its email address, and
a notice of each security change (password changed or reset, email changed). Each is queued in the
caller's transaction (outbox.py): it goes out only if that commits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from starlette.requests import Request

from account_tokens import RESET, VERIFY, AccountTokenStore
from db import DBSession
from models import User
from outbox import queue
from resources import resources

SIGNATURE = "\n\nIf this was not you, reset your password now, or write to the people who run this service.\n"


async def send(session: DBSession, request: Request, kind: str, to: str, subject: str, body: str,
               token_expires_at: datetime | None = None) -> None:  # fmt: skip
    found = resources(request)
    await queue(
        session, found.mailer.wake, kind=kind, sender=found.settings.mail_from, recipient=to,
        subject=f"{found.settings.service_name}: {subject}", body=body, now=datetime.now(UTC),
        token_expires_at=token_expires_at,
    )  # fmt: skip


async def reset_link(session: DBSession, request: Request, user: User) -> None:
    settings = resources(request).settings
    expires = datetime.now(UTC) + timedelta(seconds=settings.password_reset_ttl)
    token = await AccountTokenStore(session).add(RESET, user.id, user.email, expires)
    minutes = settings.password_reset_ttl // 60
    body = (
        f"Someone asked to reset the password of {user.username}. To choose a new one, follow this link within "
        f"{minutes} minutes (it works once):\n\n{settings.app_url}/reset-password?token={token}\n\n"
        "If it was not you, ignore this mail: your password stays as it is."
    )
    await send(session, request, "password_reset", user.email, "reset your password", body, expires)


async def verification_link(session: DBSession, request: Request, user: User, email: str) -> None:
    """A link that proves `email` is the user's (the address now, or the one it is changed to)."""
    settings = resources(request).settings
    expires = datetime.now(UTC) + timedelta(seconds=settings.email_verification_ttl)
    token = await AccountTokenStore(session).add(VERIFY, user.id, email, expires)
    hours = settings.email_verification_ttl // 3600
    body = (
        f"To confirm that {email} is the address of {user.username}, follow this link within {hours} hours "
        f"(it works once):\n\n{settings.app_url}/verify-email?token={token}\n\n"
        "If you did not sign up or change your address, ignore this mail."
    )
    await send(session, request, "email_verification", email, "verify your email address", body, expires)


async def notice(session: DBSession, request: Request, user: User, kind: str, what: str, to: str | None = None) -> None:
    """Tell the owner that `what` happened to their account (at `to`, or their address)."""
    body = f"{what}, for {user.username}, at {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.{SIGNATURE}"
    await send(session, request, kind, to or user.email, what, body)
