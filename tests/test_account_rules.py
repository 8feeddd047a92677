"""The account rules that need the database or another field, on SQLite and PostgreSQL: emails
unique by their case-folded form, usernames unique regardless of case, and a password that
contains no word of its context (the username, the email's name, the service's name) and, when
changed, differs from the old one."""

from __future__ import annotations

import httpx
import pytest

from conftest import PASSWORD, DirectDatabase, bearer, field_errors, sign_up_and_in, signup_body
from models import EMAIL_KEY_LENGTH, email_key

pytestmark = pytest.mark.anyio


# --- emails: one notion of "the same address" on every backend ---------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("ÉLISE@example.com", "élise@example.com"),
        ("STRASSE@example.com", "straße@example.com"),
        ("ALICE@example.com", "alice@EXAMPLE.com"),
    ],
)
async def test_emails_that_differ_only_in_case_are_the_same_on_every_database(
    client: httpx.AsyncClient, db: DirectDatabase, first: str, second: str
) -> None:
    assert (await client.post("/api/users/signup", json=signup_body("one", email=first))).status_code == 201

    response = await client.post("/api/users/signup", json=signup_body("two", email=second))

    assert response.status_code == 409
    assert response.json() == {"detail": "Email already exists"}
    assert await db.usernames() == ["one"]
    created = await client.post("/api/users/signup", json=signup_body("three", email="three@example.com"))
    token = (
        await client.post("/api/users/signin", json={"username": "three", "password": "Kiwi-Tango-Mango-57"})
    ).json()
    body = {"email": second, "password": "Kiwi-Tango-Mango-57"}
    update = await client.patch("/api/users/me", json=body, headers=bearer(token["access_token"]))
    assert (created.status_code, update.status_code) == (201, 409)


def test_email_keys_fold_case_the_unicode_way() -> None:
    assert email_key("ÉLISE@Example.com") == email_key("élise@example.com") == "élise@example.com"
    assert email_key("E\u0301LISE@example.com") == "élise@example.com"  # a decomposed É: the same key
    assert email_key("STRASSE@example.com") == email_key("straße@example.com")
    assert len(email_key("ß" * 64 + "@" + "a" * 189)) <= EMAIL_KEY_LENGTH  # folding can lengthen


# --- usernames and passwords -----------------------------------------------------------------


async def test_usernames_are_unique_regardless_of_case_and_looked_up_exactly(
    client: httpx.AsyncClient, db: DirectDatabase
) -> None:
    assert (await client.post("/api/users/signup", json=signup_body("Alice"))).status_code == 201

    twin = await client.post("/api/users/signup", json=signup_body("aLICE", email="twin@example.com"))

    assert twin.status_code == 409
    assert twin.json() == {"detail": "Username already exists"}
    assert await db.usernames() == ["Alice"]
    assert (await client.get("/api/users/Alice")).status_code == 200
    assert (await client.get("/api/users/alice")).status_code == 404


@pytest.mark.parametrize(
    ("email", "password", "message"),
    [
        ("dora@example.com", "CorrectHorse9 is my name", "must not contain your username"),
        ("dora@example.com", "i am CORRECTHORSE9 really", "must not contain your username"),
        ("bluewhale@example.com", "my Bluewhale passphrase", "must not contain the name of your email address"),
        ("dora@example.com", "all the USERS love kiwis", "must not contain the service's name"),
        ("dora@example.com", "\uff23orrect\uff28orse9 in full width", "must not contain your username"),  # NFKC
    ],
)
async def test_a_password_may_not_contain_a_word_of_its_context(
    client: httpx.AsyncClient, db: DirectDatabase, email: str, password: str, message: str
) -> None:
    response = await client.post("/api/users/signup", json=signup_body("CorrectHorse9", email=email, password=password))
    assert field_errors(response) == ["password"]
    assert response.json()["errors"][0]["message"] == message
    assert await db.usernames() == []


async def test_context_words_shorter_than_four_characters_are_allowed(client: httpx.AsyncClient) -> None:
    body = signup_body("bob", email="al@example.com", password="bob and al went to see a whale")
    assert (await client.post("/api/users/signup", json=body)).status_code == 201


@pytest.mark.parametrize(
    ("new_password", "message"),
    [
        (PASSWORD, "must differ from the old one"),
        ("ALICE1234x-and-more-words", "must not contain your username"),  # the username, in another case
        ("alice-In-Chains-Forever", None),  # a part of it is not the username
    ],
)
async def test_a_new_password_must_differ_from_the_old_one_and_from_the_username(
    client: httpx.AsyncClient, new_password: str, message: str | None
) -> None:
    access = (await sign_up_and_in(client, "alice1234x"))["access_token"]
    body = {"old_password": PASSWORD, "new_password": new_password}

    response = await client.put("/api/users/me/password", json=body, headers=bearer(access))

    if message is None:
        assert response.status_code == 204
        return
    assert field_errors(response) == ["new_password"]
    assert response.json()["errors"][0]["message"] == message
    assert (await client.get("/api/users/me", headers=bearer(access))).status_code == 200  # nothing changed
