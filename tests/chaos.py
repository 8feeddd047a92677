"""Tools for the fault suite (tests/test_faults.py): a PostgreSQL cluster the tests may kill and
restart, a TCP proxy that can delay, blackhole and reset, the service as a real uvicorn process,
a load driver, and the check of the promise against the database itself."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import httpx

PROJECT_DIR = Path(__file__).resolve().parent.parent
SUMMARY: list[dict[str, Any]] = []  # one row a scenario, printed at the end of the run (conftest)
APP = "app:create_app"
SECRET_KEY = "faults-secret-0123456789abcdefghijklmnop"  # one key for every process of a test

# Short bounds, so that every wait in these scenarios is visibly bounded.
TIMEOUTS = {"DB_POOL_TIMEOUT": "2", "DB_CONNECT_TIMEOUT": "2", "DB_COMMAND_TIMEOUT": "3"}
LONGEST_WAIT = 2 + 2 + 3  # a request can wait for the pool, a (re)connect and a statement, at most
MARGIN = 1.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def postgres_bindir() -> Path | None:
    candidates = [os.environ.get("PG_BINDIR", ""), *sorted(glob.glob("/usr/lib/postgresql/*/bin"))[::-1]]
    return next((Path(c) for c in candidates if c and (Path(c) / "initdb").exists()), None)


class Cluster:
    """A throwaway PostgreSQL cluster of the fault suite's own, on a free loopback port."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="users-faults-"))
        self.port = free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:  # initdb and postgres refuse to run as root
            shutil.chown(self.root, "postgres", "postgres")
        self._pg("initdb", "-D", str(self.root / "data"), "-U", "postgres", "-A", "trust", "--no-sync")

    def _pg(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_postgres, str(self.bindir / tool), *args], check=True, capture_output=True)

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=100"
        self._pg("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "log"), "-w", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.root / "data"), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", port: int | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{port or self.port}/{database}"

    async def sql(self, query: str, *args: Any, database: str = "postgres") -> list[Any]:
        connection = await asyncpg.connect(self.url(database), timeout=5)
        try:
            return list(await connection.fetch(query, *args))
        finally:
            await connection.close()


class Databases(Protocol):
    """Where the promise is checked: a Cluster, or the primary of a Patroni cluster (tests/ha.py)."""

    async def sql(self, query: str, *args: Any, database: str = "postgres") -> list[Any]: ...


class PgBouncer:
    """Debian's PgBouncer in transaction mode in front of a cluster, run as the `postgres` user."""

    def __init__(self, postgres_port: int) -> None:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="users-pgbouncer-"))
        (self.dir / "userlist.txt").write_text('"postgres" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            f"""[databases]
* = host=127.0.0.1 port={postgres_port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir = {self.dir}
auth_type = trust
auth_file = {self.dir}/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 1000
ignore_startup_parameters = extra_float_digits
logfile = {self.dir}/pgbouncer.log
"""
        )
        user = "postgres" if os.geteuid() == 0 else None
        if user:  # like initdb, pgbouncer refuses to run as root
            for path in (self.dir, *self.dir.iterdir()):
                shutil.chown(path, user, user)
        # Our own child (not through runuser), so that stop() can wait for it and reap it.
        self.process = subprocess.Popen([binary, "-q", str(self.dir / "pgbouncer.ini")], user=user, group=user)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start: {self.log()}")
            time.sleep(0.05)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def log(self) -> str:
        path = self.dir / "pgbouncer.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class TcpProxy:
    """A loopback TCP proxy in front of PostgreSQL whose link can be slowed, cut or reset."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.delay = 0.0
        self.blackhole = False  # while set, bytes in both directions are dropped, sockets stay open
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers.add(upstream_writer)
            await asyncio.gather(self._pipe(client_reader, upstream_writer), self._pipe(upstream_reader, client_writer))
        except OSError:
            pass
        finally:
            self._tasks.discard(task)
            for writer in (client_writer, locals().get("upstream_writer")):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.blackhole:
                    continue
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    def reset(self) -> None:
        """Reset every open connection (an RST, as a failing middlebox would send)."""

        def reset_all() -> None:
            for writer in list(self._writers):
                sock = writer.get_extra_info("socket")
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()

        self._loop.call_soon_threadsafe(reset_all)

    def close(self) -> None:
        async def shut_down() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shut_down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


class ServiceProcess:
    """The service as a real uvicorn process on a free loopback port, started as scripts/serve
    starts it (server.py); `app` another factory, from tests/."""

    def __init__(self, database_url: str, log_path: Path, app: str = APP, **settings: str) -> None:
        self.log_path = log_path
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "SECRET_KEY": SECRET_KEY,
            # These suites sign up hundreds of users from one address; the signup throttle has tests of its own.
            "SIGNUP_ADDRESS_LIMIT": "0",
            # Cheap hashes: what a hash costs is not what these suites prove (tests/conftest.py).
            "ARGON2_MEMORY_KIB": "1024",
            "ARGON2_TIME_COST": "1",
            **settings,
        }
        self.command = [sys.executable, "server.py", app]
        self.command += ["--app-dir", str(PROJECT_DIR / "tests")] if app != APP else []
        # A free port can be taken by another test's process between free_port() and the bind
        # (pytest-xdist runs four at once): then the service starts again on another.
        for _ in range(3):
            if self._start():
                return
        raise RuntimeError(f"the service did not start:\n{self.log()}")

    def _start(self) -> bool:
        """Whether the service answered; False if its port was taken; raises if it failed otherwise."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = self.log_path.open("w")
        env = {**self.env, "PORT": str(self.port)}
        self.process = subprocess.Popen(
            self.command, cwd=PROJECT_DIR, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return True
            except httpx.TransportError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        self.process.kill()
        self.process.wait()
        self._log.close()
        if "address already in use" in self.log():
            return False
        raise RuntimeError(f"the service did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        finally:
            self._log.close()


@dataclass
class Outcome:
    username: str
    status: int | None  # None: no answer (timeout, reset, or the client gave up)
    seconds: float
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    started: float = 0.0  # time.monotonic() as it was sent


async def sign_up(client: httpx.AsyncClient, username: str, patience: float = 30) -> Outcome:
    body = {"username": username, "password": "Kiwi-Tango-Mango-57", "email": f"{username}@example.com"}
    start = time.monotonic()
    try:
        response = await client.post("/api/users/signup", json=body, timeout=patience)
    except httpx.HTTPError:
        return Outcome(username, None, time.monotonic() - start, started=start)
    seconds = time.monotonic() - start
    return Outcome(username, response.status_code, seconds, response.text, dict(response.headers), start)


def names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(count)]


async def keep_signing_up(
    url: str, prefix: str, stop: asyncio.Event, workers: int = 16, outcomes: list[Outcome] | None = None
) -> list[Outcome]:
    """Unique signups from several clients until `stop` is set (into `outcomes`, as they come)."""
    outcomes = [] if outcomes is None else outcomes

    async def worker(w: int) -> None:
        async with httpx.AsyncClient(base_url=url) as client:
            i = 0
            while not stop.is_set():
                outcomes.append(await sign_up(client, f"{prefix}{w:02d}x{i:04d}", patience=LONGEST_WAIT + 10))
                i += 1

    await asyncio.gather(*(worker(w) for w in range(workers)))
    return outcomes


async def sign_up_many(url: str, usernames: Iterable[str], concurrency: int, patience: float = 30) -> list[Outcome]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:

        async def one(username: str) -> Outcome:
            async with semaphore:
                return await sign_up(client, username, patience)

        return list(await asyncio.gather(*(one(name) for name in usernames)))


@dataclass
class Verdict:
    scenario: str
    outcomes: list[Outcome]
    existing: set[str]
    violations: list[str]
    in_doubt: list[str]
    leaked: int

    def row(self) -> dict[str, Any]:
        statuses = [o.status for o in self.outcomes]
        return {
            "scenario": self.scenario,
            "requests": len(statuses),
            "2xx": sum(1 for s in statuses if s is not None and s < 300),
            "4xx": sum(1 for s in statuses if s is not None and 400 <= s < 500),
            "500": statuses.count(500),
            "503": statuses.count(503),
            "no answer": statuses.count(None),
            "in doubt": len(self.in_doubt),
            "invariant": "holds" if not self.violations else f"BROKEN ({len(self.violations)})",
            "leaked": self.leaked,
        }


async def check_promise(
    scenario: str, cluster: Databases, database: str, service_url: str, outcomes: list[Outcome]
) -> Verdict:
    """A 2xx exists, a 4xx does not, a 5xx or no answer either does not exist or is in doubt; and a
    retry of every 5xx or unanswered signup tells the truth (409 if and only if the row exists)."""
    # Requests whose client left run on (uvicorn does not cancel them): judge once they are done.
    await quiescent(cluster, database)
    names = [o.username for o in outcomes]
    rows = await cluster.sql("SELECT username FROM users WHERE username = ANY($1::text[])", names, database=database)
    existing = {row["username"] for row in rows}
    violations, in_doubt = [], []
    for outcome in outcomes:
        exists = outcome.username in existing
        if outcome.status is not None and outcome.status < 300 and not exists:
            violations.append(f"{outcome.username}: {outcome.status} but no row")
        elif outcome.status is not None and 400 <= outcome.status < 500 and exists:
            violations.append(f"{outcome.username}: {outcome.status} but the row exists")
        elif (outcome.status is None or outcome.status >= 500) and exists:
            in_doubt.append(outcome.username)
    async with httpx.AsyncClient(base_url=service_url) as client:
        for outcome in outcomes:
            if outcome.status is None or outcome.status >= 500:
                retry = await sign_up(client, outcome.username)
                expected = 409 if outcome.username in existing else 201
                if retry.status != expected:
                    violations.append(f"{outcome.username}: retry answered {retry.status}, expected {expected}")
    verdict = Verdict(scenario, outcomes, existing, violations, in_doubt, await leaked_connections(cluster))
    SUMMARY.append(verdict.row())
    return verdict


async def leaked_connections(cluster: Databases, settle: float = 5.0) -> int:
    """The service's connections that are not idle in the pool (after giving in-flight work time)."""
    deadline = time.monotonic() + settle
    while True:
        rows = await cluster.sql(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'users' AND state <> 'idle'"
        )
        if rows[0]["n"] == 0 or time.monotonic() > deadline:
            return int(rows[0]["n"])
        await asyncio.sleep(0.1)


async def quiescent(cluster: Databases, database: str, quiet: float = 1.0, limit: float = 30.0) -> None:
    """Wait until the users table has stopped changing and the service's connections are idle."""
    query = (
        "SELECT (SELECT count(*) FROM users) AS users, (SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'users' AND state <> 'idle') AS busy"
    )
    deadline = time.monotonic() + limit
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        row = (await cluster.sql(query, database=database))[0]
        state = (row["users"], row["busy"])
        if state != last or row["busy"]:
            last, since = state, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the service did not settle within {limit} s")
