"""The signin throttle, kept in the database: per username and address, per address, race-safe
across workers, a 429 that costs no hash, cleared by a success, expiring with its window."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

import passwords
from app import create_app
from chaos import ServiceProcess
from conftest import DirectDatabase, client_from, signup_body
from settings import Settings

pytestmark = pytest.mark.anyio

PASSWORD = "Kiwi-Tango-Mango-57"


@pytest.fixture
def settings(database_url: str) -> Settings:
    secret = "throttle-secret-0123456789abcdefghijklmnop"
    return Settings(database_url=database_url, secret_key=secret, argon2_memory_kib=1024, argon2_time_cost=1)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Starlette]:
    async with LifespanManager(create_app(settings)) as manager:
        yield manager.app  # type: ignore[misc]


async def signin(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await client.post("/api/users/signin", json={"username": username, "password": password})


def assert_429(response: httpx.Response, window: int = 900) -> None:
    assert response.status_code == 429, response.text
    seconds = int(response.headers["retry-after"])
    assert 1 <= seconds <= window
    assert response.json() == {"detail": f"Too many failed attempts; try again in {seconds} seconds."}


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every password verification the service runs (each one costs an Argon2 hash)."""
    seen: list[str] = []
    verify = passwords.Hashing._verify

    def counting(self: passwords.Hashing, password_hash: str | None, password: str) -> tuple[bool, bool]:
        seen.append(password)
        return verify(self, password_hash, password)

    monkeypatch.setattr(passwords.Hashing, "_verify", counting)
    return seen


async def test_after_five_failures_the_sixth_attempt_is_429_without_a_hash_even_with_the_right_password(
    app: Starlette, verifications: list[str]
) -> None:
    async with client_from(app, "198.51.100.7") as client:
        assert (await client.post("/api/users/signup", json=signup_body("alice"))).status_code == 201
        for _ in range(5):
            failed = await signin(client, "alice", "Wrong-Guess-1")
            assert failed.status_code == 401
            assert failed.headers["www-authenticate"] == 'Bearer realm="users"'
        checked = len(verifications)

        assert_429(await signin(client, "alice", "Wrong-Guess-2"))
        assert_429(await signin(client, "alice", PASSWORD))  # otherwise the throttle is an oracle

        assert len(verifications) == checked  # throttled attempts cost no hash
        assert (await signin(client, "bob", "Wrong-Guess-1")).status_code == 401  # another username is not


async def test_the_owner_from_another_address_is_not_throttled(app: Starlette) -> None:
    async with client_from(app, "198.51.100.7") as attacker, client_from(app, "203.0.113.9") as owner:
        assert (await owner.post("/api/users/signup", json=signup_body("alice"))).status_code == 201
        for _ in range(6):
            await signin(attacker, "alice", "Wrong-Guess-1")
        assert_429(await signin(attacker, "alice", PASSWORD))

        assert (await signin(owner, "alice", PASSWORD)).status_code == 200


async def test_a_success_clears_that_usernames_count_for_that_address(app: Starlette, db: DirectDatabase) -> None:
    async with client_from(app, "198.51.100.7") as client:
        assert (await client.post("/api/users/signup", json=signup_body("alice"))).status_code == 201
        for _ in range(4):
            assert (await signin(client, "alice", "Wrong-Guess-1")).status_code == 401
        assert (await signin(client, "alice", PASSWORD)).status_code == 200
        assert await db.rows("SELECT * FROM signin_failures WHERE username = 'alice' AND address <> ''") == []
        # The account's count does not forget (the owner's success does not let a guesser start again).
        assert await db.scalar("SELECT failures FROM signin_failures WHERE address = '' AND username = 'alice'") == 4
        for _ in range(5):
            assert (await signin(client, "alice", "Wrong-Guess-1")).status_code == 401
        assert_429(await signin(client, "alice", "Wrong-Guess-1"))
    # The address's count holds the failures only: the success was taken back from it, and so was
    # the throttled attempt (the pair's rule stopped it).
    assert await db.scalar("SELECT failures FROM signin_failures WHERE kind = 'password' AND username = ''") == 9


async def test_fifty_failures_from_one_address_over_any_usernames_throttle_that_address(
    app: Starlette, verifications: list[str]
) -> None:
    async with client_from(app, "198.51.100.7") as stuffer, client_from(app, "203.0.113.9") as other:
        assert (await other.post("/api/users/signup", json=signup_body("alice"))).status_code == 201
        for i in range(50):  # existing or not: the throttle must not tell which usernames exist
            username = "alice" if i == 0 else f"nobody{i:02d}"
            assert (await signin(stuffer, username, "Wrong-Guess-1")).status_code == 401, i
        checked = len(verifications)

        assert_429(await signin(stuffer, "someone-new", "Wrong-Guess-1"))
        assert_429(await signin(stuffer, "alice", PASSWORD))
        assert len(verifications) == checked
        assert (await signin(other, "alice", PASSWORD)).status_code == 200


