"""Bad input of every kind, on every route that takes a body or a query: a clear 4xx in the one
error shape, and the database exactly as it was.

Each test checks that it wrote nothing, so the module shares one database, one running app and one
signed-in user per backend (per pytest-xdist worker): made for each of its 500 tests, they were
most of what it cost.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.types import Message

from conftest import (
    BACKENDS,
    DirectDatabase,
    app_for_tests,
    asgi_client,
    bearer,
    cheap_settings,
    fresh_database,
    sign_up_and_in,
    signup_body,
)
from settings import Settings

pytestmark = pytest.mark.anyio

SQL = "'; DROP TABLE users; --"
VALID = {
    "/api/users/signup": signup_body("newcomer"),
    "/api/users/signin": {"username": "alice", "password": "Kiwi-Tango-Mango-57"},
    "/api/users/me": {
        "address": "Seoul",
        "phone_number": "01012345678",
        "email": "alice2@example.com",
        "password": "Kiwi-Tango-Mango-57",
    },
    "/api/users/me/password": {"old_password": "Kiwi-Tango-Mango-57", "new_password": "Better-Plum-456-Pear?"},
}
METHOD = {"/api/users/signup": "POST", "/api/users/signin": "POST", "/api/users/me": "PATCH"}
METHOD["/api/users/me/password"] = "PUT"

# Bodies that are not JSON objects at all.
NOT_OBJECTS = [
    b"{",
    b'{"username": }',
    b"",
    b"\xff\xfe{}",
    b'{"username": "al\xc3\x28ce"}',
    b"[]",
    b'"x"',
    b"1",
    b"null",
]
# Values no field accepts (for `address` and `phone_number`, null is valid: it clears them).
WRONG_TYPES: list[Any] = [1, 1.5, True, [], {}, ["x"]]
# Strings past a limit, or with characters a field refuses, by field.
BAD_STRINGS = {
    "username": ["ab", "a" * 21, "al ice", "ali\u0000ce", "ali\nce", "émile", "\uff21lice", "me", SQL],
    "password": ["Short1!", "Aa1!" * 16 + "x", "alllowercase", "Abcdefg\u00001", "Abcdefg\n1"],
    "new_password": ["Short1!", "Aa1!" * 16 + "x", "12345678", "Abcdefg\u00071"],
    "old_password": ["x" * 101],
    "email": ["no-at-sign", "a@b", "alice@example.test", "al ice@example.com", "a\u0000@example.com", SQL],
    "address": ["x" * 101, "line\nbreak", "tab\there", "bell\u0007"],
    "phone_number": ["0101234567", "010123456789", "01112345678", "010-1234-5678", "\uff10\uff11\uff1012345678", SQL],
}

# Signin takes any strings up to 100 characters: one that breaks the signup rules is a wrong
# credential (401, tested in test_accounts.py), not malformed input. So does a password given to
# re-authenticate (a wrong one is a 400 that the throttle counts: tests/test_throttle.py).
SIGNIN_BAD_STRINGS = {"username": ["x" * 255], "password": ["x" * 101]}  # a username or an email: 254 at most
REAUTHENTICATION_BAD_STRINGS = {**BAD_STRINGS, "password": ["x" * 101]}


def bad_bodies(path: str) -> list[tuple[str, bytes]]:
    """(what, body) pairs: every way this route's body can be wrong."""
    valid = VALID[path]
    cases = [(f"not an object: {raw[:20]!r}", raw) for raw in NOT_OBJECTS]
    cases.append(("unknown field", json.dumps({**valid, "is_admin": True}).encode()))
    if path != "/api/users/me":  # every PATCH field is optional
        cases.append(("missing fields", b"{}"))
    for name in valid:
        cases += [(f"{name} = {value!r}", json.dumps({**valid, name: value}).encode()) for value in WRONG_TYPES]
        if name not in ("address", "phone_number"):
            cases.append((f"{name} = null", json.dumps({**valid, name: None}).encode()))
        bad_strings = {"/api/users/signin": SIGNIN_BAD_STRINGS, "/api/users/me": REAUTHENTICATION_BAD_STRINGS}.get(
            path, BAD_STRINGS
        )
        cases += [(f"{name} = {value!r}", json.dumps({**valid, name: value}).encode()) for value in bad_strings[name]]
    return cases


CASES = [(path, what, body) for path in VALID for what, body in bad_bodies(path)]


AUTHENTICATED = ("/api/users/me", "/api/users/me/password")


