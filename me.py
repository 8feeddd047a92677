"""The routes of a signed-in user's own account: /api/users/me, its password, its sessions and its
security history.

What cannot be undone (a new password or email, deleting the account) takes the current password
again: read in a short transaction of its own, hashed holding nothing (docs/hashing.md), counted
by the throttle like a signin.
"""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from account_mail import notice, verification_link
from audit import AuditStore, record
from auth import authenticate, no_longer_valid, token_claims, token_user
from breaches import BREACHED
from errors import ProofRefused, field_error
from models import User
from openapi import BODY_ERRORS, Operation
from resources import resources
from responses import EventPage, PrivateProfile, Sessions, SessionView, event_page, model_response
from schemas import AccountDeletion, EventsQuery, PasswordChange, ProfileUpdate, read_json_body
from stores import TokenFamilyStore, UserStore
from throttle import Attempt, Rule, address_key, count_attempt, signin_rules


async def get_me(request: Request) -> Response:
    user, _ = await authenticate(request, "access")
    return model_response(PrivateProfile.model_validate(user), private=True)


async def prove_password(request: Request, user: User, password: str, field: str) -> Attempt:
    """Re-authentication: nothing, if `password` is the user's; otherwise a 403 naming `field` (the
    token was good, so not a 401: a client that treats 401 as "signed out" would drop its session
    over a typo)."""
    settings = resources(request).settings
    attempt = await count_attempt(request, signin_rules(settings, address_key(request), user.username_key))
    matches, _ = await resources(request).hashing.verify(user.password_hash, password)
    if not matches:
        raise ProofRefused(field, "is not your current password")
    return attempt


async def update_me(request: Request) -> Response:
    claims = token_claims(request, "access")
    data = ProfileUpdate.model_validate_json(await read_json_body(request))
    changes = data.model_dump(exclude_unset=True, exclude={"password"})
    attempts, user = [], None
    if data.password is not None:  # required with an email: a stolen token must not move the account
        user = await token_user(request, claims)
        attempts.append(await prove_password(request, user, data.password, "password"))
        if "email" in changes:  # "Email already exists" tells whether an address is registered: counted too
            settings = resources(request).settings
            rule = Rule("email", address_key(request), user.username_key, settings.signin_failure_limit,
                        settings.signin_failure_window)  # fmt: skip
            attempts.append(await count_attempt(request, [rule]))
    session = request.state.session
    try:
        updated = await UserStore(session).update(claims.user_id, claims.version, claims.family, changes)
    except IntegrityError:
        raise HTTPException(409, "Email already exists") from None
    if updated is None:
        raise no_longer_valid()
    for attempt in attempts:  # they were not failures: taken back if this answer commits
        await attempt.succeeded(session)
    if user is not None and "email" in changes and changes["email"] != user.email:
        await verification_link(session, request, updated, updated.email)
        what = f"Your email address was changed to {updated.email}"
        await notice(session, request, updated, "email_changed_notice", what, to=user.email)  # the old address
        await record(session, "email_changed", updated, request=request, detail=f"from {user.email}")
    return model_response(PrivateProfile.model_validate(updated), private=True)


async def change_password(request: Request) -> Response:
    claims = token_claims(request, "access")
    found = resources(request)
    data = PasswordChange.model_validate_json(await read_json_body(request), context=found.password_rules)
    user = await token_user(request, claims)
    if refusal := found.password_rules.context_refusal(data.new_password, user.username, user.email):
        raise field_error("new_password", refusal)
    if await found.breaches.breached(data.new_password):
        raise field_error("new_password", BREACHED)
    attempt = await prove_password(request, user, data.old_password, "old_password")
    new_hash = await found.hashing.hash(data.new_password)
    # Only if the token still holds: a racing change or deletion that committed first makes this
    # one fail (and has ended this token) instead of being overwritten.
    session = request.state.session
    if not await UserStore(session).change_password(user.id, claims.version, claims.family, new_hash):
        raise no_longer_valid()
    await TokenFamilyStore(session).end_all(user.id)  # every earlier token is dead already
    await attempt.succeeded(session)
    await notice(session, request, user, "password_changed_notice", "Your password was changed")
    await record(session, "password_changed", user, request=request, detail="every session ended")
    return Response(status_code=204)


