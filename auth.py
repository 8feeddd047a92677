"""Who is asking: the request's bearer token, its claims, and the user it names (or a 401)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request

from db import database, transaction
from models import User
from resources import resources
from stores import UserStore
from tokens import Claims, TokenType, unauthorized


def bad_credentials() -> HTTPException:
    # A 401 must say how to authenticate (RFC 9110 15.5.2), a failed signin included.
    return HTTPException(401, "Invalid username or password", headers={"WWW-Authenticate": 'Bearer realm="users"'})


def no_longer_valid() -> HTTPException:
    return unauthorized("Token is no longer valid")


def revoked() -> HTTPException:
    return unauthorized("Token has been revoked")


def bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "A bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


def token_claims(request: Request, token_type: TokenType) -> Claims:
    """The claims of the request's valid bearer token of this type (no database involved); a 401 otherwise."""
    return resources(request).tokens.check(bearer_token(request), token_type)


async def authenticate(request: Request, token_type: TokenType) -> tuple[User, Claims]:
    """The user a valid token of this type names; a 401 otherwise."""
    claims = token_claims(request, token_type)
    user = await UserStore(request.state.session).current(claims.user_id, claims.version, claims.family)
    if user is None:  # deleted, the password changed since, or the family has ended
        raise no_longer_valid()
    return user, claims


async def token_user(request: Request, claims: Claims) -> User:
    """The user an access token names, read in a short transaction of its own (so that nothing is
    held while a hash runs); a 401 if the token no longer holds."""
    async with transaction(database(request).reads) as session:
        user = await UserStore(session).current(claims.user_id, claims.version, claims.family)
    if user is None:
        raise no_longer_valid()
    return user