@pytest.fixture(scope="module", params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from fresh_database(request, tmp_path_factory.mktemp("bad_input"))


@pytest.fixture(scope="module")
def settings(database_url: str) -> Settings:
    return cheap_settings(database_url)


@pytest.fixture(scope="module")
def app(settings: Settings) -> Starlette:
    return app_for_tests(settings)


@pytest.fixture(scope="module")
async def lifespan(app: Starlette) -> AsyncIterator[LifespanManager]:
    async with LifespanManager(app) as manager:
        yield manager


@pytest.fixture(scope="module")
async def client(lifespan: LifespanManager) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(lifespan) as client:
        yield client


@pytest.fixture(scope="module")
async def alice(client: httpx.AsyncClient) -> dict[str, str]:
    """alice's bearer token (she signs up once: each test leaves her as she was)."""
    tokens = await sign_up_and_in(client, "alice")
    return bearer(tokens["access_token"])


@pytest.fixture
def signed_in(request: pytest.FixtureRequest, alice: dict[str, str]) -> dict[str, str]:
    """alice's bearer token, for a test of a route that takes one."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("path", AUTHENTICATED[0]) not in AUTHENTICATED:
        return {}
    return alice


async def snapshot(db: DirectDatabase) -> list[Any]:
    users = await db.rows("SELECT id, username, email, password_hash, address, phone_number, token_version FROM users")
    families = await db.rows("SELECT id, generation FROM token_families")
    counted = await db.rows("SELECT kind, address, username, failures FROM signin_failures")
    return sorted(map(tuple, users)) + sorted(map(tuple, families)) + sorted(map(tuple, counted))


def assert_error_shape(response: httpx.Response) -> None:
    body = response.json()
    assert isinstance(body["detail"], str)
    assert body["detail"]
    assert set(body) <= {"detail", "errors"}
    for error in body.get("errors", []):
        assert set(error) == {"field", "message"}
        assert error["message"]


@pytest.mark.parametrize(("path", "what", "body"), CASES, ids=[f"{p} {w}" for p, w, _ in CASES])
async def test_a_bad_body_is_a_clear_400_and_writes_nothing(
    client: httpx.AsyncClient, db: DirectDatabase, signed_in: dict[str, str], path: str, what: str, body: bytes
) -> None:
    before = await snapshot(db)
    headers = {"content-type": "application/json", **signed_in}

    response = await client.request(METHOD[path], path, content=body, headers=headers)

    assert response.status_code == 400, what
    assert_error_shape(response)
    assert await snapshot(db) == before


@pytest.mark.parametrize("path", list(VALID))
@pytest.mark.parametrize(
    ("content_type", "content", "status"),
    [
        (None, None, 415),
        ("text/plain", None, 415),
        ("application/jsonx", None, 415),
        ("application/x-www-form-urlencoded", b"username=alice&password=x", 415),
        ("multipart/form-data; boundary=x", b"--x--", 415),
        ("application/json", json.dumps({"padding": "x" * 70_000}).encode(), 413),
    ],
)
async def test_a_wrong_content_type_or_an_oversized_body_writes_nothing(
    client: httpx.AsyncClient,
    db: DirectDatabase,
    signed_in: dict[str, str],
    path: str,
    content_type: str | None,
    content: bytes | None,
    status: int,
) -> None:
    before = await snapshot(db)
    headers = dict(signed_in) | ({"content-type": content_type} if content_type else {})
    body = content if content is not None else json.dumps(VALID[path]).encode()

    response = await client.request(METHOD[path], path, content=body, headers=headers)

    assert response.status_code == status
    assert response.json() == {
        "detail": "Content-Type must be application/json."
        if status == 415
        else "Request body is larger than 65536 bytes."
    }
    assert await snapshot(db) == before


# --- strings the database cannot hold -----------------------------------------------------------
# PostgreSQL refuses a NUL byte in any text value (asyncpg raises, and it used to be a 500), and
# no database stores a lone UTF-16 surrogate. Each must be a 4xx on every route, in every place a
# client controls, and write nothing.
UNSTORABLE = {"NUL": "a\\u0000b", "lone surrogate": "\\ud800", "low surrogate": "a\\udc00b", "long": "x" * 10_000}
ROUTES_WITH_BODIES = {path: (METHOD[path], VALID[path]) for path in VALID}


def with_raw_string(body: dict[str, Any], field: str, escaped: str) -> bytes:
    """The body as JSON, with `field` set to a JSON string written as given (escapes and all)."""
    return json.dumps({**body, field: "__placeholder__"}).replace('"__placeholder__"', f'"{escaped}"').encode()


UNSTORABLE_BODIES = [
    (path, field, what, with_raw_string(body, field, escaped))
    for path, (_, body) in ROUTES_WITH_BODIES.items()
    for field in body
    for what, escaped in UNSTORABLE.items()
    # A password that is only checked against the hash is a wrong password with a NUL: next test.
    if not (what == "NUL" and field in ("old_password", "password") and path != "/api/users/signup")
]


@pytest.mark.parametrize(
    ("path", "field", "what", "content"), UNSTORABLE_BODIES, ids=[f"{p} {f} {w}" for p, f, w, _ in UNSTORABLE_BODIES]
)
async def test_a_string_the_database_cannot_hold_in_a_body_is_400_with_a_field_error_or_invalid_json(
    client: httpx.AsyncClient,
    db: DirectDatabase,
    signed_in: dict[str, str],
    path: str,
    field: str,
    what: str,
    content: bytes,
) -> None:
    before = await snapshot(db)
    headers = {"content-type": "application/json", **signed_in}

    response = await client.request(METHOD[path], path, content=content, headers=headers)

    assert response.status_code == 400, response.text
    assert_error_shape(response)
    if "surrogate" in what:
        assert response.json()["detail"] == "Request body is not valid JSON."
    else:
        assert [error["field"] for error in response.json()["errors"]] == [field]
    assert await snapshot(db) == before


@pytest.mark.parametrize("password_field", ["signin", "old_password"])
async def test_a_password_with_a_nul_is_only_ever_hashed_so_it_is_a_wrong_password(
    client: httpx.AsyncClient, db: DirectDatabase, signed_in: dict[str, str], password_field: str
) -> None:
    # Passwords are never stored, only hashed, so a NUL in one is just a wrong password.
    if password_field == "signin":
        response = await client.post(
            "/api/users/signin", json={"username": "alice", "password": "Kiwi\x00Tango-Mango-57"}
        )
        assert response.status_code == 401
    else:
        body = {"old_password": "Kiwi\x00Tango-Mango-57", "new_password": "Better-Plum-88-Grape"}
        response = await client.put("/api/users/me/password", json=body, headers=signed_in)
        assert response.status_code == 403
        assert response.json()["errors"] == [{"field": "old_password", "message": "is not your current password"}]


@pytest.mark.parametrize(
    "path",
    [
        "/api/users/ab%00cd",
        "/api/users/%00",
        "/api/users/a%ED%A0%80b",
        "/api/users/%FF%FE",
        "/api/users/" + "x" * 5000,
        "/api/users?after=ab%00cd",
        "/api/users?after=a%ED%A0%80b",
        "/api/users?limit=%00",
    ],
)
async def test_a_string_the_database_cannot_hold_in_the_path_or_query_is_404_or_400(
    client: httpx.AsyncClient, db: DirectDatabase, path: str
) -> None:
    before = await snapshot(db)
    response = await client.get(path)
    assert response.status_code == (400 if "?" in path else 404), response.text
    assert_error_shape(response)
    assert await snapshot(db) == before


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/users/me"),
        ("POST", "/api/users/refresh"),
        ("POST", "/api/users/signout"),
        ("DELETE", "/api/users/me"),
    ],
)
@pytest.mark.parametrize("token", ["a\x00b", "\udcff\udcfe", "x" * 10_000, "e30.e30.\x00"])
async def test_a_bearer_token_the_database_cannot_hold_is_401(
    lifespan: LifespanManager, db: DirectDatabase, method: str, path: str, token: str
) -> None:
    # In-process, so that header bytes no HTTP parser would let through still reach the app.
    before = await snapshot(db)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    header = ("Bearer " + token).encode("utf-8", "surrogateescape")
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234), "headers": [(b"authorization", header)],
    }  # fmt: skip
    await lifespan.app(scope, receive, send)

    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [401]
    assert await snapshot(db) == before


async def test_a_body_with_thousands_of_unknown_fields_lists_at_most_20(
    client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    before = await snapshot(db)
    body = {**signup_body("bob"), **{f"x{i}": 0 for i in range(4000)}}  # 4,000 unknown keys, under 64 KiB
    response = await client.post("/api/users/signup", json=body)
    assert response.status_code == 400
    assert response.json()["detail"] == "Some fields are missing or invalid (the first 20 are listed)."
    assert [error["field"] for error in response.json()["errors"]] == [f"x{i}" for i in range(20)]
    assert len(response.content) < 2000
    assert await snapshot(db) == before