async def delete_me(request: Request) -> Response:
    claims = token_claims(request, "access")
    body = await request.body()  # no body at all is a missing password, not a wrong content type
    data = AccountDeletion.model_validate_json(await read_json_body(request) if body else b"{}")
    user = await token_user(request, claims)
    attempt = await prove_password(request, user, data.password, "password")
    session = request.state.session
    await record(session, "account_deleted", user, request=request)  # first: the row keeps the username
    if not await UserStore(session).delete(claims.user_id, claims.version, claims.family):
        raise no_longer_valid()
    await attempt.succeeded(session, clear=True)
    return Response(status_code=204)  # its families went with it: every token it had stops working


# --- sessions and history ---------------------------------------------------------------------------


async def my_sessions(request: Request) -> Response:
    user, claims = await authenticate(request, "access")
    families = await TokenFamilyStore(request.state.session).of_user(user.id)
    items = [
        SessionView(
            id=family.id, created_at=family.created_at, last_used_at=family.last_used_at,
            user_agent=family.user_agent, address=family.address, current=family.id == claims.family,
        )
        for family in families
    ]  # fmt: skip
    return model_response(Sessions(items=items), private=True)


async def end_my_session(request: Request) -> Response:
    user, _ = await authenticate(request, "access")
    session = request.state.session
    if not await TokenFamilyStore(session).end(request.path_params["id"], user.id):
        raise HTTPException(404, "No such session")  # another account's is no such session either
    await record(session, "session_ended", user, request=request, detail="by its owner")
    return Response(status_code=204)


async def end_my_other_sessions(request: Request) -> Response:
    user, claims = await authenticate(request, "access")
    session = request.state.session
    ended = await TokenFamilyStore(session).end_all(user.id, but=claims.family)
    await record(session, "session_ended", user, request=request, detail=f"every other session, {ended}")
    return Response(status_code=204)


async def my_events(request: Request) -> Response:
    query = EventsQuery.model_validate(dict(request.query_params))
    user, _ = await authenticate(request, "access")
    events = await AuditStore(request.state.session).page(user_id=user.id, after=query.after, limit=query.limit + 1)
    return model_response(event_page(events, query.limit), private=True)


# Fixed paths, before /api/users/{username} (app.py lists these first: Starlette takes the first match).
OPERATIONS = (
    Operation(
        "GET", "/api/users/me", get_me, "getMe", "Your private profile", "accounts", 200, PrivateProfile, (401,),
        auth=True,
    ),
    Operation(
        "PATCH", "/api/users/me", update_me, "updateMe",
        "Change your email (with your password), address or phone number", "accounts", 200, PrivateProfile,
        (*BODY_ERRORS, 401, 403, 409, 429), body=ProfileUpdate, auth=True,
        error_notes={
            400: "The body is malformed, a field is invalid, or password is missing; no change.",
            403: "password is not your current password; no change.",
        },
    ),
    Operation(
        "DELETE", "/api/users/me", delete_me, "deleteMe", "Delete your account (takes its password)", "accounts",
        204, None, (*BODY_ERRORS, 401, 403, 429), body=AccountDeletion, auth=True,
        error_notes={
            400: "The body is malformed, or password is missing; nothing was written.",
            403: "password is not your current password; nothing was written.",
        },
    ),
    Operation(
        "PUT", "/api/users/me/password", change_password, "changePassword",
        "Change your password (every session ends)", "accounts", 204, None, (*BODY_ERRORS, 401, 403, 429),
        body=PasswordChange, auth=True,
        error_notes={403: "old_password is not your current password; nothing was written."},
    ),
    Operation(
        "GET", "/api/users/me/sessions", my_sessions, "listMySessions", "Your live sessions, newest first",
        "sessions", 200, Sessions, (401,), auth=True,
    ),
    Operation(
        "DELETE", "/api/users/me/sessions", end_my_other_sessions, "endMyOtherSessions",
        "Sign out everywhere else: end every session but this one", "sessions", 204, None, (401,), auth=True,
    ),
    Operation(
        "DELETE", "/api/users/me/sessions/{id}", end_my_session, "endMySession",
        "End one of your sessions: its refresh and access tokens stop working at once", "sessions", 204, None,
        (401, 404), auth=True, error_notes={404: "You have no session with this id."},
    ),
    Operation(
        "GET", "/api/users/me/events", my_events, "listMyEvents", "Your security history, newest first",
        "sessions", 200, EventPage, (400, 401), query=EventsQuery, auth=True,
    ),
)  # fmt: skip