async def test_the_window_expires_and_old_records_are_purged(settings: Settings, db: DirectDatabase) -> None:
    async with (
        LifespanManager(create_app(replace(settings, signin_failure_window=1))) as manager,
        client_from(manager.app, "198.51.100.7") as client,  # type: ignore[arg-type]
    ):
        await client.post("/api/users/signup", json=signup_body("alice"))
        for _ in range(5):
            await signin(client, "alice", "Wrong-Guess-1")
        assert_429(await signin(client, "alice", PASSWORD), window=1)
        await asyncio.sleep(1.1)  # the window passes

        assert (await signin(client, "bob", "Wrong-Guess-1")).status_code == 401  # purges on the way
        assert set(await db.column("SELECT username FROM signin_failures WHERE kind = 'password'")) == {"bob", ""}
        assert (await signin(client, "alice", PASSWORD)).status_code == 200


@pytest.mark.parametrize(("user_limit", "address_limit"), [(0, 50), (5, 0), (0, 0)])
async def test_a_limit_of_zero_turns_that_rule_off(
    settings: Settings, db: DirectDatabase, user_limit: int, address_limit: int
) -> None:
    changed = replace(settings, signin_failure_limit=user_limit, signin_address_failure_limit=address_limit)
    async with (
        LifespanManager(create_app(changed)) as manager,
        client_from(manager.app, "198.51.100.7") as client,  # type: ignore[arg-type]
    ):
        await client.post("/api/users/signup", json=signup_body("alice"))
        statuses = [(await signin(client, "alice", "Wrong-Guess-1")).status_code for _ in range(8)]
    assert statuses == ([401] * 8 if user_limit == 0 else [401] * 5 + [429] * 3)
    assert await db.scalar("SELECT count(*) FROM signin_failures WHERE kind = 'password' AND username = ''") == (
        1 if address_limit else 0
    )


async def test_a_wrong_old_password_is_a_403_that_counts_towards_the_throttle(
    app: Starlette, db: DirectDatabase
) -> None:
    async with client_from(app, "198.51.100.7") as client:
        await client.post("/api/users/signup", json=signup_body("alice"))
        token = (await signin(client, "alice", PASSWORD)).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        body = {"old_password": "Wrong-Guess-1", "new_password": "Better-Plum-88-Grape"}

        wrong = await client.put("/api/users/me/password", json=body, headers=headers)

        assert wrong.status_code == 403
        assert wrong.json() == {
            "detail": "The request is valid, but its proof was refused; nothing was changed.",
            "errors": [{"field": "old_password", "message": "is not your current password"}],
        }
        for _ in range(4):
            assert (await client.put("/api/users/me/password", json=body, headers=headers)).status_code == 403
        assert_429(await client.put("/api/users/me/password", json=body, headers=headers))
        assert_429(await signin(client, "alice", PASSWORD))
        assert (await client.get("/api/users/me", headers=headers)).status_code == 200  # still signed in


# --- through real HTTP, two workers ---------------------------------------------------------


