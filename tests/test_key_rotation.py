"""Key rotation: SECRET_KEY_FALLBACKS, a kid on every token, kid-less tokens tried with each key,
across restarts of a real uvicorn."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from starlette.exceptions import HTTPException

from app import create_app
from chaos import ServiceProcess
from conftest import assert_401, bearer, sign_up_and_in
from keys import key_id, secret_key
from settings import Settings
from tokens import Tokens, make_tokens

pytestmark = pytest.mark.anyio
# --- key rotation -----------------------------------------------------------------------------

OLD_KEY, NEW_KEY = "the-old-key-0123456789" + "o" * 20, "the-new-key-0123456789" + "n" * 20


def test_tokens_name_their_key_by_a_fingerprint_not_the_key() -> None:
    tokens = Tokens(secret_key(NEW_KEY), 60, 60, (secret_key(OLD_KEY),)).issue(1, 0, "f" * 32, 0)
    for token in (tokens["access_token"], tokens["refresh_token"]):
        header = jwt.get_unverified_header(token)
        assert header["kid"] == key_id(NEW_KEY) != key_id(OLD_KEY)
        assert len(header["kid"]) == 16
        assert NEW_KEY not in token
        assert header["kid"] not in NEW_KEY


@pytest.mark.parametrize(
    ("signed_with", "kid", "accepted"),
    [
        (NEW_KEY, "new", True),
        (OLD_KEY, "old", True),  # a fallback: tokens from before the rotation still work
        (OLD_KEY, None, True),  # no kid (issued before keys had ids): each key is tried
        (NEW_KEY, "old", False),  # the kid names one key, the signature is another's
        ("a-key-in-neither-setting-" + "x" * 32, None, False),
        ("a-key-in-neither-setting-" + "x" * 32, "unknown", False),
        (NEW_KEY, ["not", "a", "string"], False),
    ],
)
def test_a_token_is_checked_with_the_key_its_kid_names(signed_with: str, kid: Any, accepted: bool) -> None:
    tokens = Tokens(secret_key(NEW_KEY), 60, 60, (secret_key(OLD_KEY),))
    kids = {"new": key_id(NEW_KEY), "old": key_id(OLD_KEY)}
    claims = {"sub": "1", "typ": "access", "jti": "x", "fam": "f", "iat": 0, "exp": 9e9, "ver": 0}
    header = {"alg": "HS256", "typ": "JWT"} | (
        {} if kid is None else {"kid": kids.get(kid, kid) if isinstance(kid, str) else kid}
    )
    token = signed(header, claims, signed_with)
    if accepted:
        assert tokens.check(token, "access").user_id == 1
    else:
        with pytest.raises(HTTPException) as refused:
            tokens.check(token, "access")
        assert (refused.value.status_code, refused.value.detail) == (401, "Token is invalid")


def signed(header: dict[str, Any], claims: dict[str, Any], key: str) -> str:
    """A JWT made by hand, so that its header can hold what PyJWT would refuse to write."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{part(json.dumps(header).encode())}.{part(json.dumps(claims).encode())}"
    signature = hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{part(signature)}"


def test_a_short_fallback_key_is_refused() -> None:
    with pytest.raises(ValueError, match="each of SECRET_KEY_FALLBACKS must be at least 32 bytes"):
        create_app(Settings(secret_key=NEW_KEY, secret_key_fallbacks=("short",)))


@pytest.mark.e2e
async def test_rotating_the_key_across_restarts_signs_nobody_out_until_the_fallback_is_dropped(
    database_url: str, tmp_path: Path
) -> None:
    def start(**settings: str) -> ServiceProcess:
        return ServiceProcess(database_url, tmp_path / "service.log", **settings)

    service = start(SECRET_KEY=OLD_KEY)
    async with httpx.AsyncClient(base_url=service.url) as client:
        before = await sign_up_and_in(client)
    service.stop()

    service = start(SECRET_KEY=NEW_KEY, SECRET_KEY_FALLBACKS=f"{OLD_KEY}, ")  # put the old key aside, restart
    async with httpx.AsyncClient(base_url=service.url) as client:
        assert (await client.get("/api/users/me", headers=bearer(before["access_token"]))).status_code == 200
        refreshed = await client.post("/api/users/refresh", headers=bearer(before["refresh_token"]))
        assert refreshed.status_code == 200
        after = refreshed.json()
        assert jwt.get_unverified_header(after["access_token"])["kid"] == key_id(NEW_KEY)
    service.stop()

    service = start(SECRET_KEY=NEW_KEY)  # REFRESH_TOKEN_TTL later: the fallback goes
    try:
        async with httpx.AsyncClient(base_url=service.url) as client:
            assert_401(await client.get("/api/users/me", headers=bearer(before["access_token"])), "Token is invalid")
            assert (await client.get("/api/users/me", headers=bearer(after["access_token"]))).status_code == 200
    finally:
        service.stop()


@pytest.mark.parametrize(
    ("claims", "detail"),
    [
        ({"iat": 1}, None),  # minted by a replica whose clock runs a second ahead
        ({"iat": 25, "nbf": 25}, None),
        ({"exp": -10}, None),  # expired ten seconds ago by this clock: within the leeway
        ({"iat": 120}, "Token is invalid"),  # two minutes ahead: not a clock's drift
        ({"nbf": 120}, "Token is invalid"),
        ({"exp": -60}, "Token has expired"),
    ],
)
def test_token_times_allow_a_leeway_for_clocks_that_differ(claims: dict[str, int], detail: str | None) -> None:
    now = int(time.time())
    tokens = Tokens(secret_key(NEW_KEY), 60, 60, leeway=30)
    times = {"iat": now, "exp": now + 60} | {name: now + offset for name, offset in claims.items()}
    token = jwt.encode(
        {"sub": "1", "typ": "access", "jti": "x", "fam": "f", "ver": 0, **times},
        NEW_KEY,
        headers={"kid": key_id(NEW_KEY)},
    )
    if detail is None:
        assert tokens.check(token, "access").user_id == 1
    else:
        with pytest.raises(HTTPException) as refused:
            tokens.check(token, "access")
        assert refused.value.detail == detail


def test_the_leeway_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN_LEEWAY", "5")
    settings = Settings.from_environ()
    assert settings.token_leeway == 5
    assert make_tokens(replace(settings, secret_key=NEW_KEY)).leeway == 5


def test_fallbacks_alone_never_sign() -> None:
    tokens = make_tokens(Settings(secret_key_fallbacks=(OLD_KEY,)))
    assert tokens.signer.kid != key_id(OLD_KEY)
    assert key_id(OLD_KEY) in tokens.keys  # still accepted for checking
