"""Which passwords are refused, as NIST SP 800-63B rev 4 says, on SQLite and PostgreSQL: no
composition rule, a length from PASSWORD_MIN_LENGTH (15) to 64, every entry of the blocklist that
fits that length in any case, NFKC (and the hashes made before it keep working), and breached
passwords from a Pwned Passwords range API that the test serves on loopback."""

from __future__ import annotations

import hashlib
import threading
import unicodedata
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from argon2 import PasswordHasher
from asgi_lifespan import LifespanManager

from app import create_app
from chaos import free_port
from conftest import PASSWORD, DirectDatabase, bearer, field_errors, sign_in, sign_up_and_in, signup_body
from password_rules import blocklist, common_passwords
from passwords import argon2id
from settings import Settings

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "password",
    [
        "correcthorsebatterystaple",  # refused by the composition rule this replaces
        "correct horse battery staple",  # spaces are characters like any other
        "пароль-из-кириллицы",
        "🔑" * 15,
        "x" * 64,
    ],
)
async def test_any_characters_of_the_right_length_are_a_password(client: httpx.AsyncClient, password: str) -> None:
    assert (await client.post("/api/users/signup", json=signup_body("alice", password=password))).status_code == 201
    assert (await client.post("/api/users/signin", json={"username": "alice", "password": password})).status_code == 200


@pytest.mark.parametrize(
    ("password", "message"),
    [
        ("P@ssw0rd", "use 15 to 64 characters"),  # accepted by the composition rule this replaces
        ("Summer2024!", "use 15 to 64 characters"),
        ("fourteen chars", "use 15 to 64 characters"),
        ("x" * 65, "String should have at most 64 characters"),
        ("PasswordStandard", "this is one of the most common passwords: choose another"),
        ("QWERTYUIOP12345", "this is one of the most common passwords: choose another"),
    ],
)
async def test_short_long_and_common_passwords_are_refused(
    client: httpx.AsyncClient, db: DirectDatabase, password: str, message: str
) -> None:
    response = await client.post("/api/users/signup", json=signup_body("alice", password=password))
    assert field_errors(response) == ["password"]
    assert response.json()["errors"][0]["message"] == message
    assert await db.usernames() == []


def test_the_blocklist_is_every_entry_that_fits_the_length_rule_in_any_case() -> None:
    from zxcvbn.frequency_lists import FREQUENCY_LISTS  # zxcvbn's own reading of its file

    entries = FREQUENCY_LISTS["passwords"]
    assert common_passwords() == entries
    assert len(entries) == 30000
    for length in (8, 15):
        fitting = {entry.casefold() for entry in entries if length <= len(entry) <= 64}
        assert blocklist(length) == fitting
    assert len(blocklist(8)) > 10000


async def test_a_lower_minimum_lets_shorter_passwords_in_but_not_the_common_ones(
    settings: Settings, db: DirectDatabase
) -> None:
    async with started(replace(settings, password_min_length=8)) as client:
        assert (await client.post("/api/users/signup", json=signup_body("ann", password="Kiwi-57!"))).status_code == 201
        common = await client.post("/api/users/signup", json=signup_body("bea", password="BaseBall"))
        assert common.json()["errors"][0]["message"] == "this is one of the most common passwords: choose another"
        document = (await client.get("/openapi.json")).json()
    assert document["components"]["schemas"]["Signup"]["properties"]["password"]["minLength"] == 8
    assert await db.usernames() == ["ann"]


def test_a_minimum_below_eight_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PASSWORD_MIN_LENGTH", "7")
    with pytest.raises(ValueError, match="PASSWORD_MIN_LENGTH: must be 8"):
        Settings.from_environ()


