"""Delivery, on SQLite and PostgreSQL, against a real SMTP server on loopback: no request waits for
SMTP; an SMTP server that is down, slow or refusing loses nothing and sends nothing twice in normal
operation; several workers and replicas share the outbox; a process killed mid-delivery loses
nothing (at least once: only the message in flight may come twice)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app import create_app
from chaos import ServiceProcess
from conftest import DirectDatabase, eventually, signup_body
from mailer import Mailer
from settings import Settings
from smtp import SmtpServer, token_of

pytestmark = pytest.mark.anyio


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer()
    yield server
    server.stop()


@asynccontextmanager
async def service(settings: Settings, smtp: SmtpServer, **changes: Any) -> AsyncIterator[httpx.AsyncClient]:
    changed = replace(settings, mail_url=smtp.url, mail_poll_interval=0.2, mail_retry_max_delay=0.5, **changes)
    async with LifespanManager(create_app(changed)) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


async def tried(db: DirectDatabase, what: str, least: int, where: str = "1 = 1") -> bool:
    return bool((await db.scalar(f"SELECT {what} FROM mail_outbox WHERE {where}") or 0) >= least)


async def all_sent(db: DirectDatabase, where: str = "1 = 1") -> bool:
    return not await db.scalar(f"SELECT count(*) FROM mail_outbox WHERE status <> 'sent' AND {where}")


async def reset(client: httpx.AsyncClient, email: str = "alice@example.com") -> None:
    assert (await client.post("/api/users/password-reset", json={"email": email})).status_code == 202


async def test_smtp_down_when_the_request_comes_answers_at_once_and_delivers_later(
    settings: Settings, smtp: SmtpServer, db: DirectDatabase
) -> None:
    async with service(settings, smtp) as client:  # nothing listens on the SMTP port yet
        await client.post("/api/users/signup", json=signup_body("alice"))
        await reset(client)
        await eventually(lambda: tried(db, "min(attempts)", 2))  # tried, failed, tried again, each
        assert await db.scalar("SELECT count(*) FROM mail_outbox WHERE status = 'pending'") == 2
        smtp.start()
        messages = await asyncio.to_thread(smtp.wait_for, 2)
        await eventually(lambda: all_sent(db))
        metrics = (await client.get("/metrics")).text
    assert sorted(m["Subject"] for m in messages) == ["users: reset your password", "users: verify your email address"]
    assert 'mail_messages_total{outcome="retried"}' in metrics
    assert 'mail_messages_total{outcome="sent"} 2.0' in metrics


async def test_a_stalled_smtp_server_does_not_slow_a_request(settings: Settings, smtp: SmtpServer) -> None:
    smtp.start()
    smtp.stall.clear()  # DATA is held until the test lets it go
    async with service(settings, smtp) as client:
        await client.post("/api/users/signup", json=signup_body("alice"))  # its mail: DATA held
        await asyncio.to_thread(smtp.stalled.wait, 10)
        await reset(client)  # answered while the SMTP conversation hangs
        assert not smtp.stall.is_set()
        smtp.stall.set()
        await asyncio.to_thread(smtp.wait_for, 2)


async def test_a_5xx_fails_a_message_at_once_and_a_4xx_is_tried_again(
    settings: Settings, smtp: SmtpServer, db: DirectDatabase
) -> None:
    smtp.start()
    smtp.refuse = {"bad@example.com": "550 no such mailbox", "busy@example.com": "451 try again later"}
    async with service(settings, smtp) as client:
        for name in ("bad", "busy", "good"):
            await client.post("/api/users/signup", json=signup_body(name))
        await asyncio.to_thread(smtp.wait_for, 1)
        await eventually(lambda: tried(db, "attempts", 3, "recipient = 'busy@example.com'"))
        smtp.refuse.pop("busy@example.com")
        await asyncio.to_thread(smtp.wait_for, 2)
        await eventually(lambda: all_sent(db, "recipient <> 'bad@example.com'"))

        async def nothing_pending() -> bool:
            return "mail_outbox_pending 0.0" in (await client.get("/metrics")).text  # the loop's next look

        await eventually(nothing_pending)
        metrics = (await client.get("/metrics")).text
    rows = await db.rows("SELECT recipient, status, attempts, body, last_error FROM mail_outbox ORDER BY recipient")
    bad, busy, good = (tuple(row) for row in rows)
    assert bad[:3] == ("bad@example.com", "failed", 1)  # at once, kept with its body for an operator
    assert "verify-email?token=" in bad[3]
    assert "550" in bad[4]
    assert busy[:2] == ("busy@example.com", "sent")
    assert busy[2] >= 3  # refused twice at least, then sent
    assert good[:4] == ("good@example.com", "sent", 1, None)  # sent: its body (its token) is gone
    assert 'mail_messages_total{outcome="failed"} 1.0' in metrics


def test_retries_back_off_from_one_second_doubling_jittered_and_capped(settings: Settings) -> None:
    mailer = Mailer.__new__(Mailer)
    mailer.settings = replace(settings, mail_retry_max_delay=300)
    for attempts, (low, high) in {1: (0.5, 1.5), 2: (1, 3), 5: (8, 24), 20: (150, 300)}.items():
        delays = [mailer.backoff(attempts).total_seconds() for _ in range(200)]
        assert low <= min(delays), attempts
        assert max(delays) <= high, attempts
        assert len(set(delays)) > 1, attempts  # jittered


async def test_old_messages_are_purged_and_a_failed_ones_body_goes_with_its_token(
    settings: Settings, smtp: SmtpServer, db: DirectDatabase
) -> None:
    long_ago, later = datetime.now(UTC) - timedelta(days=8), datetime.now(UTC) + timedelta(hours=1)
    for i, (status, sent_at, expires) in enumerate(
        [
            ("sent", long_ago, None),
            ("sent", datetime.now(UTC), None),
            ("failed", None, long_ago),
            ("failed", None, later),
        ]
    ):
        await db.execute(
            "INSERT INTO mail_outbox (message_id, kind, recipient, subject, body, status, attempts, next_attempt_at, "
            "created_at, sent_at, token_expires_at) VALUES (:id, 'notice', 'a@example.com', 's', 'b', :status, 1, "
            ":now, :now, :sent, :expires)",
            {"id": f"<{i}@test>", "status": status, "now": long_ago, "sent": sent_at, "expires": expires},
        )
    smtp.start()
    async with service(settings, smtp) as client:  # a loop purges as it starts, then once a minute
        await client.get("/healthz")
        await eventually(lambda: tried(db, "4 - count(*)", 1))  # one purged, at least
    left = await db.rows("SELECT message_id, body IS NULL FROM mail_outbox ORDER BY message_id")
    assert [tuple(row) for row in left] == [("<1@test>", False), ("<2@test>", True), ("<3@test>", False)]


async def test_with_an_smtp_url_no_token_reaches_the_log(database_url: str, smtp: SmtpServer, tmp_path: Path) -> None:
    smtp.start()
    service = ServiceProcess(database_url, tmp_path / "service.log", MAIL_URL=smtp.url, MAIL_POLL_INTERVAL="0.2")
    try:
        async with httpx.AsyncClient(base_url=service.url) as client:
            await client.post("/api/users/signup", json=signup_body("alice"))
            await reset(client)
            messages = await asyncio.to_thread(smtp.wait_for, 2)
    finally:
        service.stop()
    log = service.log()
    assert log.count("mail sent:") == 2
    for message in messages:
        assert token_of(message) not in log
    assert "MAIL_URL is log" not in log


# --- several processes, and one killed --------------------------------------------------------------------


async def test_two_replicas_of_two_workers_deliver_every_message_once(
    database_url: str, smtp: SmtpServer, tmp_path: Path, db: DirectDatabase
) -> None:
    smtp.start()
    settings = {
        "MAIL_URL": smtp.url, "MAIL_POLL_INTERVAL": "0.2", "WEB_CONCURRENCY": "2", "PASSWORD_RESET_LIMIT": "1000",
        "PASSWORD_RESET_ADDRESS_LIMIT": "0",
    }  # fmt: skip
    replicas = [ServiceProcess(database_url, tmp_path / f"replica{i}.log", **settings) for i in range(2)]
    users, resets = 5, 100
    try:
        async with httpx.AsyncClient(base_url=replicas[0].url, timeout=30) as first:
            for i in range(users):
                assert (await first.post("/api/users/signup", json=signup_body(f"user{i}"))).status_code == 201
        gate = asyncio.Semaphore(16)

        async def ask(i: int) -> None:
            async with (
                gate,
                httpx.AsyncClient(base_url=replicas[i % 2].url, timeout=30) as client,
            ):  # a new connection: any worker
                await reset(client, f"user{i % users}@example.com")

        await asyncio.gather(*(ask(i) for i in range(resets)))
        messages = await asyncio.to_thread(smtp.wait_for, users + resets, 120)
    finally:
        for replica in replicas:
            replica.stop()
    counts = Counter(message["Message-ID"] for message in messages)
    assert len(counts) == users + resets
    assert [message_id for message_id, count in counts.items() if count > 1] == []  # none twice
    assert await db.scalar("SELECT count(*) FROM mail_outbox WHERE status <> 'sent'") == 0
    senders = sum(1 for replica in replicas if "mail sent:" in replica.log())
    print(f"outbox: {len(messages)} messages from 2 replicas of 2 workers, none twice; {senders} replicas sent some")


async def test_a_process_killed_mid_delivery_loses_nothing(
    database_url: str, smtp: SmtpServer, tmp_path: Path, db: DirectDatabase
) -> None:
    smtp.start()
    smtp.stall.clear()
    settings = {
        "MAIL_URL": smtp.url,
        "MAIL_POLL_INTERVAL": "0.2",
        "MAIL_CLAIM_LEASE": "2",
        "PASSWORD_RESET_LIMIT": "100",
    }
    first = ServiceProcess(database_url, tmp_path / "first.log", **settings)
    async with httpx.AsyncClient(base_url=first.url, timeout=30) as client:
        await client.post("/api/users/signup", json=signup_body("alice"))
        await asyncio.to_thread(smtp.stalled.wait, 10)  # the signup's mail is in flight, its DATA held
        for _ in range(10):
            await reset(client)  # queued behind it
    first.process.kill()  # SIGKILL: no shutdown, its claims stay until their lease ends
    first.process.wait()
    first.stop()  # (gone already: this closes its log)
    smtp.stall.set()
    second = ServiceProcess(database_url, tmp_path / "second.log", **settings)
    try:
        received = await asyncio.to_thread(smtp.wait_for, 11, 60)
        await eventually(lambda: all_sent(db))
    finally:
        second.stop()
    counts = Counter(message["Message-ID"] for message in smtp.received)
    in_flight = [message["Message-ID"] for message in received if "verify" in message["Subject"]]
    assert len(counts) == 11  # every message arrived
    twice = [message_id for message_id, count in counts.items() if count > 1]
    assert set(twice) <= set(in_flight)  # only the one in flight may have come twice
    print(f"killed mid-delivery: 11 messages, {len(twice)} duplicate(s), the one in flight")
