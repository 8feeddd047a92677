"""What an operator can do to an account, from the admin API (admin.py) or the command line
(manage.py): each in the caller's transaction, with its event in the security trail."""

from __future__ import annotations

from starlette.requests import Request

from audit import record
from db import DBSession
from models import User
from stores import TokenFamilyStore, UserStore
from throttle import SigninFailureStore


async def disable(session: DBSession, user: User, actor: str, request: Request | None = None) -> str:
    """Disabled: every session ends at once, its signins answer 403 after the right password, its
    public profile is gone."""
    await UserStore(session).set_flags(user.id, disabled=True)
    ended = await TokenFamilyStore(session).end_all(user.id)
    await record(session, "account_disabled", user, request=request, actor=actor, detail=f"{ended} sessions ended")
    return f"{user.username} is disabled; {ended} sessions ended"


async def enable(session: DBSession, user: User, actor: str, request: Request | None = None) -> str:
    await UserStore(session).set_flags(user.id, disabled=False)
    await record(session, "account_enabled", user, request=request, actor=actor)
    return f"{user.username} is enabled"


async def end_sessions(session: DBSession, user: User, actor: str, request: Request | None = None) -> str:
    ended = await TokenFamilyStore(session).end_all(user.id)
    await record(session, "session_ended", user, request=request, actor=actor, detail=f"every session, {ended}")
    return f"{ended} sessions of {user.username} ended"


async def grant_admin(session: DBSession, user: User, actor: str, request: Request | None = None) -> str:
    await UserStore(session).set_flags(user.id, is_admin=True)
    await record(session, "admin_granted", user, request=request, actor=actor)
    return f"{user.username} is an administrator"


async def revoke_admin(session: DBSession, user: User, actor: str, request: Request | None = None) -> str:
    await UserStore(session).set_flags(user.id, is_admin=False)
    await record(session, "admin_revoked", user, request=request, actor=actor)
    return f"{user.username} is no longer an administrator"


async def clear_throttle(session: DBSession, user: User, actor: str, request: Request | None = None) -> str:
    """The account's failed-signin counts forgotten (the account's, its pairs' and its devices'),
    for an owner locked out by someone else's guesses."""
    await SigninFailureStore(session).forget(user.username_key)
    await record(session, "throttle_cleared", user, request=request, actor=actor)
    return f"the signin throttle of {user.username} is cleared"


async def delete(session: DBSession, user: User, actor: str, request: Request | None = None) -> str:
    await record(session, "account_deleted", user, request=request, actor=actor)  # first: it keeps the username
    await UserStore(session).delete_user(user.id)
    return f"{user.username} is deleted"
