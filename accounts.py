"""The routes that make and end sessions: signup, signin (by username or email), refresh and
signout. A session is a token family, one per signin (docs/accounts.md).

A signin reads what it needs in a short transaction of its own, hashes holding nothing, and then
writes through the request's session with a conditional statement (docs/hashing.md).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import IntegrityError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from account_mail import verification_link
from audit import Origin, purge, record
from auth import bad_credentials, no_longer_valid, revoked, token_claims
from breaches import BREACHED
from db import DBSession, database, transaction
from errors import error_response, field_error
from models import IDENTIFIER_LENGTH, TokenFamily, User, email_key
from openapi import BODY_ERRORS, Operation
from resources import resources
from responses import PrivateProfile, SigninTokens, TokenPair, model_response
from schemas import Signin, Signup, read_json_body
from stores import TokenFamilyStore, UserStore, taken_key
from throttle import Rule, address_key, count_attempt, count_signup, signin_rules
from tokens import Claims, unauthorized


async def signup(request: Request) -> Response:
    data = Signup.model_validate_json(await read_json_body(request), context=resources(request).password_rules)
    await count_signup(request)  # a 429 here costs no hash
    if await resources(request).breaches.breached(data.password):
        raise field_error("password", BREACHED)
    password_hash = await resources(request).hashing.hash(data.password)
    session = request.state.session
    try:
        user = await UserStore(session).create(username=data.username, email=data.email, password_hash=password_hash)
    except IntegrityError as error:
        # The unique constraints decide, so two racing signups cannot both win.
        raise HTTPException(
            409, f"{(await taken(request, error, data.username)).capitalize()} already exists"
        ) from None
    await verification_link(session, request, user, user.email)
    await record(session, "signup", user, request=request)
    await purge(session, resources(request).settings.audit_retention_days)
    return model_response(PrivateProfile.model_validate(user), 201, private=True)


async def taken(request: Request, error: IntegrityError, username: str) -> str:
    """What a signup's 409 names: the username, if it is taken (even when the error names the
    email: which constraint SQLite checks first depends on how its table was last rebuilt)."""
    if taken_key(error) == "username":
        return "username"
    async with transaction(database(request).reads) as session:  # the request's transaction failed
        return "username" if await UserStore(session).username_taken(username) else "email"


async def find_account(request: Request, identifier: str) -> tuple[User | None, str]:
    """The user a signin names (a username, or an email address: usernames have no @), read in a
    short transaction of its own, so that nothing is held while the hash runs; and the key the
    throttle counts the account by, the same for a name that matches nobody."""
    async with transaction(database(request).reads) as session:
        store = UserStore(session)
        user = await (store.get_by_email(identifier) if "@" in identifier else store.get_by_username(identifier))
    if user is not None:
        return user, user.username_key
    return None, (email_key(identifier) if "@" in identifier else identifier.lower())[:IDENTIFIER_LENGTH]


async def signin(request: Request) -> Response:
    data = Signin.model_validate_json(await read_json_body(request))
    found = resources(request)
    user, account = await find_account(request, data.username)
    device = found.tokens.device(data.device_token, user.id) if user else None

    async def went_over(session: DBSession, rule: Rule) -> None:
        detail = f"{rule.kind} rule: {'address' if not rule.username else 'account' if not rule.address else 'pair'}"
        await record(session, "signin_throttled", user, request=request, username=data.username, detail=detail)

    rules = signin_rules(found.settings, address_key(request), account, device)
    attempt = await count_attempt(request, rules, went_over=went_over)  # a 429 here costs no hash
    matches, rehash = await found.hashing.verify(user.password_hash if user else None, data.password)
    if not matches:
        async with transaction(database(request).writes) as session:  # said whatever the answer: committed now
            await record(session, "signin_failed", user, request=request, username=data.username)
            await purge(session, found.settings.audit_retention_days)
        raise bad_credentials()
    assert user is not None
    if refusal := refused_signin(user, found.settings.require_verified_email):
        # Said only after the right password: a guesser learns nothing.
        async with transaction(database(request).writes) as session:  # committed although the answer is a 403
            await attempt.succeeded(session)  # the password was right: not a failure
            await record(session, "signin_failed", user, request=request, detail=refusal.detail)
        raise refusal
    new_hash = await found.hashing.hash(data.password) if rehash else None
    session = request.state.session
    # Only if the hash just verified is still the user's: a password change may have committed meanwhile.
    signed_in = await UserStore(session).signed_in(user.id, user.password_hash, new_hash)
    if signed_in is None:
        raise bad_credentials()
    version, disabled = signed_in
    if disabled:  # meanwhile (this request holds the write lock now: its count stays)
        raise HTTPException(403, DISABLED)
    family, origin = uuid.uuid4().hex, Origin.of(request)  # this signin's tokens, refreshed or not, are one family
    expiry = min(found.tokens.family_expiry(), session_end(datetime.now(UTC), request))
    await TokenFamilyStore(session).start(family, user.id, expiry, origin.user_agent, origin.address)
    await attempt.succeeded(session, clear=True)
    await record(session, "signin", user, request=request)
    pair = found.tokens.issue(user.id, version, family, 0)
    return model_response(SigninTokens(**pair, device_token=found.tokens.device_token(user.id)), private=True)


DISABLED = "This account is disabled."


def refused_signin(user: User, require_verified_email: bool) -> HTTPException | None:
    """Why an account with the right password may not sign in: disabled, or (REQUIRE_VERIFIED_EMAIL)
    its address not verified yet."""
    if user.disabled:
        return HTTPException(403, DISABLED)
    if require_verified_email and not user.email_verified:
        return HTTPException(403, "Verify your email address first: follow the link of the mail we sent.")
    return None


def session_end(created_at: datetime, request: Request) -> datetime:
    """When a session started then stops refreshing (SESSION_MAX_AGE), leeway included."""
    settings = resources(request).settings
    return created_at + timedelta(seconds=settings.session_max_age + settings.token_leeway)


async def end_family(
    request: Request, claims: Claims, event: str = "refresh_reused", detail: str = "its refresh token was used again"
) -> None:
    """End the family of a refresh token that was presented again after it had been rotated: it
    has been copied, and nobody can tell the thief's copy from the owner's, so neither may go on.

    The other place (beside throttle.count_attempt) where the service writes whatever the request
    answers (a reuse is a 401): in a short transaction of its own, committed at once.
    """
    async with transaction(database(request).writes) as session:
        if await TokenFamilyStore(session).end(claims.family, claims.user_id):
            await record(session, event, await session.get(User, claims.user_id), request=request, detail=detail)


def reuse_forgiven(family: TokenFamily, claims: Claims, request: Request) -> bool:
    """A refresh token of the generation just rotated away, presented within REFRESH_REUSE_GRACE of
    that rotation: a client whose answer was lost, or a second tab, not a thief."""
    grace = timedelta(seconds=resources(request).settings.refresh_reuse_grace)
    return (
        claims.generation == family.generation - 1
        and family.rotated_at is not None
        and datetime.now(UTC) - family.rotated_at <= grace
    )


async def family_of(request: Request, claims: Claims) -> TokenFamily:
    """The live family of the request's refresh token, if the token is its newest (or was, within
    the grace); otherwise a 401, and for a reuse or an expired session the family ends.

    A short read of its own, before the request's transaction begins: on SQLite that transaction
    would hold the write lock that ending the family needs.
    """
    async with transaction(database(request).reads) as session:
        family = await TokenFamilyStore(session).get(claims.family, claims.user_id)
    if family is None:
        raise revoked()
    if session_end(family.created_at, request) <= datetime.now(UTC):
        await end_family(request, claims, "session_ended", "it reached SESSION_MAX_AGE")
        raise unauthorized("The session has expired; sign in again")
    if claims.generation != family.generation and not reuse_forgiven(family, claims, request):
        await end_family(request, claims)
        raise revoked()
    return family


def lost_a_race(request: Request, claims: Claims) -> Response:
    """The same refresh token, used twice at once, past the grace, and the other use came first: a
    reuse too. The family ends once this answer is sent (its own session: this request holds a
    write lock)."""
    task = BackgroundTask(end_family, request, claims)
    return error_response(401, "Token has been revoked", headers=revoked().headers, background=task)


async def refresh(request: Request) -> Response:
    claims = token_claims(request, "refresh")
    family = await family_of(request, claims)
    tokens = resources(request).tokens
    families = TokenFamilyStore(request.state.session)
    expiry = min(tokens.family_expiry(), session_end(family.created_at, request))
    generation = None
    if claims.generation == family.generation:  # conditional: of two at once, one rotates
        generation = await families.rotate(claims.family, claims.user_id, claims.generation, expiry)
    if generation is None:  # forgiven, or another rotation came first: what it made, if forgiven
        current = await families.get(claims.family, claims.user_id)
        if current is None or not reuse_forgiven(current, claims, request):
            return lost_a_race(request, claims)
        generation = current.generation  # the same line of generations: the family never forks
    user = await UserStore(request.state.session).current(claims.user_id, claims.version, claims.family)
    if user is None:
        raise no_longer_valid()
    pair = tokens.issue(user.id, user.token_version, claims.family, generation)
    return model_response(TokenPair.model_validate(pair), private=True)


async def signout(request: Request) -> Response:
    claims = token_claims(request, "refresh")
    await family_of(request, claims)
    session = request.state.session
    if not await TokenFamilyStore(session).end(claims.family, claims.user_id):
        raise revoked()  # ended meanwhile
    await record(session, "signout", await session.get(User, claims.user_id), request=request)
    return Response(status_code=204)  # the family has ended: its access tokens stop working too


SIGNUP_LINKS = {
    "GetUser": {"operationId": "getUser", "parameters": {"path.username": "$response.body#/username"}},
    "Signin": {
        "operationId": "signin",
        "requestBody": {"username": "$request.body#/username", "password": "$request.body#/password"},
    },
}

# Fixed paths, before /api/users/{username} (app.py lists these first: Starlette takes the first match).
OPERATIONS = (
    Operation(
        "POST", "/api/users/signup", signup, "signup", "Create a user", "accounts", 201, PrivateProfile,
        (*BODY_ERRORS, 409, 429), body=Signup, links=SIGNUP_LINKS,
        error_notes={
            400: "The body is malformed or a field is invalid, or the password contains the username or the "
            "email's local part (a rule across fields, which JSON Schema cannot state); nothing was written."
        },
    ),
    Operation(
        "POST", "/api/users/signin", signin, "signin",
        "Sign in with a username or an email address: a session's access and refresh tokens", "accounts",
        200, SigninTokens, (*BODY_ERRORS, 401, 403, 429), body=Signin,
        error_notes={403: "The password is right, but the account is disabled, or its email address is not verified "
                     "yet and REQUIRE_VERIFIED_EMAIL is on."},
    ),
    Operation(
        "POST", "/api/users/refresh", refresh, "refresh",
        "Trade a refresh token for a new pair (the presented one is spent)", "sessions", 200, TokenPair, (401,),
        auth=True,
    ),
    Operation(
        "POST", "/api/users/signout", signout, "signout",
        "Sign out: end this signin's session (its refresh and access tokens stop working)", "sessions", 204, None,
        (401,), auth=True,
    ),
)  # fmt: skip
