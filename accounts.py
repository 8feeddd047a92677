"""The account routes: signup, signin, refresh and signout (token families), and /me.

Each route that checks a password reads what it needs in a short transaction of its own, hashes
holding nothing, and then writes through the request's session with a conditional statement
(docs/hashing.md). Tokens come in families, one per signin (docs/accounts.md).
"""

from __future__ import annotations

import uuid

from sqlalchemy.exc import IntegrityError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from auth import authenticate, bad_credentials, no_longer_valid, revoked, token_claims
from breaches import BREACHED
from db import Database, database, transaction
from errors import ProofRefused, error_response, field_error
from models import User
from openapi import BODY_ERRORS, Operation
from passwords import hash_password, verify_password
from resources import resources
from schemas import (
    AccountDeletion,
    PasswordChange,
    PrivateProfile,
    ProfileUpdate,
    Signin,
    SigninTokens,
    Signup,
    TokenPair,
    model_response,
    read_json_body,
)
from stores import TokenFamilyStore, UserStore, taken_key
from throttle import Attempt, Rule, address_key, count_attempt, count_signup, signin_rules
from tokens import Claims


async def signup(request: Request) -> Response:
    data = Signup.model_validate_json(await read_json_body(request), context=resources(request).password_rules)
    await count_signup(request)  # a 429 here costs no hash
    if await resources(request).breaches.breached(data.password):
        raise field_error("password", BREACHED)
    password_hash = await hash_password(data.password, resources(request).hash_limiter)
    store = UserStore(request.state.session)
    try:
        user = await store.create(username=data.username, email=data.email, password_hash=password_hash)
    except IntegrityError as error:
        # The unique constraints decide, so two racing signups cannot both win.
        raise HTTPException(409, f"{taken_key(error).capitalize()} already exists") from None
    return model_response(PrivateProfile.model_validate(user), 201, private=True)


async def signin(request: Request) -> Response:
    data = Signin.model_validate_json(await read_json_body(request))
    found = resources(request)
    # A short read of its own, so that no connection or transaction is held while the hash runs.
    async with transaction(database(request).reads) as session:
        user = await UserStore(session).get_by_username(data.username)
    device = found.tokens.device(data.device_token, user.id) if user else None
    account = user.username_key if user else data.username.lower()
    rules = signin_rules(found.settings, address_key(request), account, device)
    attempt = await count_attempt(request, rules)  # a 429 here costs no hash
    matches, rehash = await verify_password(user.password_hash if user else None, data.password, found.hash_limiter)
    if not matches:
        raise bad_credentials()
    assert user is not None
    new_hash = await hash_password(data.password, found.hash_limiter) if rehash else None
    # Only if the hash just verified is still the user's: a password change may have committed meanwhile.
    version = await UserStore(request.state.session).confirm_password(user.id, user.password_hash, new_hash)
    if version is None:
        raise bad_credentials()
    family = uuid.uuid4().hex  # this signin's tokens, refreshed or not, are one family
    await TokenFamilyStore(request.state.session).start(family, user.id, found.tokens.family_expiry())
    await attempt.succeeded(request.state.session, clear=True)
    pair = found.tokens.issue(user.id, version, family, 0)
    return model_response(SigninTokens(**pair, device_token=found.tokens.device_token(user.id)), private=True)


async def end_family(db: Database, claims: Claims) -> None:
    """End the family of a refresh token that was presented again after it had been rotated: it
    has been copied, and nobody can tell the thief's copy from the owner's, so neither may go on.

    The other place (beside throttle.count_attempt) where the service writes whatever the request
    answers (a reuse is a 401): in a short transaction of its own, committed at once.
    """
    async with transaction(db.writes) as session:
        await TokenFamilyStore(session).end(claims.family, claims.user_id)


async def newest_of_its_family(request: Request) -> Claims:
    """The claims of the request's refresh token, if it is the newest of a live family; if it is
    an older one (a reuse), the family ends, and either way the answer is 401.

    A short read of its own, before the request's transaction begins: on SQLite that transaction
    would hold the write lock that ending the family needs.
    """
    claims = token_claims(request, "refresh")
    async with transaction(database(request).reads) as session:
        newest = await TokenFamilyStore(session).generation(claims.family, claims.user_id)
    if newest is not None and newest != claims.generation:
        await end_family(database(request), claims)
    if newest != claims.generation:
        raise revoked()
    return claims


def lost_a_race(request: Request, claims: Claims) -> Response:
    """The same refresh token, used twice at once, and the other use came first: a reuse too. The
    family ends once this answer is sent (its own session: this request holds a write lock)."""
    task = BackgroundTask(end_family, database(request), claims)
    return error_response(401, "Token has been revoked", headers=revoked().headers, background=task)


