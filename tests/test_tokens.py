"""Tokens other services can verify: asymmetric keys (ES256 by default, EdDSA, RS256), the key set at
/.well-known/jwks.json, `iss` and `aud` checked, rotation through fallback files, the migration from
SECRET_KEY; and secrets from files, weak keys refused, a misconfigured service stopped at once.

Verified by PyJWT's PyJWKClient and by joserfc from the key set alone, as another service would."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import jwt
import pytest
from asgi_lifespan import LifespanManager
from cryptography.hazmat.primitives import serialization
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet as JoseKeySet
from joserfc.jwk import import_key
from starlette.applications import Starlette

from app import create_app
from clusters import StartService
from conftest import PROJECT_DIR, bearer, sign_up_and_in
from keys import new_private_key, thumbprint
from settings import Settings

pytestmark = pytest.mark.anyio

SECRET = "a-secret-of-the-single-service-mode-0123456789"


def key_file(directory: Path, name: str, algorithm: str = "ES256") -> Path:
    path = directory / f"{name}.pem"
    path.write_bytes(new_private_key(algorithm))
    return path


def public_half(private: Path) -> Path:
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    path = private.with_suffix(".pub.pem")
    path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path


@pytest.fixture(params=["ES256", "EdDSA", "RS256"])
def algorithm(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(database_url: str, tmp_path: Path, algorithm: str) -> Settings:
    signing = key_file(tmp_path, "signing", algorithm)
    return Settings(database_url=database_url, signing_key_file=str(signing), token_algorithm=algorithm)


async def test_tokens_are_signed_with_the_key_file_and_name_it_by_its_thumbprint(
    client: httpx.AsyncClient, algorithm: str
) -> None:
    tokens = await sign_up_and_in(client)
    key_set = (await client.get("/.well-known/jwks.json")).json()
    (jwk,) = key_set["keys"]
    for token, header_type in ((tokens["access_token"], "at+jwt"), (tokens["refresh_token"], "refresh+jwt")):
        header = jwt.get_unverified_header(token)
        assert (header["alg"], header["typ"], header["kid"]) == (algorithm, header_type, jwk["kid"])
    # The kid is the RFC 7638 thumbprint, as an independent library computes it.
    assert import_key(jwk).thumbprint() == jwk["kid"] == thumbprint(jwk)
    assert (jwk["alg"], jwk["use"]) == (algorithm, "sig")


async def test_the_key_set_holds_no_private_part_and_may_be_cached(client: httpx.AsyncClient) -> None:
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "public, max-age=300"
    for jwk in response.json()["keys"]:
        assert not {"d", "p", "q", "dp", "dq", "qi", "k"} & set(jwk)


async def test_another_service_verifies_tokens_from_the_key_set_alone(
    database_url: str, start_service: StartService, tmp_path: Path
) -> None:
    """The example verifier of docs/tokens.md: PyJWT's PyJWKClient on the live service's key set,
    and joserfc, a JOSE library of its own, on the same set."""
    service = start_service(database_url, SIGNING_KEY_FILE=str(key_file(tmp_path, "signing")))
    async with httpx.AsyncClient(base_url=service.url) as client:
        tokens = await sign_up_and_in(client)

    jwks_client = jwt.PyJWKClient(f"{service.url}/.well-known/jwks.json")
    access = tokens["access_token"]
    signing_key = jwks_client.get_signing_key_from_jwt(access)
    claims = jwt.decode(
        access, signing_key, algorithms=["ES256"], audience="users", issuer="http://127.0.0.1:8000",
        options={"require": ["exp", "iat", "sub", "iss", "aud"]},
    )  # fmt: skip
    assert jwt.get_unverified_header(access)["typ"] == "at+jwt"  # an access token, not a refresh token
    assert claims["typ"] == "access"

    async with httpx.AsyncClient(base_url=service.url) as client:
        key_set = JoseKeySet.import_key_set((await client.get("/.well-known/jwks.json")).json())
    verified = jose_jwt.decode(access, key_set, algorithms=["ES256"])
    assert verified.header["typ"] == "at+jwt"
    assert verified.claims["sub"] == claims["sub"]
    jose_jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": "http://127.0.0.1:8000"}, aud={"value": "users"}
    ).validate(verified.claims)
    refresh = jose_jwt.decode(tokens["refresh_token"], key_set, algorithms=["ES256"])
    assert refresh.header["typ"] == "refresh+jwt"  # a verifier that checks typ never takes it for access


@pytest.mark.parametrize(("claim", "value"), [("aud", "another-service"), ("iss", "https://elsewhere.example")])
async def test_a_token_for_another_audience_or_issuer_is_a_401(
    client: httpx.AsyncClient, settings: Settings, claim: str, value: str
) -> None:
    tokens = await sign_up_and_in(client)
    good = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    header = jwt.get_unverified_header(tokens["access_token"])
    private = await anyio.Path(str(settings.signing_key_file)).read_bytes()
    forged = jwt.encode({**good, claim: value}, private, algorithm=header["alg"], headers=header)
    response = await client.get("/api/users/me", headers=bearer(forged))
    assert response.status_code == 401
    assert response.json() == {"detail": "Token is invalid"}
    assert (await client.get("/api/users/me", headers=bearer(tokens["access_token"]))).status_code == 200


async def test_a_refresh_token_is_never_an_access_token(client: httpx.AsyncClient) -> None:
    tokens = await sign_up_and_in(client)
    response = await client.get("/api/users/me", headers=bearer(tokens["refresh_token"]))
    assert response.status_code == 401
    assert response.json() == {"detail": "An access token is required"}


@pytest.mark.parametrize("algorithm", ["ES256"])
async def test_rotation_publishes_the_fallbacks_and_accepts_their_tokens(
    database_url: str, tmp_path: Path, algorithm: str
) -> None:
    old, new = key_file(tmp_path, "old"), key_file(tmp_path, "new", "EdDSA")
    public_only = public_half(old)
    before = Settings(database_url=database_url, signing_key_file=str(old))
    after = Settings(
        database_url=database_url, signing_key_file=str(new), token_algorithm="EdDSA",
        signing_key_fallback_files=(str(public_only),),
    )  # fmt: skip
    async with served(create_app(before)) as client:
        tokens = await sign_up_and_in(client)
        old_kid = jwt.get_unverified_header(tokens["access_token"])["kid"]
    async with served(create_app(after)) as client:
        kids = [jwk["kid"] for jwk in (await client.get("/.well-known/jwks.json")).json()["keys"]]
        assert len(kids) == 2
        assert kids[1] == old_kid  # the signer first, then the fallback
        assert (await client.get("/api/users/me", headers=bearer(tokens["access_token"]))).status_code == 200
        refreshed = await client.post("/api/users/refresh", headers=bearer(tokens["refresh_token"]))
        assert refreshed.status_code == 200
        assert jwt.get_unverified_header(refreshed.json()["access_token"])["kid"] == kids[0]


@pytest.mark.parametrize("algorithm", ["ES256"])
async def test_with_a_key_file_and_secret_key_the_file_signs_and_old_hs256_tokens_still_work(
    database_url: str, tmp_path: Path, algorithm: str
) -> None:
    async with served(create_app(Settings(database_url=database_url, secret_key=SECRET))) as client:
        hs256 = await sign_up_and_in(client)
        assert (await client.get("/.well-known/jwks.json")).status_code == 404  # the single-service mode
    assert jwt.get_unverified_header(hs256["access_token"])["alg"] == "HS256"
    both = Settings(database_url=database_url, secret_key=SECRET, signing_key_file=str(key_file(tmp_path, "k")))
    async with served(create_app(both)) as client:
        assert (await client.get("/api/users/me", headers=bearer(hs256["access_token"]))).status_code == 200
        fresh = await client.post("/api/users/refresh", headers=bearer(hs256["refresh_token"]))
        assert jwt.get_unverified_header(fresh.json()["access_token"])["alg"] == "ES256"
        assert [jwk["alg"] for jwk in (await client.get("/.well-known/jwks.json")).json()["keys"]] == ["ES256"]


# --- configuration: secrets from files, weak keys, a key of the wrong kind ---------------------


def environment(**settings: str) -> dict[str, str]:
    names = ("SECRET_KEY", "SECRET_KEY_FILE", "SIGNING_KEY_FILE", "DATABASE_URL", "DATABASE_URL_FILE")
    return {**{k: v for k, v in os.environ.items() if k not in names}, **settings}


def test_secrets_come_from_files_with_their_trailing_newline_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "url").write_text("postgresql://app:pw@db/users\n")
    monkeypatch.setenv("SECRET_KEY_FILE", str(tmp_path / "secret"))
    monkeypatch.setenv("DATABASE_URL_FILE", str(tmp_path / "url"))
    settings = Settings.from_environ()
    assert (settings.secret_key, settings.database_url) == (SECRET, "postgresql://app:pw@db/users")


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"SECRET_KEY": SECRET, "SECRET_KEY_FILE": "/run/secrets/key"}, "SECRET_KEY and SECRET_KEY_FILE are both set"),
        ({"SECRET_KEY_FILE": "/nonexistent/key"}, "SECRET_KEY_FILE: cannot read /nonexistent/key"),
        ({"SECRET_KEY": "k" * 32}, "SECRET_KEY must be at least 32 bytes of 10 or more distinct characters"),
        ({"SECRET_KEY": "short-but-varied-0123"}, "SECRET_KEY must be at least 32 bytes"),
        ({}, "neither SIGNING_KEY_FILE nor SECRET_KEY is set"),
        ({"SIGNING_KEY_FILE": "/nonexistent/key.pem"}, "SIGNING_KEY_FILE: cannot read /nonexistent/key.pem"),
        ({"SIGNING_KEY_FILE": "WRONG_KIND"}, "SIGNING_KEY_FILE: the key is for RS256, TOKEN_ALGORITHM says ES256"),
        ({"LOG_FORMAT": "json", "SECRET_KEY": "tiny-secret-9"}, "SECRET_KEY must be at least 32 bytes"),
    ],
)
def test_a_misconfigured_service_exits_at_once_with_one_line_naming_the_setting(
    tmp_path: Path, given: dict[str, str], message: str
) -> None:
    if given.get("SIGNING_KEY_FILE") == "WRONG_KIND":
        given = {"SIGNING_KEY_FILE": str(key_file(tmp_path, "rsa", "RS256"))}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "server.py"],
        cwd=PROJECT_DIR,
        env=environment(WEB_CONCURRENCY="2", DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'u.db'}", **given),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert time.monotonic() - start < 10  # not a supervisor respawning failing workers
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert message in lines[0]
    assert "Started" not in lines[0]
    if given.get("LOG_FORMAT") == "json":
        assert json.loads(lines[0])["level"] == "ERROR"
    for value in given.values():
        if value not in ("json",) and not value.startswith("/"):
            assert value not in lines[0]  # never a secret's value


@contextlib.asynccontextmanager
async def served(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """An app with its lifespan run, and an httpx client on it."""
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client
