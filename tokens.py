"""Tokens: the access/refresh JWT pair, with `iss`, `aud` and a `kid` in every one.

Signed with an asymmetric key from SIGNING_KEY_FILE (ES256 by default; EdDSA or RS256), whose
public half, and its fallbacks', other services fetch from /.well-known/jwks.json; or, in the
single-service mode, with SECRET_KEY (HS256), which nobody else may hold. With both, the key file
signs and SECRET_KEY's tokens are still accepted until they expire. The keys are keys.py's.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import jwt
from starlette.exceptions import HTTPException

from keys import Key, check_secret, read_key, secret_key
from settings import Settings

logger = logging.getLogger("users")

TokenType = Literal["access", "refresh"]
# The JOSE header's `typ` (RFC 9068 for access tokens): a verifier that checks it cannot take a
# refresh token (or a device token, which only this service reads) for an access token, whatever
# it makes of the claims.
HEADER_TYPES: dict[str, str] = {"access": "at+jwt", "refresh": "refresh+jwt", "device": "device+jwt"}
JWKS_MAX_AGE = 300  # seconds a verifier may cache the key set: a new key is published this long before it signs


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


@dataclass(frozen=True)
class Tokens:
    """Issues tokens with `signer`, and checks them with any of `keys` (the signer, fallbacks,
    and in the migration mode SECRET_KEY), by the `kid` in their header."""

    signer: Key
    access_ttl: int
    refresh_ttl: int
    fallbacks: tuple[Key, ...] = ()
    issuer: str = "http://127.0.0.1:8000"
    audience: str = "users"
    leeway: float = 30.0  # seconds of clock difference between replicas allowed for iat, nbf and exp
    device_ttl: int = 7776000
    keys: dict[str, Key] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", {key.kid: key for key in (self.signer, *self.fallbacks)})

    def key_set(self) -> dict[str, list[dict[str, str]]]:
        """The RFC 7517 JWK Set of the public keys that verify tokens (never a private part)."""
        return {"keys": [key.jwk for key in self.keys.values() if key.jwk is not None]}

    def issue(self, user_id: int, version: int, family: str, generation: int) -> dict[str, str]:
        return {
            "access_token": self._encode(user_id, version, family, 0, "access", self.access_ttl),
            "refresh_token": self._encode(user_id, version, family, generation, "refresh", self.refresh_ttl),
            "token_type": "bearer",
        }

    def family_expiry(self) -> datetime:
        """When a family whose newest refresh token is issued now has no good token left."""
        return datetime.now(UTC) + timedelta(seconds=self.refresh_ttl + self.leeway)

    def device_token(self, user_id: int) -> str:
        """A known-device token (OWASP's device cookie): proof that this device signed in to this
        account before, which lets it past the address and account throttles (throttle.py)."""
        return self._sign({"sub": str(user_id), "typ": "device"}, self.device_ttl)

    def _encode(self, user_id: int, version: int, family: str, generation: int, token_type: TokenType, ttl: int) -> str:
        claims = {"sub": str(user_id), "typ": token_type, "ver": version, "fam": family, "gen": generation}
        return self._sign(claims, ttl)

    def _sign(self, claims: dict[str, Any], ttl: int) -> str:
        now = datetime.now(UTC)
        claims = {"iss": self.issuer, "aud": self.audience, **claims, "jti": uuid.uuid4().hex, "iat": now}
        claims["exp"] = now + timedelta(seconds=ttl)
        headers = {"kid": self.signer.kid, "typ": HEADER_TYPES[claims["typ"]]}
        return jwt.encode(claims, self.signer.signing, algorithm=self.signer.algorithm, headers=headers)

    def _decode(self, token: str, required: list[str]) -> dict[str, Any]:
        """The claims of a token signed with one of the keys, for this issuer and audience, not
        expired; a 401 otherwise."""
        try:
            key = self._key_for(token)
            if key.algorithm == "HS256" and not {"iss", "aud"} & set(unverified_claims(token)):
                required = required[2:]  # issued before tokens named an issuer and audience: good until they expire
            claims: dict[str, Any] = jwt.decode(
                token,
                key.verifying,
                algorithms=[key.algorithm],
                audience=self.audience if "aud" in required else None,
                issuer=self.issuer if "iss" in required else None,
                options={"require": required, "verify_aud": "aud" in required},
                leeway=self.leeway,
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("Token has expired") from None
        except jwt.InvalidTokenError:
            raise unauthorized("Token is invalid") from None
        return claims

    def device(self, token: str | None, user_id: int) -> str | None:
        """The id of a good device token for this user; None for any other (no token, another
        user's, expired, forged): that device is then a device like any other."""
        if token is None:
            return None
        try:
            claims = self._decode(token, ["iss", "aud", "sub", "typ", "jti", "iat", "exp"])
        except HTTPException:
            return None
        return str(claims["jti"]) if claims["typ"] == "device" and claims["sub"] == str(user_id) else None

    def check(self, token: str, token_type: TokenType) -> Claims:
        """The token's claims, or a 401 if it is malformed, tampered with, expired, of the wrong type,
        for another issuer or audience, or signed with a key the service does not hold."""
        claims = self._decode(token, ["iss", "aud", "sub", "typ", "jti", "fam", "iat", "exp"])
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

    def _key_for(self, token: str) -> Key:
        """The key the token's `kid` names. A token without one is tried with each HS256 key."""
        kid = jwt.get_unverified_header(token).get("kid")
        if kid is None:
            for key in self.keys.values():
                if key.algorithm != "HS256":
                    continue
                try:
                    jwt.decode(
                        token, key.verifying, algorithms=["HS256"], options={"verify_exp": False, "verify_aud": False}
                    )
                    return key
                except jwt.InvalidSignatureError:
                    continue
        elif isinstance(kid, str) and kid in self.keys:
            return self.keys[kid]
        raise jwt.InvalidSignatureError("signed with a key that the service does not hold")


def unverified_claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def make_tokens(settings: Settings) -> Tokens:
    """The service's Tokens, from its settings; a ValueError naming the setting (never its value)
    if a key is missing, unreadable, weak or of the wrong kind."""
    for secret in settings.secret_key_fallbacks:
        check_secret("each of SECRET_KEY_FALLBACKS", secret)
    secrets_ = [secret_key(secret) for secret in settings.secret_key_fallbacks]
    if settings.secret_key:
        check_secret("SECRET_KEY", settings.secret_key)
        secrets_.insert(0, secret_key(settings.secret_key))
    if settings.signing_key_file:
        signer = read_key("SIGNING_KEY_FILE", settings.signing_key_file)
        if signer.signing is None:
            raise ValueError("SIGNING_KEY_FILE: a private key is needed to sign (this is a public key)")
        if signer.algorithm != settings.token_algorithm:
            raise ValueError(
                f"SIGNING_KEY_FILE: the key is for {signer.algorithm}, TOKEN_ALGORITHM says {settings.token_algorithm}"
            )
        fallbacks = [read_key("SIGNING_KEY_FALLBACK_FILES", path) for path in settings.signing_key_fallback_files]
        # The migration mode: SECRET_KEY's tokens are still good until they expire; none is signed with it.
        verifying = (*fallbacks, *secrets_)
    elif settings.secret_key:
        signer, verifying = secrets_[0], tuple(secrets_[1:])
    else:  # fallbacks never sign, even alone
        signer, verifying = random_secret(settings), tuple(secrets_)
    return Tokens(
        signer,
        settings.access_token_ttl,
        settings.refresh_token_ttl,
        tuple(verifying),
        settings.token_issuer,
        settings.token_audience,
        settings.token_leeway,
        settings.device_token_ttl,
    )


def random_secret(settings: Settings) -> Key:
    """No key configured: a random HS256 key for a single process (with a warning)."""
    if settings.web_concurrency > 1:
        raise ValueError(
            "neither SIGNING_KEY_FILE nor SECRET_KEY is set and WEB_CONCURRENCY > 1: each worker would sign "
            "with a random key of its own and refuse the others'"
        )
    logger.warning(
        "neither SIGNING_KEY_FILE nor SECRET_KEY is set: signing with a random key for this process. Tokens "
        "will not survive a restart and are not valid in other processes"
    )
    return secret_key(secrets.token_urlsafe(32))
