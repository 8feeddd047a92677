"""Bad requests: every one gets a 4xx in the one error shape and writes nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from conftest import DirectDatabase, signup_body

pytestmark = pytest.mark.anyio

SIGNUP = "/api/users/signup"


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (b"{not json", "Request body is not valid JSON."),
        (b"", "Request body is not valid JSON."),
        (b'{"username": "al\xffce"}', "Request body is not valid JSON."),
        (b"[]", "Request body must be a JSON object."),
        (b'"alice"', "Request body must be a JSON object."),
        (b"null", "Request body must be a JSON object."),
    ],
)
async def test_a_body_that_is_not_a_json_object_is_400(
    client: httpx.AsyncClient, db: DirectDatabase, content: bytes, detail: str
) -> None:
    response = await client.post(SIGNUP, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"detail": detail}
    assert await db.usernames() == []


async def test_json_with_a_charset_parameter_is_accepted(client: httpx.AsyncClient) -> None:
    headers = {"content-type": "Application/JSON; charset=utf-8"}
    response = await client.post(SIGNUP, content=json.dumps(signup_body()), headers=headers)
    assert response.status_code == 201


async def test_a_streamed_oversized_body_is_413_without_reading_it_all(
    client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(1000):  # 16 MB if it were all read
            sent += 1
            yield b" " * 16384

    response = await client.post(SIGNUP, content=chunks(), headers={"content-type": "application/json"})

    assert response.status_code == 413
    assert sent < 10
    assert await db.usernames() == []


async def test_unknown_path_is_a_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/nothing-here")
    assert response.status_code == 404
    assert response.json() == {"detail": "Nothing matches the given URI."}


async def test_wrong_method_is_a_json_405(client: httpx.AsyncClient) -> None:
    response = await client.delete("/api/users/signup")
    assert response.status_code == 405
    assert response.json() == {"detail": "Specified method is invalid for this resource."}
    assert response.headers["allow"] == "POST"


@pytest.mark.parametrize(
    "username",
    ["alice'; DROP TABLE users; --", "al\x00ice", "al\nice", "\ufb00oo", "\uff21lice", "alice\u200b"],
)
async def test_hostile_usernames_are_400_and_the_table_survives(
    client: httpx.AsyncClient, db: DirectDatabase, username: str
) -> None:
    response = await client.post(SIGNUP, json=signup_body(username, email="x@example.com"))
    assert response.status_code == 400
    assert (await client.get("/api/users")).json() == {"items": [], "next": None}
    assert await db.usernames() == []
