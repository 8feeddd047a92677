"""Mail, on SQLite and PostgreSQL, against a real SMTP server on loopback: a mail is written in the
request's transaction and delivered after it commits, never for a request that rolled back; the
flows that use it (password reset, email verification, notices of security changes), links
followed from the mails received; and delivery when the SMTP server is down, slow or refusing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.message import Message
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app import create_app
from conftest import PASSWORD, DirectDatabase, assert_401, bearer, sign_in, sign_up_and_in, signup_body
from settings import Settings
from smtp import SmtpServer, body_of, token_of

pytestmark = pytest.mark.anyio

NEW_PASSWORD = "Better-Plum-88-Grape"


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer().start()
    yield server
    server.stop()


def mailing(settings: Settings, smtp: SmtpServer, **changes: Any) -> Settings:
    return replace(settings, mail_url=smtp.url, mail_poll_interval=0.2, **changes)


@asynccontextmanager
async def service(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(create_app(settings)) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


@pytest.fixture
async def client(settings: Settings, smtp: SmtpServer) -> AsyncIterator[httpx.AsyncClient]:
    async with service(mailing(settings, smtp)) as client:
        yield client


async def received(smtp: SmtpServer, count: int) -> list[Message]:
    return await asyncio.to_thread(smtp.wait_for, count)


# --- the password reset -----------------------------------------------------------------------------


async def test_a_password_reset_by_mail_end_to_end(
    client: httpx.AsyncClient, smtp: SmtpServer, db: DirectDatabase
) -> None:
    old = await sign_up_and_in(client)  # and a verification mail
    await client.post("/api/users/signin", json={"username": "alice", "password": "Wrong-Guess-1"})

    asked = await client.post("/api/users/password-reset", json={"email": "ALICE@example.com"})

    assert asked.status_code == 202
    await received(smtp, 2)
    mail = smtp.to("alice@example.com")[1]
    assert mail["Subject"] == "users: reset your password"
    assert mail["Message-ID"].endswith("@localhost>")
    token = token_of(mail)
    assert f"http://127.0.0.1:8000/reset-password?token={token}" in body_of(mail)
    assert await db.scalar("SELECT count(*) FROM account_tokens WHERE token_hash = :t", {"t": token}) == 0  # hashed

    done = await client.post("/api/users/password-reset/confirm", json={"token": token, "new_password": NEW_PASSWORD})

    assert done.status_code == 204
    assert_401(await client.get("/api/users/me", headers=bearer(old["access_token"])), "Token is no longer valid")
    assert (await client.post("/api/users/refresh", headers=bearer(old["refresh_token"]))).status_code == 401
    await sign_in(client, "alice", NEW_PASSWORD)
    # The throttle forgot the failure (the signin since counted and took back its own).
    assert await db.scalar("SELECT count(*) FROM signin_failures WHERE username = 'alice' AND failures > 0") == 0
    again = await client.post("/api/users/password-reset/confirm", json={"token": token, "new_password": PASSWORD})
    assert again.status_code == 403  # once
    assert again.json()["errors"] == [{"field": "token", "message": "is not a good password reset token: it is "
                                       "wrong, used or expired"}]  # fmt: skip
    notice = (await received(smtp, 3))[2]
    assert notice["Subject"] == "users: Your password was reset"
    events = await db.column("SELECT event FROM audit_events WHERE event LIKE 'password_reset%' ORDER BY id")
    assert events == ["password_reset_requested", "password_reset"]


async def test_an_unknown_address_gets_the_same_answer_and_no_mail(
    client: httpx.AsyncClient, smtp: SmtpServer, db: DirectDatabase
) -> None:
    await client.post("/api/users/signup", json=signup_body("alice"))
    known = await client.post("/api/users/password-reset", json={"email": "alice@example.com"})
    unknown = await client.post("/api/users/password-reset", json={"email": "nobody@example.com"})

    assert (known.status_code, known.json()) == (unknown.status_code, unknown.json())
    assert unknown.json() == {
        "detail": "If an account has this address, a mail with a link to reset its password is on its way."
    }
    await received(smtp, 2)  # the verification and the reset, both alice's
    assert await db.scalar("SELECT count(*) FROM mail_outbox") == 2
    assert [mail["To"] for mail in smtp.received] == ["alice@example.com"] * 2


async def test_a_second_reset_voids_nothing_but_a_used_one_voids_the_rest(
    client: httpx.AsyncClient, smtp: SmtpServer
) -> None:
    await client.post("/api/users/signup", json=signup_body("alice"))
    for _ in range(2):
        await client.post("/api/users/password-reset", json={"email": "alice@example.com"})
    first, second = (token_of(mail) for mail in (await received(smtp, 3))[1:])
    body = {"token": second, "new_password": NEW_PASSWORD}
    assert (await client.post("/api/users/password-reset/confirm", json=body)).status_code == 204
    other = {"token": first, "new_password": "Another-Plum-99-Fig"}
    assert (await client.post("/api/users/password-reset/confirm", json=other)).status_code == 403


@pytest.mark.parametrize("token", ["expired", "wrong"])
async def test_a_wrong_or_expired_reset_token_is_a_403_and_changes_nothing(
    client: httpx.AsyncClient, smtp: SmtpServer, db: DirectDatabase, token: str
) -> None:
    await client.post("/api/users/signup", json=signup_body("alice"))
    await client.post("/api/users/password-reset", json={"email": "alice@example.com"})
    good = token_of((await received(smtp, 2))[1])
    if token == "expired":
        await db.execute("UPDATE account_tokens SET expires_at = :at", {"at": datetime.now(UTC) - timedelta(seconds=1)})
    presented = good if token == "expired" else good[:-2] + "xx"

    answer = await client.post(
        "/api/users/password-reset/confirm", json={"token": presented, "new_password": NEW_PASSWORD}
    )

    assert answer.status_code == 403
    await sign_in(client, "alice", PASSWORD)


async def test_reset_mails_are_limited_per_address_asked_for_and_per_client(
    settings: Settings, smtp: SmtpServer
) -> None:
    assert (Settings().password_reset_limit, Settings().password_reset_address_limit) == (3, 20)
    async with service(mailing(settings, smtp, password_reset_address_limit=5)) as client:
        statuses = [(await client.post("/api/users/password-reset", json={"email": "nobody@example.com"})).status_code
                    for _ in range(4)]  # fmt: skip
        assert statuses == [202, 202, 202, 429]  # counted alike for an address with no account
        others = [(await client.post("/api/users/password-reset", json={"email": f"n{i}@example.com"})).status_code
                  for i in range(3)]  # fmt: skip
        assert others == [202, 202, 429]  # five from this client in all: then 429
        assert (
            int(
                (await client.post("/api/users/password-reset", json={"email": "x@example.com"})).headers["retry-after"]
            )
            > 3500
        )


# --- email verification -------------------------------------------------------------------------------


async def test_signup_sends_a_link_that_verifies_the_address_once(
    client: httpx.AsyncClient, smtp: SmtpServer, db: DirectDatabase
) -> None:
    access = bearer((await sign_up_and_in(client))["access_token"])
    assert (await client.get("/api/users/me", headers=access)).json()["email_verified"] is False
    mail = (await received(smtp, 1))[0]
    assert mail["Subject"] == "users: verify your email address"

    assert (await client.post("/api/users/verify-email", json={"token": token_of(mail)})).status_code == 204

    assert (await client.get("/api/users/me", headers=access)).json()["email_verified"] is True
    again = await client.post("/api/users/verify-email", json={"token": token_of(mail)})
    assert again.status_code == 403
    assert again.json()["errors"][0]["field"] == "token"
    assert (await client.post("/api/users/me/verify-email", headers=access)).status_code == 409


async def test_an_email_change_is_unverified_until_its_link_and_the_old_address_hears_of_it(
    client: httpx.AsyncClient, smtp: SmtpServer
) -> None:
    access = bearer((await sign_up_and_in(client))["access_token"])
    first_link = token_of((await received(smtp, 1))[0])
    body = {"email": "alice@example.org", "password": PASSWORD}
    assert (await client.patch("/api/users/me", json=body, headers=access)).json()["email_verified"] is False
    await received(smtp, 3)
    notice = smtp.to("alice@example.com")[1]
    assert notice["Subject"] == "users: Your email address was changed to alice@example.org"
    # The old address's link proves nothing now; the new one's does.
    assert (await client.post("/api/users/verify-email", json={"token": first_link})).status_code == 403
    new_link = token_of(smtp.to("alice@example.org")[0])
    assert (await client.post("/api/users/verify-email", json={"token": new_link})).status_code == 204
    assert (await client.get("/api/users/me", headers=access)).json()["email_verified"] is True


async def test_a_password_change_is_told_to_the_owner(client: httpx.AsyncClient, smtp: SmtpServer) -> None:
    access = bearer((await sign_up_and_in(client))["access_token"])
    body = {"old_password": PASSWORD, "new_password": NEW_PASSWORD}
    assert (await client.put("/api/users/me/password", json=body, headers=access)).status_code == 204
    assert (await received(smtp, 2))[1]["Subject"] == "users: Your password was changed"


async def test_a_required_verified_email_is_asked_for_after_the_right_password(
    settings: Settings, smtp: SmtpServer
) -> None:
    async with service(mailing(settings, smtp, require_verified_email=True)) as client:
        await client.post("/api/users/signup", json=signup_body("alice"))
        wrong = await client.post("/api/users/signin", json={"username": "alice", "password": "Wrong-Guess-1"})
        right = await client.post("/api/users/signin", json={"username": "alice", "password": PASSWORD})
        assert (wrong.status_code, right.status_code) == (401, 403)
        assert right.json() == {"detail": "Verify your email address first: follow the link of the mail we sent."}
        link = token_of((await received(smtp, 1))[0])
        assert (await client.post("/api/users/verify-email", json={"token": link})).status_code == 204
        await sign_in(client)


# --- the outbox: what rolls back sends nothing -------------------------------------------------------------


async def test_a_4xx_queues_nothing(client: httpx.AsyncClient, db: DirectDatabase) -> None:
    access = bearer((await sign_up_and_in(client))["access_token"])
    await client.post("/api/users/signup", json=signup_body("bob"))
    queued = await db.scalar("SELECT count(*) FROM mail_outbox")
    taken = await client.patch("/api/users/me", json={"email": "bob@example.com", "password": PASSWORD}, headers=access)
    assert taken.status_code == 409  # an email change answered 409 sends neither its link nor its notice
    assert (await client.post("/api/users/signup", json=signup_body("alice"))).status_code == 409
    assert await db.scalar("SELECT count(*) FROM mail_outbox") == queued == 2


async def test_a_failed_commit_queues_nothing_and_sends_nothing(
    client: httpx.AsyncClient, smtp: SmtpServer, db: DirectDatabase
) -> None:
    # The database refuses the commit of any signup (a deferred foreign key, checked only then),
    # after the app has written the user and its verification mail.
    await db.execute("CREATE TABLE notes (user_id BIGINT NOT NULL REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED)")
    if db.backend == "sqlite":
        await db.execute("CREATE TRIGGER broken AFTER INSERT ON users BEGIN INSERT INTO notes VALUES (424242); END")
    else:
        await db.execute("CREATE FUNCTION broken() RETURNS trigger LANGUAGE plpgsql AS "
                         "$$ BEGIN INSERT INTO notes VALUES (424242); RETURN NULL; END $$")  # fmt: skip
        await db.execute("CREATE TRIGGER broken AFTER INSERT ON users FOR EACH ROW EXECUTE FUNCTION broken()")

    assert (await client.post("/api/users/signup", json=signup_body("alice"))).status_code == 500

    assert await db.scalar("SELECT count(*) FROM mail_outbox") == 0
    assert await db.usernames() == []
    await client.get("/healthz")
    assert smtp.received == []
