"""The routes that prove an address: a password reset (asked for by email, confirmed with the
mail's token), and email verification (the signup's mail, or one more asked for when signed in).

A reset request answers the same 202, in about the same time, whether or not the address is an
account's; requests are limited per address asked for and per client (docs/mail.md).
"""

from __future__ import annotations

import hashlib

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from account_mail import notice, reset_link, verification_link
from account_tokens import RESET, VERIFY, AccountTokenStore
from audit import record
from auth import token_claims, token_user
from breaches import BREACHED
from db import database, transaction
from errors import ProofRefused, field_error
from models import User, email_key
from openapi import BODY_ERRORS, Operation
from resources import resources
from responses import Accepted, model_response
from schemas import EmailProof, PasswordResetConfirm, PasswordResetRequest, read_json_body
from stores import TokenFamilyStore, UserStore
from throttle import ANY, Rule, SigninFailureStore, address_key, count_attempt

ON_ITS_WAY = Accepted(detail="If an account has this address, a mail with a link to reset its password is on its way.")


async def count_mail_request(request: Request, email: str) -> None:
    """PASSWORD_RESET_LIMIT for the address asked for (a digest of its key: the throttle keeps no
    address), PASSWORD_RESET_ADDRESS_LIMIT for the client; then a 429."""
    settings = resources(request).settings
    asked = hashlib.sha256(email_key(email).encode()).hexdigest()
    rules = [
        Rule("mail", address_key(request), ANY, settings.password_reset_address_limit, 3600),
        Rule("mail", ANY, asked, settings.password_reset_limit, 3600),
    ]
    await count_attempt(request, rules, "Too many mails asked for")


async def request_password_reset(request: Request) -> Response:
    data = PasswordResetRequest.model_validate_json(await read_json_body(request))
    await count_mail_request(request, data.email)
    session = request.state.session
    user = await UserStore(session).get_by_email(data.email)
    mailed = user is not None and not user.disabled
    # The same statements whether or not the address is an account's, so that the answer takes as
    # long: for no account, a stand-in's token and mail, in a savepoint that is rolled back.
    async with session.begin_nested() as savepoint:
        await reset_link(session, request, user if mailed and user else User(id=0, username="", email=data.email))
        if not mailed:
            await savepoint.rollback()
    await record(session, "password_reset_requested", user, request=request, username=None if user else data.email)
    return model_response(ON_ITS_WAY, 202)


def bad_token(kind: str) -> ProofRefused:
    return ProofRefused("token", f"is not a good {kind} token: it is wrong, used or expired")


async def confirm_password_reset(request: Request) -> Response:
    found = resources(request)
    data = PasswordResetConfirm.model_validate_json(await read_json_body(request), context=found.password_rules)
    # Read in a short transaction of its own: nothing is held while the new password is hashed.
    async with transaction(database(request).reads) as session:
        token = await AccountTokenStore(session).find(RESET, data.token)
        user = await session.get(User, token.user_id) if token else None
    if user is None:
        raise bad_token("password reset")
    if refusal := found.password_rules.context_refusal(data.new_password, user.username, user.email):
        raise field_error("new_password", refusal)
    if await found.breaches.breached(data.new_password):
        raise field_error("new_password", BREACHED)
    new_hash = await found.hashing.hash(data.new_password)
    session = request.state.session
    if await AccountTokenStore(session).use(RESET, data.token) is None:  # once: of two at once, one
        raise bad_token("password reset")
    await UserStore(session).set_password(user.id, new_hash)  # and a new token version: every token dies
    await TokenFamilyStore(session).end_all(user.id)
    await AccountTokenStore(session).void(user.id, RESET)
    await SigninFailureStore(session).forget(user.username_key)  # locked out by a guesser: not any more
    await notice(session, request, user, "password_reset_notice", "Your password was reset")
    await record(session, "password_reset", user, request=request, detail="every session ended")
    return Response(status_code=204)


async def verify_email(request: Request) -> Response:
    data = EmailProof.model_validate_json(await read_json_body(request))
    session = request.state.session
    used = await AccountTokenStore(session).use(VERIFY, data.token)
    # The address the mail went to must still be the account's: a token for an old one proves nothing.
    user = await UserStore(session).verified(used.user_id, used.email) if used else None
    if user is None:
        raise bad_token("email verification")
    await record(session, "email_verified", user, request=request, detail=user.email)
    return Response(status_code=204)


async def request_verification(request: Request) -> Response:
    user = await token_user(request, token_claims(request, "access"))
    if user.email_verified:
        raise HTTPException(409, "Your email address is verified already.")
    await count_mail_request(request, user.email)
    await verification_link(request.state.session, request, user, user.email)
    return model_response(Accepted(detail=f"A mail with a link to verify {user.email} is on its way."), 202)


MAIL = {429: "Too many mails asked for, for this address or from this client; retry after Retry-After seconds."}
TOKEN = {403: "The token is wrong, used or expired (an `errors` entry names it); nothing was written."}
# Fixed paths, before /api/users/{username} (app.py lists these first: Starlette takes the first match).
OPERATIONS = (
    Operation(
        "POST", "/api/users/password-reset", request_password_reset, "requestPasswordReset",
        "Ask for a password reset mail (the same answer whether or not an account has the address)", "recovery",
        202, Accepted, (*BODY_ERRORS, 429), body=PasswordResetRequest, error_notes=MAIL,
    ),
    Operation(
        "POST", "/api/users/password-reset/confirm", confirm_password_reset, "confirmPasswordReset",
        "Set a new password with the reset mail's token (every session ends)", "recovery", 204, None,
        (*BODY_ERRORS, 403), body=PasswordResetConfirm, error_notes=TOKEN,
    ),
    Operation(
        "POST", "/api/users/verify-email", verify_email, "verifyEmail",
        "Prove an email address with the verification mail's token", "recovery", 204, None, (*BODY_ERRORS, 403),
        body=EmailProof, error_notes=TOKEN,
    ),
    Operation(
        "POST", "/api/users/me/verify-email", request_verification, "requestEmailVerification",
        "Ask for another verification mail", "recovery", 202, Accepted, (401, 409, 429), auth=True,
        error_notes={**MAIL, 409: "The address is verified already."},
    ),
)  # fmt: skip
