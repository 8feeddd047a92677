"""Tokens: the access/refresh JWT pair, signed with SECRET_KEY (HS256), checked with it or with one
of SECRET_KEY_FALLBACKS, each naming its key by a `kid` fingerprint."""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import jwt
from starlette.exceptions import HTTPException

from settings import Settings

logger = logging.getLogger("users")

TokenType = Literal["access", "refresh"]
ALGORITHM = "HS256"


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


@dataclass(frozen=True)
class Claims:
    user_id: int
    type: TokenType
    jti: str
    expires_at: datetime
    version: int  # the user's token version when issued: a password change raises it
    family: str  # the signin the token comes from (models.TokenFamily)
    generation: int  # the refresh token's place in its family (0 in access tokens)


def key_id(key: str) -> str:
    """A token's `kid`: a short fingerprint that names its key without revealing it."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Tokens:
    """Issues and checks the access/refresh JWT pair: HS256, signed with SECRET_KEY, checked with
    it or with one of SECRET_KEY_FALLBACKS (earlier keys, while a rotation is under way)."""

    secret: str
    access_ttl: int
    refresh_ttl: int
    fallbacks: tuple[str, ...] = ()
    leeway: float = 30.0  # seconds of clock difference between replicas allowed for iat, nbf and exp

    @functools.cached_property
    def keys(self) -> dict[str, str]:
        return {key_id(key): key for key in (self.secret, *self.fallbacks)}

    def issue(self, user_id: int, version: int, family: str, generation: int) -> dict[str, str]:
        return {
            "access_token": self._encode(user_id, version, family, 0, "access", self.access_ttl),
            "refresh_token": self._encode(user_id, version, family, generation, "refresh", self.refresh_ttl),
            "token_type": "bearer",
        }

    def family_expiry(self) -> datetime:
        """When a family whose newest refresh token is issued now has no good token left."""
        return datetime.now(UTC) + timedelta(seconds=self.refresh_ttl + self.leeway)

    def _encode(self, user_id: int, version: int, family: str, generation: int, token_type: TokenType, ttl: int) -> str:
        now = datetime.now(UTC)
        claims = {
            "sub": str(user_id),
            "typ": token_type,
            "jti": uuid.uuid4().hex,
            "ver": version,
            "fam": family,
            "gen": generation,
            "iat": now,
            "exp": now + timedelta(seconds=ttl),
        }
        return jwt.encode(claims, self.secret, algorithm=ALGORITHM, headers={"kid": key_id(self.secret)})

    def check(self, token: str, token_type: TokenType) -> Claims:
        """The token's claims, or a 401 if it is malformed, tampered with, expired, of the wrong type,
        or signed with a key that is neither SECRET_KEY nor one of its fallbacks."""
        try:
            claims = jwt.decode(
                token,
                self._key_for(token),
                algorithms=[ALGORITHM],
                options={"require": ["sub", "typ", "jti", "fam", "iat", "exp"]},
                leeway=self.leeway,
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("Token has expired") from None
        except jwt.InvalidTokenError:
            raise unauthorized("Token is invalid") from None
        if claims["typ"] != token_type:
            raise unauthorized(
                "An access token is required" if token_type == "access" else "A refresh token is required"
            )
        try:
            user_id, version, generation = int(claims["sub"]), int(claims.get("ver", -1)), int(claims.get("gen", 0))
        except (TypeError, ValueError):
            raise unauthorized("Token is invalid") from None
        expires_at = datetime.fromtimestamp(claims["exp"], UTC)
        return Claims(user_id, token_type, str(claims["jti"]), expires_at, version, str(claims["fam"]), generation)

    def _key_for(self, token: str) -> str:
        """The key the token's `kid` names. A token without one (a kid-less token) is
        tried with each key in turn."""
        kid = jwt.get_unverified_header(token).get("kid")
        if kid is None:
            for key in self.keys.values():
                try:
                    jwt.decode(token, key, algorithms=[ALGORITHM], options={"verify_exp": False})
                    return key
                except jwt.InvalidSignatureError:
                    continue
        elif isinstance(kid, str) and kid in self.keys:
            return self.keys[kid]
        raise jwt.InvalidSignatureError("signed with a key that is neither SECRET_KEY nor one of its fallbacks")


def make_tokens(settings: Settings) -> Tokens:
    for fallback in settings.secret_key_fallbacks:
        if len(fallback.encode()) < 32:
            raise RuntimeError("Each of SECRET_KEY_FALLBACKS must be at least 32 bytes long, as SECRET_KEY.")
    return Tokens(
        token_secret(settings),
        settings.access_token_ttl,
        settings.refresh_token_ttl,
        settings.secret_key_fallbacks,
        settings.token_leeway,
    )


def token_secret(settings: Settings) -> str:
    """SECRET_KEY, or a random key for a single process (with a warning), or a refusal to start."""
    if settings.secret_key:
        if len(settings.secret_key.encode()) < 32:
            raise RuntimeError("SECRET_KEY must be at least 32 bytes long (RFC 7518 asks as much for HS256).")
        return settings.secret_key
    if settings.web_concurrency > 1:
        raise RuntimeError(
            "SECRET_KEY is not set and WEB_CONCURRENCY > 1: each worker would sign tokens with its own "
            "random key and refuse the others'. Set SECRET_KEY (for example: python -c "
            "'import secrets; print(secrets.token_urlsafe(32))')."
        )
    logger.warning(
        "SECRET_KEY is not set: using a random key for this process. Tokens will not survive a restart "
        "and are not valid in other processes. Set SECRET_KEY in production."
    )
    return secrets.token_urlsafe(32)