async def refresh(request: Request) -> Response:
    claims = await newest_of_its_family(request)
    tokens = resources(request).tokens
    families = TokenFamilyStore(request.state.session)
    generation = await families.rotate(claims.family, claims.user_id, claims.generation, tokens.family_expiry())
    if generation is None:
        return lost_a_race(request, claims)
    user = await UserStore(request.state.session).current(claims.user_id, claims.version, claims.family)
    if user is None:
        raise no_longer_valid()
    return model_response(
        TokenPair.model_validate(tokens.issue(user.id, user.token_version, claims.family, generation)), private=True
    )


async def signout(request: Request) -> Response:
    claims = await newest_of_its_family(request)
    if not await TokenFamilyStore(request.state.session).end(claims.family, claims.user_id, claims.generation):
        return lost_a_race(request, claims)
    return Response(status_code=204)  # the family has ended: its access tokens stop working too


async def get_me(request: Request) -> Response:
    user, _ = await authenticate(request, "access")
    return model_response(PrivateProfile.model_validate(user), private=True)


async def token_user(request: Request, claims: Claims) -> User:
    """The user an access token names, read in a short transaction of its own (so that nothing is
    held while a hash runs); a 401 if the token no longer holds."""
    async with transaction(database(request).reads) as session:
        user = await UserStore(session).current(claims.user_id, claims.version, claims.family)
    if user is None:
        raise no_longer_valid()
    return user


async def prove_password(request: Request, user: User, password: str, field: str) -> Attempt:
    """Re-authentication, for what cannot be undone: nothing, if `password` is the user's; otherwise
    a 403 naming `field` (the token was good, so not a 401: a client that treats 401 as "signed out"
    would drop its session over a typo). Counted by the throttle like a signin."""
    settings = resources(request).settings
    attempt = await count_attempt(request, signin_rules(settings, address_key(request), user.username_key))
    matches, _ = await verify_password(user.password_hash, password, resources(request).hash_limiter)
    if not matches:
        raise ProofRefused(field, "is not your current password")
    return attempt


async def update_me(request: Request) -> Response:
    claims = token_claims(request, "access")
    data = ProfileUpdate.model_validate_json(await read_json_body(request))
    changes = data.model_dump(exclude_unset=True, exclude={"password"})
    attempts = []
    if data.password is not None:  # required with an email: a stolen token must not move the account
        user = await token_user(request, claims)
        attempts.append(await prove_password(request, user, data.password, "password"))
        if "email" in changes:  # "Email already exists" tells whether an address is registered: counted too
            settings = resources(request).settings
            rule = Rule("email", address_key(request), user.username_key, settings.signin_failure_limit,
                        settings.signin_failure_window)  # fmt: skip
            attempts.append(await count_attempt(request, [rule]))
    try:
        updated = await UserStore(request.state.session).update(claims.user_id, claims.version, claims.family, changes)
    except IntegrityError:
        raise HTTPException(409, "Email already exists") from None
    if updated is None:
        raise no_longer_valid()
    for attempt in attempts:  # they were not failures: taken back if this answer commits
        await attempt.succeeded(request.state.session)
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
    new_hash = await hash_password(data.new_password, found.hash_limiter)
    # Only if the token still holds: a racing change or deletion that committed first makes this
    # one fail (and has ended this token) instead of being overwritten.
    store = UserStore(request.state.session)
    if not await store.change_password(user.id, claims.version, claims.family, new_hash):
        raise no_longer_valid()
    await TokenFamilyStore(request.state.session).end_all(user.id)  # every earlier token is dead already
    await attempt.succeeded(request.state.session)
    return Response(status_code=204)


async def delete_me(request: Request) -> Response:
    claims = token_claims(request, "access")
    body = await request.body()  # no body at all is a missing password, not a wrong content type
    data = AccountDeletion.model_validate_json(await read_json_body(request) if body else b"{}")
    attempt = await prove_password(request, await token_user(request, claims), data.password, "password")
    if not await UserStore(request.state.session).delete(claims.user_id, claims.version, claims.family):
        raise no_longer_valid()
    await attempt.succeeded(request.state.session, clear=True)
    return Response(status_code=204)  # its families went with it: every token it had stops working


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
    ),
    Operation(
        "POST", "/api/users/signin", signin, "signin", "Sign in: get an access and a refresh token", "accounts",
        200, SigninTokens, (*BODY_ERRORS, 401, 429), body=Signin,
    ),
    Operation(
        "POST", "/api/users/refresh", refresh, "refresh",
        "Trade a refresh token for a new pair (the presented one is spent)", "accounts", 200, TokenPair, (401,),
        auth=True,
    ),
    Operation(
        "POST", "/api/users/signout", signout, "signout",
        "Sign out: end this signin's session (its refresh and access tokens stop working)", "accounts", 204, None,
        (401,), auth=True,
    ),
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
)  # fmt: skip