async def test_the_document_states_the_length_and_the_blocklist(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    password = document["components"]["schemas"]["Signup"]["properties"]["password"]
    assert (password["minLength"], password["maxLength"]) == (15, 64)
    assert password["not"] == {"$ref": "#/components/schemas/CommonPassword"}
    assert "[Pp][Aa][Ss][Ss][Ww][Oo][Rr][Dd][Ss][Tt]" in document["components"]["schemas"]["CommonPassword"]["pattern"]


# --- NFKC: one passphrase, whatever the keyboard ------------------------------------------------


async def test_a_password_typed_in_another_unicode_form_is_the_same_password(client: httpx.AsyncClient) -> None:
    full_width = "".join(chr(ord(c) + 0xFEE0) for c in "kiwi-tango-mango-57")  # what some keyboards type
    decomposed = unicodedata.normalize("NFD", "café-crème-brûlée-57")
    await sign_up_and_in(client, "alice", full_width)
    await sign_in(client, "alice", unicodedata.normalize("NFKC", full_width))
    await sign_up_and_in(client, "bob", decomposed)
    await sign_in(client, "bob", unicodedata.normalize("NFC", decomposed))


async def test_a_hash_made_before_normalization_still_verifies_and_is_made_again(
    client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    typed = "\ufb01ve-\ufb02ying-\ufb01sh-o\ufb00-shore"  # ligatures (fi, fl, ff): NFKC spells them out
    await client.post("/api/users/signup", json=signup_body("alice"))
    # As the service hashed passwords before it normalized them: the form that was typed.
    await db.execute("UPDATE users SET password_hash = :hash", {"hash": argon2id().hash(typed)})

    await sign_in(client, "alice", typed)

    stored = await db.scalar("SELECT password_hash FROM users")
    assert PasswordHasher().verify(stored, unicodedata.normalize("NFKC", typed))
    await sign_in(client, "alice", typed)
    await sign_in(client, "alice", unicodedata.normalize("NFKC", typed))


# --- breached passwords: a Pwned Passwords range API on loopback ---------------------------------


class RangeServer:
    """A Pwned Passwords range API: GET /range/{5 hex} answers `SUFFIX:COUNT` lines (with padding
    lines of count 0, as the real one adds), for the passwords it was given; every path asked for
    is kept."""

    def __init__(self, breached: list[str]) -> None:
        digests = [hashlib.sha1(password.encode()).hexdigest().upper() for password in breached]
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.paths.append(self.path)
                prefix = self.path.removeprefix("/range/")
                lines = [f"{d[5:]}:{i + 3}" for i, d in enumerate(digests) if d.startswith(prefix)]
                lines.append(f"{'0' * 35}:0")  # padding
                body = "\r\n".join(lines).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()


BREACHED = "correct horse battery staple"


@pytest.fixture
def range_server() -> Iterator[RangeServer]:
    server = RangeServer([BREACHED, "another breached passphrase"])
    yield server
    server.stop()


@asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(create_app(settings)) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


@pytest.fixture
async def checked(settings: Settings, range_server: RangeServer) -> AsyncIterator[httpx.AsyncClient]:
    async with started(replace(settings, pwned_passwords_url=range_server.url)) as client:
        yield client


async def test_a_breached_password_is_refused_and_only_a_prefix_of_its_hash_leaves(
    checked: httpx.AsyncClient, range_server: RangeServer, db: DirectDatabase
) -> None:
    refused = await checked.post("/api/users/signup", json=signup_body("alice", password=BREACHED))
    assert field_errors(refused) == ["password"]
    assert refused.json()["errors"][0]["message"] == "appeared in a data breach (Pwned Passwords): choose another"
    assert await db.usernames() == []

    access = (await sign_up_and_in(checked, "alice"))["access_token"]
    change = {"old_password": PASSWORD, "new_password": BREACHED}
    refused_change = await checked.put("/api/users/me/password", json=change, headers=bearer(access))
    assert field_errors(refused_change) == ["new_password"]

    digests = [hashlib.sha1(p.encode()).hexdigest().upper() for p in (BREACHED, PASSWORD)]
    assert range_server.paths == [f"/range/{digests[0][:5]}", f"/range/{digests[1][:5]}", f"/range/{digests[0][:5]}"]
    assert all(len(path) == len("/range/") + 5 for path in range_server.paths)


async def test_when_the_range_api_is_down_the_password_is_accepted_and_counted(
    settings: Settings, db: DirectDatabase
) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with started(replace(settings, pwned_passwords_url=down)) as client:
        created = await client.post("/api/users/signup", json=signup_body("alice", password=BREACHED))
        assert created.status_code == 201
        metrics = (await client.get("/metrics")).text
    assert "password_breach_check_failures_total 1.0" in metrics
    assert await db.usernames() == ["alice"]


async def test_fail_closed_answers_503_when_the_range_api_is_down_and_writes_nothing(
    settings: Settings, db: DirectDatabase
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    async with started(replace(settings, pwned_passwords_url=down, pwned_passwords_fail_closed=True)) as client:
        response = await client.post("/api/users/signup", json=signup_body("alice"))
        assert response.status_code == 503
        assert response.headers["retry-after"] == "2"
        assert response.json() == {"detail": "The breached-password check is unavailable; try again shortly."}
    assert await db.usernames() == []


async def test_passwords_are_hashed_at_owasps_argon2id_baseline_unless_configured(
    database_url: str, db: DirectDatabase
) -> None:
    async with started(Settings(database_url=database_url)) as client:  # the defaults a user gets
        await client.post("/api/users/signup", json=signup_body("alice"))
    assert (await db.scalar("SELECT password_hash FROM users")).startswith("$argon2id$v=19$m=19456,t=2,p=1$")