@pytest.fixture
def two_workers(database_url: str, tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    services: list[ServiceProcess] = []

    def start(**settings: str) -> ServiceProcess:
        service = ServiceProcess(
            database_url, tmp_path / "service.log", WEB_CONCURRENCY="2", FORWARDED_ALLOW_IPS="127.0.0.1", **settings
        )
        services.append(service)
        return service

    yield start
    for service in services:
        service.stop()


async def timed(client: httpx.AsyncClient, username: str, password: str, address: str | bytes) -> tuple[int, float]:
    start = time.perf_counter()
    forwarded = address if isinstance(address, bytes) else address.encode()
    response = await client.post(
        "/api/users/signin", json={"username": username, "password": password}, headers={b"X-Forwarded-For": forwarded}
    )
    return response.status_code, time.perf_counter() - start


async def test_twenty_concurrent_guesses_against_two_workers_get_at_most_five_hashes(
    two_workers: Callable[..., ServiceProcess],
) -> None:
    service = two_workers(ARGON2_MEMORY_KIB="19456", ARGON2_TIME_COST="2")  # what a hash costs, measured below
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(base_url=service.url, limits=limits, timeout=30) as client:
        assert (await client.post("/api/users/signup", json=signup_body("alice"))).status_code == 201

        results = await asyncio.gather(*(timed(client, "alice", f"Wrong-Guess-{i}", "198.51.100.7") for i in range(20)))

        statuses = sorted(status for status, _ in results)
        assert statuses == [401] * 5 + [429] * 15  # every 401 cost a hash; no 429 did
        owner = await timed(client, "alice", PASSWORD, "203.0.113.9")
        assert owner[0] == 200  # from another address (X-Forwarded-For, trusted from 127.0.0.1)

        # The cost of a throttled answer against a wrong password's, one at a time.
        wrong = [(await timed(client, f"user{i}", "Wrong-Guess-1", f"192.0.2.{i}"))[1] for i in range(15)]
        throttled = [(await timed(client, "alice", "Wrong-Guess-1", "198.51.100.7"))[1] for _ in range(15)]
    ratio = statistics.median(throttled) / statistics.median(wrong)
    print(
        f"throttle: 429 median {statistics.median(throttled) * 1000:.1f} ms, wrong password (401) median "
        f"{statistics.median(wrong) * 1000:.1f} ms, ratio {ratio:.2f}"
    )
    assert "Started server process" in service.log()
    assert service.log().count("Started server process") == 2


async def test_the_address_rule_across_workers_uses_the_forwarded_address(
    two_workers: Callable[..., ServiceProcess],
) -> None:
    service = two_workers(SIGNIN_ADDRESS_FAILURE_LIMIT="10")
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
        statuses = [(await timed(client, f"name{i}", "Wrong-Guess-1", "198.51.100.7"))[0] for i in range(12)]
        other = await timed(client, "name0", "Wrong-Guess-1", "203.0.113.9")
    assert statuses == [401] * 10 + [429] * 2
    assert other[0] == 401


# --- per account, whatever the address ------------------------------------------------------------


async def test_failures_for_one_account_from_any_addresses_throttle_that_account(
    settings: Settings, db: DirectDatabase, verifications: list[str]
) -> None:
    assert Settings().signin_account_failure_limit == 100  # NIST SP 800-63B rev 4's most; 10 here, for speed
    async with (
        LifespanManager(create_app(replace(settings, signin_account_failure_limit=10))) as manager,
        client_from(manager.app, "203.0.113.9") as owner,  # type: ignore[arg-type]
    ):
        await owner.post("/api/users/signup", json=signup_body("alice"))
        statuses = []
        for i in range(12):  # a botnet: a new address for every guess, each under its own limits
            async with client_from(manager.app, f"198.51.100.{i}") as guesser:  # type: ignore[arg-type]
                statuses.append((await signin(guesser, "Alice", f"Wrong-Guess-{i}")).status_code)
        assert statuses == [401] * 10 + [429] * 2  # "Alice" is alice's account too
        assert len(verifications) == 10
        assert_429(await signin(owner, "alice", PASSWORD))  # the owner too, from anywhere new
        assert (await signin(owner, "bob", "Wrong-Guess-1")).status_code == 401  # another account is not


# --- signups, per address ---------------------------------------------------------------------------


async def test_signups_from_one_address_are_limited_before_any_hash(
    settings: Settings, db: DirectDatabase, verifications: list[str]
) -> None:
    assert (Settings().signup_address_limit, Settings().signup_window) == (50, 3600)
    async with (
        LifespanManager(create_app(replace(settings, signup_address_limit=3))) as manager,
        client_from(manager.app, "198.51.100.7") as client,  # type: ignore[arg-type]
        client_from(manager.app, "203.0.113.9") as other,  # type: ignore[arg-type]
    ):
        answers = [(await client.post("/api/users/signup", json=signup_body(name))) for name in ("a01", "a01", "a02")]
        assert [answer.status_code for answer in answers] == [201, 409, 201]  # a 409 counts: it tells what exists
        refused = await client.post("/api/users/signup", json=signup_body("a03"))
        assert refused.status_code == 429
        seconds = int(refused.headers["retry-after"])
        assert 3500 < seconds <= 3600
        assert refused.json() == {"detail": f"Too many signups from this address; try again in {seconds} seconds."}
        assert (await client.post("/api/users/signup", json={"username": "a04"})).status_code == 400  # not counted
        assert (await other.post("/api/users/signup", json=signup_body("b01"))).status_code == 201
    assert await db.usernames() == ["a01", "a02", "b01"]


async def test_a_signup_limit_of_zero_turns_it_off(settings: Settings, db: DirectDatabase) -> None:
    async with (
        LifespanManager(create_app(replace(settings, signup_address_limit=0))) as manager,
        client_from(manager.app, "198.51.100.7") as client,  # type: ignore[arg-type]
    ):
        for name in ("a01", "a02", "a03"):
            assert (await client.post("/api/users/signup", json=signup_body(name))).status_code == 201
    assert await db.scalar("SELECT count(*) FROM signin_failures") == 0


# --- bounded bookkeeping --------------------------------------------------------------------------


async def test_a_throttled_spray_adds_no_rows_and_no_counts(
    settings: Settings, db: DirectDatabase, verifications: list[str]
) -> None:
    async with (
        LifespanManager(create_app(replace(settings, signin_address_failure_limit=5))) as manager,
        client_from(manager.app, "198.51.100.7") as client,  # type: ignore[arg-type]
    ):
        statuses = [(await signin(client, f"random{i:03d}", "Wrong-Guess-1")).status_code for i in range(40)]
    assert statuses == [401] * 5 + [429] * 35
    assert len(verifications) == 5
    # The address's row, and a row per account and per (address, account) for the five checked.
    assert await db.scalar("SELECT count(*) FROM signin_failures") == 11
    assert await db.scalar("SELECT failures FROM signin_failures WHERE username = ''") == 7  # capped past its limit
