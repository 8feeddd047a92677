"""The benchmark harness (run by scripts/bench, which starts PostgreSQL and sets TEST_DATABASE_URL).

Each app runs in its own single-worker uvicorn (uvloop, httptools, no access log) and is loaded
with wrk from this machine, in alternating order over several rounds:

    service   app:create_app, the service itself, as scripts/serve runs it, with its defaults
    limit     bench/limit_app.py: the same lookups on a raw asyncpg pool (no ORM, no session)
    fastapi   bench/fastapi_app.py: the textbook FastAPI session dependency and a UserStore
    litestar  bench/litestar_app.py: Litestar with advanced-alchemy's plugin, as documented

It prints a table of medians and ratios against the limit of the same round and writes it to
bench/results.md (or bench/out/ with --smoke, the 20-second run CI does so that this cannot rot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "tests"))  # chaos.py: free_port, PgBouncer

import blocklist  # noqa: E402  (bench/blocklist.py, beside this file)
import delivery  # noqa: E402
import soak  # noqa: E402  (bench/soak.py, beside this file)

from chaos import PgBouncer, free_port  # noqa: E402
from keys import secret_key  # noqa: E402
from migrate import upgrade_schema  # noqa: E402
from passwords import argon2id  # noqa: E402
from tokens import Tokens  # noqa: E402

hasher = argon2id()  # the service's parameters: the same hash costs the same everywhere

SECRET = "bench-secret-0123456789abcdefghijklmnopqrstuv"  # HS256: the reference apps check it too
BENCH_FAMILY = "b" * 32
# The service runs as scripts/serve runs it (server.py: its HTTP protocol, no Server banner, its
# own request log in place of uvicorn's), with its defaults: request logs and metrics on, the log
# written to a file. The variants differ from it in one thing each (more uvicorn options, or
# settings), and are measured on lookups only, beside it in every round: what that one thing costs.
SERVICE: list[str] = []
APPS: dict[str, tuple[list[str], dict[str, str]]] = {
    "service": (SERVICE, {}),
    "limit": (["limit_app:app", "--app-dir", "bench", "--http", "httptools", "--no-access-log"], {}),
    "fastapi": (["fastapi_app:app", "--app-dir", "bench", "--http", "httptools", "--no-access-log"], {}),
    "litestar": (["litestar_app:app", "--app-dir", "bench", "--http", "httptools", "--no-access-log"], {}),
}
PGBOUNCER = "service, through PgBouncer"
NO_MAIL_LOOP = "service, no mail loop"
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "service, logs and metrics off": (SERVICE, {"REQUEST_LOG": "false", "METRICS": "false"}),
    "service, plain httptools": (["--http", "httptools"], {}),
    "service, uvloop": (["--loop", "uvloop"], {}),
    # Reaches PostgreSQL through PgBouncer in transaction mode (started for the run), as
    # tests/test_pgbouncer.py runs it.
    PGBOUNCER: (SERVICE, {"DB_PGBOUNCER": "true"}),
    # The idle mail loop's cost: the audit trail has no switch, and a lookup writes nothing to it.
    NO_MAIL_LOOP: (SERVICE, {"MAIL_DELIVERY": "false"}),
}
VARIANT_PLAN = [("lookup", 32), ("lookup", 256)]
WRK_DONE = """
done = function(summary, latency, requests)
  io.write(string.format('{"requests": %d, "seconds": %f, "p50": %d, "p99": %d, "max": %d, ' ..
    '"non2xx": %d, "socket_errors": %d}\\n', summary.requests, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(99), latency.max, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def lua(request: str, users: int, prefix: str = "") -> str:
    """A wrk script: `request` builds one request; thread-local counters keep signups unique."""
    return (
        f"""
local counter, threads = 0, 0
setup = function(thread) threads = threads + 1; thread:set("tid", threads) end
init = function(args) math.randomseed(os.time() * 100 + tid) end
local function name(i) return string.format("user%07d", i) end
request = function()
  counter = counter + 1
  local users, prefix = {users}, "{prefix}"
  {request}
end
"""
        + WRK_DONE
    )


SCENARIOS = {
    "lookup": 'return wrk.format("GET", "/api/users/" .. name(math.random(1, users)))',
    "me": 'return wrk.format("GET", "/api/users/me")',
    "list": 'return wrk.format("GET", "/api/users?limit=50&after=" .. name(math.random(1, users - 60)))',
    "signup": (
        'local u = string.format("%s%02d%07d", prefix, tid, counter)\n'
        '  return wrk.format("POST", "/api/users/signup", {["Content-Type"] = "application/json"},'
        ' string.format(\'{"username": "%s", "password": "Kiwi-Tango-Mango-57", "email": "%s@example.com"}\', u, u))'
    ),
    # Seeded users, each with the password the seed hashed: every signin succeeds.
    "signin": (
        'return wrk.format("POST", "/api/users/signin", {["Content-Type"] = "application/json"},'
        ' string.format(\'{"username": "%s", "password": "Kiwi-Tango-Mango-57"}\', name(math.random(1, users))))'
    ),
}
SIGNIN_APPS = ("limit", "service")  # the reference apps have no signin


@dataclass
class Run:
    app: str
    scenario: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    non2xx: int
    socket_errors: int
    cpu_ms_per_request: float
    pg_connections_during: int
    extra: dict[str, Any] = field(default_factory=dict)


def family(pid: int) -> list[int]:
    """The process and its children (uvicorn's workers, when there are several)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [pid, *(int(child) for child in children.read_text().split())] if children.exists() else [pid]


def cpu_seconds(pid: int, *, alone: bool = False) -> float:
    total = 0.0
    for member in [pid] if alone else family(pid):
        fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def peak_rss_mb(pid: int) -> float:
    """The largest peak RSS among the process and its workers: the figure per worker."""
    peaks = [0.0]
    for member in family(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)


class App:
    def __init__(self, name: str, database_url: str, env: dict[str, str], workers: int = 1) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        arguments, app_env = {**APPS, **VARIANTS}[name]
        if name.startswith("service"):
            command = [sys.executable, "server.py", *arguments]
        else:
            command = [sys.executable, "-m", "uvicorn", *arguments, "--port", str(self.port), "--loop", "uvloop"]
        full_env = {
            **os.environ,
            # A load from one address: the signup throttle would answer it 429 after 50.
            **{"DATABASE_URL": database_url, "SECRET_KEY": SECRET, "PORT": str(self.port), "SIGNUP_ADDRESS_LIMIT": "0"},
            **{"WEB_CONCURRENCY": str(workers), **env, **app_env},
        }
        # Its log lines go to a file, as a container runtime takes them from a pipe: written, not shown.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(command, cwd=PROJECT, env=full_env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{self.url}/api/users/user0000001", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(20)
        self.log.close()


class Postgres:
    def __init__(self, admin_url: str, database: str) -> None:
        self.admin_url = admin_url.replace("postgresql+asyncpg://", "postgresql://")
        self.url = self.admin_url.rsplit("/", 1)[0] + f"/{database}"
        self.database = database
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def sql(self, query: str, *args: Any, admin: bool = False) -> list[Any]:
        async def run() -> list[Any]:
            connection = await asyncpg.connect(self.admin_url if admin else self.url)
            try:
                return list(await connection.fetch(query, *args))
            finally:
                await connection.close()

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, run()).result()

    def connections(self) -> dict[str, int]:
        rows = self.sql(
            "SELECT coalesce(state, '?') AS state, count(*) AS n FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid() GROUP BY state",
            self.database,
        )
        return {row["state"]: row["n"] for row in rows}

    def seed(self, users: int) -> None:
        """Users user0000001... with one precomputed hash, through the service's own schema."""
        have = self.sql("SELECT count(*) AS n FROM users")[0]["n"]
        if have >= users:
            return
        self.sql(
            "INSERT INTO users (username, username_key, email, email_key, password_hash, created_at) "
            "SELECT name, name, name || '@example.com', name || '@example.com', $1, now() "
            "FROM (SELECT format('user%s', lpad(i::text, 7, '0')) AS name"
            " FROM generate_series($2::int, $3::int) AS i) AS names",
            hasher.hash("Kiwi-Tango-Mango-57"),
            have + 1,
            users,
        )
        # The family of the token that the /me scenario presents (one signin's, as the service checks).
        self.sql(
            "INSERT INTO token_families (id, user_id, generation, expires_at, created_at, last_used_at) "
            "VALUES ($1, 1, 0, now() + interval '1 day', now(), now()) ON CONFLICT DO NOTHING",
            BENCH_FAMILY,
        )
        self.sql("VACUUM ANALYZE users")


def wrk(url: str, script: str, connections: int, seconds: float, headers: dict[str, str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as file:
        file.write(script)
    duration = f"{max(1, round(seconds))}s"
    command = ["wrk", "-t", "2", "-c", str(connections), "-d", duration, "--timeout", "10s", "-s", file.name]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    os.unlink(file.name)
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


def measure(app: App, db: Postgres, scenario: str, connections: int, seconds: float, users: int, prefix: str) -> Run:
    token = Tokens(secret_key(SECRET), 3600, 3600).issue(1, 0, BENCH_FAMILY, 0)["access_token"]
    headers = {"Authorization": f"Bearer {token}"} if scenario == "me" else {}
    samples: list[int] = []
    workers: dict[str, Any] = {}

    def sample() -> None:  # in the middle of the run: PostgreSQL's connections, and how busy everything is
        before = (machine_cpu_seconds(), {pid: cpu_seconds(pid, alone=True) for pid in family(app.process.pid)})
        time.sleep(seconds / 2)
        samples.append(sum(db.connections().values()))
        workers["connections"] = connections_per_process(app.port)
        after = (machine_cpu_seconds(), {pid: cpu_seconds(pid, alone=True) for pid in before[1]})
        span = seconds / 2 - 0.0
        workers["machine_busy"] = (after[0] - before[0]) / span / (os.cpu_count() or 1)
        workers["cpu"] = {pid: (after[1][pid] - before[1][pid]) / span for pid in before[1]}

    sampler = threading.Thread(target=sample)
    sampler.start()
    cpu_before = cpu_seconds(app.process.pid)
    result = wrk(app.url, lua(SCENARIOS[scenario], users, prefix), connections, seconds, headers)
    cpu = cpu_seconds(app.process.pid) - cpu_before
    sampler.join()
    return Run(
        app.name, scenario, connections, result["requests"] / result["seconds"], result["p50"] / 1000,
        result["p99"] / 1000, result["max"] / 1000, result["non2xx"], result["socket_errors"],
        cpu * 1000 / max(result["requests"], 1), samples[0], workers,
    )  # fmt: skip


def machine_cpu_seconds() -> float:
    """CPU time spent by the whole machine (every process), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    idle = int(fields[3]) + int(fields[4])
    return (sum(int(f) for f in fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def connections_per_process(port: int) -> dict[int, int]:
    """How many of the established client connections to `port` each process holds (uvicorn's
    workers share one listening socket: whichever accepts a connection keeps it)."""
    output = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True
    ).stdout
    counts: dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", output):
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return counts


def read_after_write(app: App, prefix: str, pairs: int) -> int:
    """POST a signup, then at once GET it on the same connection: how often is it not there yet?"""
    misses = 0
    with httpx.Client(base_url=app.url, limits=httpx.Limits(max_connections=1)) as client:
        for i in range(pairs):
            name = f"{prefix}raw{i:05d}"
            body = {"username": name, "password": "Kiwi-Tango-Mango-57", "email": f"{name}@example.com"}
            created = client.post("/api/users/signup", json=body)
            assert created.status_code == 201, created.text
            misses += client.get(f"/api/users/{name}").status_code == 404
    return misses


def bare_hash_rate(seconds: float) -> float:
    """Argon2id hashes/s with the service's parameters, one thread per CPU, nothing else running."""
    stop = time.monotonic() + seconds
    counts: list[int] = []

    def work() -> None:
        n = 0
        while time.monotonic() < stop:
            hasher.hash("Kiwi-Tango-Mango-57")
            n += 1
        counts.append(n)

    threads = [threading.Thread(target=work) for _ in range(os.cpu_count() or 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--scale-users", type=int, default=1_000_000)
    parser.add_argument("--smoke", action="store_true", help="a 20-second check that the harness works")
    parser.add_argument("--apps", default="service,limit,fastapi,litestar")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the service (repeatable)")
    parser.add_argument("--service-workers", type=int, default=1, help="uvicorn workers for the service")
    parser.add_argument("--pgbouncer", action="store_true", help="the service reaches PostgreSQL through PgBouncer")
    parser.add_argument("--out", help="where to write the results (default: bench/results.md)")
    parser.add_argument("--no-scale", action="store_true", help="skip the 1,000,000-user scale checks")
    parser.add_argument(
        "--soak", type=float, nargs="?", const=10.0, metavar="MINUTES", help="only the soak (default 10 minutes)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.seconds, args.users = 1, 1, 2000
    service_env = dict(item.split("=", 1) for item in args.env)

    admin = os.environ["TEST_DATABASE_URL"]
    db = Postgres(admin, "bench")
    db.sql("DROP DATABASE IF EXISTS bench WITH (FORCE)", admin=True)
    db.sql("CREATE DATABASE bench", admin=True)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(upgrade_schema, db.url).result()
    db.seed(args.users)
    if args.soak is not None:
        run_soak(args, db, service_env)
        return
    if args.pgbouncer:  # transaction mode, as tests/test_pgbouncer.py runs it
        bouncer = PgBouncer(db.port)
        service_env["DB_PGBOUNCER"] = "true"
        try:
            measure_all(args, db, bouncer.url("bench"), service_env)
        finally:
            bouncer.stop()
    else:
        measure_all(args, db, db.url, service_env)


def measure_all(args: argparse.Namespace, db: Postgres, service_url: str, service_env: dict[str, str]) -> None:
    variants = [] if args.smoke or "service" not in args.apps else list(VARIANTS)
    if args.pgbouncer and PGBOUNCER in variants:  # the service itself is behind PgBouncer already
        variants.remove(PGBOUNCER)
    apps = args.apps.split(",") + variants
    bouncer = PgBouncer(db.port) if PGBOUNCER in apps else None
    try:
        measure_rounds(args, db, service_url, service_env, apps, bouncer.url("bench") if bouncer else "")
    finally:
        if bouncer is not None:
            bouncer.stop()


def measure_rounds(
    args: argparse.Namespace, db: Postgres, service_url: str, service_env: dict[str, str], apps: list[str], bounced: str
) -> None:
    plan = [("lookup", 32), ("lookup", 256), ("me", 32), ("me", 256), ("list", 32), ("list", 256), ("signup", 32),
            ("signin", 32)]  # fmt: skip
    if args.smoke:
        plan = [("lookup", 32), ("me", 32), ("list", 32), ("signup", 32), ("signin", 32)]
    runs: list[list[Run]] = []
    notes: dict[str, Any] = {"rss": {}, "after": {}, "read_after_write": {}}
    for round_ in range(args.rounds):
        order = apps if round_ % 2 == 0 else apps[::-1]  # alternate, so no app always runs first
        for name in order:
            tag = f"{round_}a{apps.index(name)}"  # unique per app: "limit" and "litestar" share a letter
            if name == "service" or name in VARIANTS:
                app = App(name, bounced if name == PGBOUNCER else service_url, service_env, args.service_workers)
            else:
                app = App(name, db.url, {})
            try:
                for scenario, connections in plan if name not in VARIANTS else VARIANT_PLAN:
                    if scenario == "signin" and name not in SIGNIN_APPS:
                        continue
                    prefix = f"r{tag}c{connections % 100}"
                    run = measure(app, db, scenario, connections, args.seconds, args.users, prefix)
                    if scenario == "list":
                        notes["rss"].setdefault((name, "read"), []).append(peak_rss_mb(app.process.pid))
                    runs.append([run])
                    print(f"round {round_ + 1} {name:30} {scenario:7} c={connections:<4} {run.rps:8.0f} req/s  "
                          f"p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:7.2f} ms  non-2xx {run.non2xx}  "
                          f"errors {run.socket_errors}", flush=True)  # fmt: skip
                if name in VARIANTS:
                    continue
                notes["rss"].setdefault((name, "signup"), []).append(peak_rss_mb(app.process.pid))
                notes["read_after_write"].setdefault(name, []).append(
                    read_after_write(app, f"w{tag}", 30 if args.smoke else 300)
                )
                time.sleep(1)
                notes["after"].setdefault(name, []).append(db.connections())
            finally:
                app.stop()
    hash_rate = bare_hash_rate(2 if args.smoke else 5)
    if "service" in apps:
        notes["mail"] = mail_figures(db, args.smoke)

    scale: dict[str, float] = {}
    if not args.smoke and not args.no_scale and "service" in apps:
        scale = scale_checks(db, args, service_env)

    report = render(runs, notes, hash_rate, scale, args)
    print(report)
    out = Path(args.out) if args.out else PROJECT / "bench" / ("out/smoke.md" if args.smoke else "results.md")
    out.parent.mkdir(exist_ok=True)
    out.write_text(report)
    print(f"written to {out.resolve()}")


def mail_figures(db: Postgres, smoke: bool) -> list[str]:
    """bench/delivery.py's figures, on a database of their own."""
    mail = Postgres(db.admin_url, "bench_mail")
    mail.sql("DROP DATABASE IF EXISTS bench_mail WITH (FORCE)", admin=True)
    mail.sql("CREATE DATABASE bench_mail", admin=True)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(upgrade_schema, mail.url).result()
    return delivery.figures(mail.url, smoke)


def run_soak(args: argparse.Namespace, db: Postgres, service_env: dict[str, str]) -> None:
    app = App("service", db.url, service_env)
    try:
        samples = asyncio.run(
            soak.soak(app.url, app.process.pid, lambda: sum(db.connections().values()), args.soak, args.users)
        )
    finally:
        app.stop()
    (PROJECT / "bench" / "soak.md").write_text(soak.report(samples, args.soak))
    (PROJECT / "bench" / "soak.svg").write_text(soak.svg(samples))
    ok, text = soak.verdict(samples)
    print(text)
    if not ok:
        raise SystemExit(1)


def scale_checks(db: Postgres, args: argparse.Namespace, service_env: dict[str, str]) -> dict[str, float]:
    """Lookup p50 at 10,000 vs 1,000,000 users; the first list page vs one deep in the list."""
    results: dict[str, float] = {}
    for users in (args.users, args.scale_users):
        db.seed(users)
        app = App("service", db.url, service_env)
        try:
            # Names from the whole table: a lookup at 1M touches index pages a lookup at 10k never does.
            results[f"lookup p50 ms @ {users}"] = measure(app, db, "lookup", 32, args.seconds, users, "s").p50_ms
            if users == args.scale_users:
                first = 'return wrk.format("GET", "/api/users?limit=50")'
                deep = f'return wrk.format("GET", "/api/users?limit=50&after=" .. name({users - 100}))'
                for label, request in (("first page", first), ("deep page", deep)):
                    result = wrk(app.url, lua(request, users), 32, args.seconds, {})
                    results[f"list p50 ms, {label} @ {users}"] = result["p50"] / 1000
        finally:
            app.stop()
    return results


def render(
    runs: list[list[Run]], notes: dict[str, Any], hash_rate: float, scale: dict[str, float], args: argparse.Namespace
) -> str:
    every = [run for group in runs for run in group]
    flat = [run for run in every if run.app not in VARIANTS]
    keys = sorted({(r.scenario, r.connections) for r in flat}, key=lambda k: (list(SCENARIOS).index(k[0]), k[1]))
    apps = list(dict.fromkeys(r.app for r in flat))

    def median(app: str, key: tuple[str, int], attribute: str) -> float:
        values = [getattr(r, attribute) for r in flat if r.app == app and (r.scenario, r.connections) == key]
        return statistics.median(values) if values else float("nan")

    lines = [
        "# Benchmark results",
        "",
        f"`scripts/bench {' '.join(sys.argv[1:])}` on {os.cpu_count()} CPUs: PostgreSQL 15 on loopback, "
        f"{args.service_workers} uvicorn worker(s) for the service"
        f"{' (through PgBouncer, transaction mode)' if args.pgbouncer else ''}, one per reference app "
        f"(uvloop, httptools, no access log), wrk with 2 threads, {args.seconds:g} s per run, "
        f"{args.rounds} rounds in alternating order, {args.users:,} seeded users. Medians of the rounds; "
        "`× limit` is requests/s against the raw-asyncpg app measured in the same rounds.",
        "",
        "| scenario | conns | app | req/s | × limit | p50 ms | p99 ms | max ms | non-2xx | socket errors "
        "| CPU ms/req | PG conns during |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        limit = median("limit", key, "rps") if "limit" in apps else float("nan")
        for app in apps:
            rps = median(app, key, "rps")
            lines.append(
                f"| {key[0]} | {key[1]} | {app} | {rps:,.0f} | {rps / limit:.2f} | {median(app, key, 'p50_ms'):.2f} "
                f"| {median(app, key, 'p99_ms'):.2f} | {median(app, key, 'max_ms'):.1f} "
                f"| {median(app, key, 'non2xx'):.0f} | {median(app, key, 'socket_errors'):.0f} "
                f"| {median(app, key, 'cpu_ms_per_request'):.2f} | {median(app, key, 'pg_connections_during'):.0f} |"
            )
    lines += ["", "| app | peak RSS MB, reads | peak RSS MB, after signups | read-after-write misses "
              "| PG connections after the load |", "|---|---|---|---|---|"]  # fmt: skip
    for app in apps:
        rss_read = max(notes["rss"].get((app, "read"), [0]))
        rss_signup = max(notes["rss"].get((app, "signup"), [0]))
        misses = notes["read_after_write"].get(app, [])
        pairs = 30 if args.smoke else 300
        after = notes["after"].get(app, [{}])[-1]
        lines.append(
            f"| {app} | {rss_read:.0f} | {rss_signup:.0f} | {sum(misses)} of {pairs * len(misses)} "
            f"| {', '.join(f'{n} {state}' for state, n in sorted(after.items())) or 'none'} |"
        )
    signup = median("service", ("signup", 32), "rps") if "service" in apps else float("nan")
    lines += [
        "",
        f"Bare Argon2id rate with the service's parameters (m=19 MiB, t=2, p=1), one thread per CPU: "
        f"{hash_rate:.1f} hashes/s. Service signups: {signup:.1f}/s = **{signup / hash_rate:.2f}×** the bare rate.",
    ]
    lines += ["", "The password blocklist, in this process (`bench/blocklist.py`):", "", *blocklist.figures()]
    if notes.get("mail"):
        lines += ["", "Mail delivery (`bench/delivery.py`, PostgreSQL, aiosmtpd on loopback):", "", *notes["mail"]]
    targets = target_rows(every, notes, median)
    if targets:
        lines += ["", "The targets (issue 23), from this run:", "", "| target | measured | met |", "|---|---|---|"]
        lines += targets
    if args.service_workers > 1:
        lines += ["", *workers_section(flat)]
    costs = cost_rows(every)
    if costs:
        lines += [
            "",
            "What a default costs: lookups, the service as it runs by default against the same service with one "
            "thing changed, started and measured beside it in every round (medians of the per-round ratios: a "
            "req/s ratio above 1 means the default is faster, a p99 ratio below 1 that its tail is shorter).",
            "",
            "| variant | req/s, 32 conns | default ÷ variant | p99 ms, 256 conns | default ÷ variant |",
            "|---|---|---|---|---|",
            *costs,
        ]
    if scale:
        lines += ["", "| scale check | p50 ms |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in scale.items()]
    return "\n".join(lines) + "\n"


def workers_section(runs: list[Run]) -> list[str]:
    """Where a 2-worker run's tail comes from: the machine's CPUs, and how the connections and the
    work split between the workers (sampled halfway through each run)."""
    lines = [
        "Workers, sampled halfway through each run of the service: how busy the machine's CPUs were "
        "(every process: the workers, wrk and PostgreSQL), and each worker's client connections and CPU.",
        "",
        "| scenario | conns | machine CPUs busy | connections per worker | CPU per worker (cores) | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        if run.app != "service" or "cpu" not in run.extra:
            continue
        cpu, held = run.extra["cpu"], run.extra["connections"]
        workers = sorted(pid for pid in cpu if pid in held or cpu[pid] > 0.05)
        lines.append(
            f"| {run.scenario} | {run.connections} | {run.extra['machine_busy'] * 100:.0f}% "
            f"| {' / '.join(str(held.get(pid, 0)) for pid in workers)} "
            f"| {' / '.join(f'{cpu[pid]:.2f}' for pid in workers)} | {run.p99_ms:.1f} |"
        )
    return lines


def target_rows(runs: list[Run], notes: dict[str, Any], median: Any) -> list[str]:
    """Each target (issue 23) against this run's medians; a variant against the service: the median
    of the per-round ratios."""
    apps = {r.app for r in runs}
    if not {"service", "limit"} <= apps or ("signup", 32) not in {(r.scenario, r.connections) for r in runs}:
        return []
    rows: list[tuple[str, str, bool]] = []

    def ratio(app: str, peer: str, key: tuple[str, int], floor: float, name: str) -> None:
        if peer in apps:
            measured = median(app, key, "rps") / median(peer, key, "rps")
            rows.append((name, f"{measured:.2f}×", measured >= floor))

    for peer, floor in (("limit", 0.45), ("fastapi", 3.2), ("litestar", 2.2)):
        ratio("service", peer, ("lookup", 32), floor, f"lookups, 32 conns: ≥ {floor:.2f}× {peer}")
    ratio("service", "limit", ("me", 32), 0.45, "/me, 32 conns: ≥ 0.45× limit")
    wide = [r for r in runs if r.app == "service" and (r.scenario, r.connections) == ("lookup", 256)]
    errors = sum(r.non2xx + r.socket_errors for r in wide)
    rows.append(("lookups, 256 conns: zero errors", f"{errors}", errors == 0))
    tail = median("service", ("lookup", 256), "p99_ms") / median("limit", ("lookup", 256), "p99_ms")
    rows.append(("lookups, 256 conns: p99 ≤ 2× the limit's", f"{tail:.2f}×", tail <= 2))
    ratio("service", "limit", ("signup", 32), 0.95, "signups: ≥ 0.95× the limit's rate")
    ratio("service", "limit", ("signin", 32), 0.95, "signins: ≥ 0.95× the limit's rate")
    for variant, name, floor in (
        (PGBOUNCER, "through PgBouncer: ≥ 0.70× direct lookups", 0.70),
        (NO_MAIL_LOOP, "the idle mail loop: lookups ≥ 0.98× without it", 0.98),
    ):
        base = [r for r in runs if r.app == "service" and (r.scenario, r.connections) == ("lookup", 32)]
        other = [r for r in runs if r.app == variant and (r.scenario, r.connections) == ("lookup", 32)]
        if other:  # both lists are in round order
            measured = statistics.median(
                (v.rps / b.rps if variant == PGBOUNCER else b.rps / v.rps) for b, v in zip(base, other, strict=False)
            )
            rows.append((name, f"{measured:.2f}×", measured >= floor))
    reads, burst = max(notes["rss"].get(("service", "read"), [0])), max(notes["rss"].get(("service", "signup"), [0]))
    rows.append(("RSS under read load < 100 MB", f"{reads:.0f} MB", reads < 100))
    rows.append(("RSS after a signup burst < 160 MB", f"{burst:.0f} MB", burst < 160))
    return [f"| {name} | {shown} | {'yes' if met else '**no**'} |" for name, shown, met in rows]


def cost_rows(runs: list[Run]) -> list[str]:
    """Each variant against the service's runs of the same rounds: req/s at 32 connections, p99 at 256."""
    rows = []
    for name in dict.fromkeys(r.app for r in runs if r.app in VARIANTS):
        pairs = {}
        for key in VARIANT_PLAN:
            base = [r for r in runs if r.app == "service" and (r.scenario, r.connections) == key]
            mine = [r for r in runs if r.app == name and (r.scenario, r.connections) == key]
            pairs[key[1]] = list(zip(base, mine, strict=False))  # both lists are in round order
        if not pairs[32] or not pairs[256]:
            continue
        rps = statistics.median(v.rps for _, v in pairs[32])
        speed = statistics.median(b.rps / v.rps for b, v in pairs[32])
        p99 = statistics.median(v.p99_ms for _, v in pairs[256])
        tail = statistics.median(b.p99_ms / v.p99_ms for b, v in pairs[256])
        rows.append(f"| {name} | {rps:,.0f} | {speed:.3f} | {p99:,.0f} | {tail:.2f} |")
    return rows


if __name__ == "__main__":
    main()
