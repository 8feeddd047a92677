"""Tools for the high-availability suite (tests/test_ha.py), all from Debian's packages and each a
child process of the test on free loopback ports: etcd, PostgreSQL nodes run by Patroni (as the
`postgres` user: Patroni refuses root), and HAProxy, in front of the nodes or of the service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from chaos import free_port

FIGURES: list[str] = []  # lines printed under the failover table (conftest)
HA_SUMMARY: list[dict[str, Any]] = []  # one row a failover scenario, printed at the end of the run
# The lowest timings that still fail over on a 2-core machine; set at bootstrap (docs/high-availability.md).
TIMINGS = {"ttl": 5, "loop_wait": 1, "retry_timeout": 2}
TOOLS = ("etcd", "patroni", "haproxy")


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]


def wait_for(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(OSError, httpx.HTTPError):
            if check():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {seconds} s")
        time.sleep(0.1)


def stop_process(process: subprocess.Popen[bytes], seconds: float = 10) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def as_postgres() -> dict[str, Any]:
    return {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}


class Etcd:
    """One etcd member: Patroni's store of who leads (its v3 API, as Patroni's `etcd3:` speaks)."""

    def __init__(self, root: Path) -> None:
        self.port, peer = free_port(), free_port()
        client_url, peer_url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{peer}"
        self.log = (root / "etcd.log").open("wb")
        self.process = subprocess.Popen(
            ["etcd", "--name", "ha", "--data-dir", str(root / "etcd"),
             "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"ha={peer_url}", "--initial-cluster-state", "new"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for(lambda: httpx.get(f"{client_url}/health", timeout=1).json()["health"] == "true", 15, "etcd")

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()


class PatroniNode:
    """A PostgreSQL 15 node run by Patroni, with its REST API (`/primary` answers 200 on the leader)."""

    def __init__(self, root: Path, name: str, scope: str, etcd_port: int, bindir: Path) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(mode=0o700)
        self.pg_port, self.rest_port = free_port(), free_port()
        self.data = self.dir / "data"
        config = {
            "scope": scope,
            "name": name,
            "restapi": {"listen": f"127.0.0.1:{self.rest_port}", "connect_address": f"127.0.0.1:{self.rest_port}"},
            "etcd3": {"hosts": f"127.0.0.1:{etcd_port}"},
            "bootstrap": {
                "dcs": {
                    **TIMINGS,
                    "synchronous_mode": True,  # a commit is on both nodes before it is acknowledged
                    "postgresql": {
                        "parameters": {
                            "max_connections": 100,
                            "wal_retrieve_retry_interval": "500ms",  # the standby streams in ~3 s, not ~7
                            "fsync": "off",  # a killed process loses nothing fsync would keep; the OS stays up
                        }
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"username": "postgres"}],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.pg_port}",
                "connect_address": f"127.0.0.1:{self.pg_port}",
                "data_dir": str(self.data),
                "bin_dir": str(bindir),
                "pgpass": str(self.dir / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": "postgres"},
                    "replication": {"username": "replicator", "password": "replicator"},
                },
                "parameters": {"unix_socket_directories": str(self.dir)},
                "pg_hba": [
                    "local all all trust",
                    "host all all 127.0.0.1/32 trust",
                    "host replication replicator 127.0.0.1/32 trust",
                ],
            },
        }
        path = self.dir / "patroni.yml"
        path.write_text(json.dumps(config))  # JSON is YAML
        if os.geteuid() == 0:
            for owned in (self.dir, path):
                shutil.chown(owned, "postgres", "postgres")
        self.log = (root / f"{name}.log").open("wb")
        self.process = subprocess.Popen(
            ["patroni", str(path)], cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT, **as_postgres()
        )

    def rest(self, path: str) -> int:
        return httpx.get(f"http://127.0.0.1:{self.rest_port}{path}", timeout=1).status_code

    def is_leader(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return self.rest("/primary") == 200
        return False

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().split()[0])
        return None

    def kill(self) -> None:
        """SIGKILL to Patroni and to PostgreSQL (not Patroni's child: both must go)."""
        pid = self.postmaster_pid()
        self.process.kill()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        stop_process(self.process, 15)  # Patroni stops its PostgreSQL on SIGTERM
        pid = self.postmaster_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()


class HAProxy:
    """HAProxy in the foreground with the given listen section: TCP for PostgreSQL, HTTP for the service."""

    def __init__(self, root: Path, name: str, section: str) -> None:
        self.port = free_port()
        path = root / f"{name}.cfg"
        path.write_text(
            "global\n  maxconn 2000\n"
            "defaults\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n  timeout check 1s\n"
            f"listen {name}\n  bind 127.0.0.1:{self.port}\n{section}"
        )
        self.log = (root / f"{name}.log").open("wb")
        self.process = subprocess.Popen(
            [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: self.process.poll() is None and self._listening(), 10, "haproxy")

    def _listening(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()


class PatroniCluster:
    """etcd, two Patroni nodes in synchronous mode and HAProxy routing to the leader by `/primary`."""

    def __init__(self, bindir: Path, nodes: int = 2) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="users-ha-"))
        os.chmod(self.root, 0o755)  # the nodes' directories inside are the postgres user's, 0700
        self.etcd: Etcd | None = None
        self.nodes: list[PatroniNode] = []
        self.proxy: HAProxy | None = None
        try:
            self.etcd = Etcd(self.root)
            scope = f"users{os.getpid()}"
            self.nodes = [PatroniNode(self.root, f"node{i}", scope, self.etcd.port, bindir) for i in range(nodes)]
            servers = "".join(
                f"  server {node.name} 127.0.0.1:{node.pg_port} check port {node.rest_port}\n" for node in self.nodes
            )
            self.proxy = HAProxy(
                self.root,
                "postgres",
                "  mode tcp\n  option httpchk GET /primary\n  http-check expect status 200\n"
                "  default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions\n" + servers,
            )
            started = time.monotonic()
            wait_for(lambda: any(node.is_leader() for node in self.nodes), 60, "a Patroni leader")
            # Synchronous mode has a standby to wait for: a write is then on both nodes.
            wait_for(lambda: any(n.rest("/sync") == 200 for n in self.nodes if not n.is_leader()), 60, "a sync standby")
            FIGURES.append(f"Patroni cluster: leader and synchronous standby in {time.monotonic() - started:.1f} s")
        except BaseException:
            self.destroy()
            raise

    def leader(self) -> PatroniNode:
        return next(node for node in self.nodes if node.is_leader())

    def proxy_url(self, database: str) -> str:
        assert self.proxy is not None
        return f"postgresql://postgres@127.0.0.1:{self.proxy.port}/{database}"

    def multi_host_url(self, database: str) -> str:
        """libpq's form, as managed providers print it."""
        hosts = ",".join(f"127.0.0.1:{node.pg_port}" for node in self.nodes)
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"

    async def sql(self, query: str, *args: Any, database: str = "postgres") -> list[Any]:
        """On whichever node is the primary now."""
        connection = await asyncpg.connect(self.multi_host_url(database), timeout=5)
        try:
            return list(await connection.fetch(query, *args))
        finally:
            await connection.close()

    async def create_database(self, name: str) -> None:
        """On the primary; then wait until every node has replayed it (a synchronous commit waits
        for the standby to have the WAL, not to have applied it), since asyncpg moves on to the
        next host when one refuses to connect, but not when one has no such database."""
        await self.sql(f"CREATE DATABASE {name}")
        for node in self.nodes:
            dsn = f"postgresql://postgres@127.0.0.1:{node.pg_port}/postgres"
            deadline = time.monotonic() + 10
            while True:
                connection = await asyncpg.connect(dsn, timeout=5)
                try:
                    if await connection.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name):
                        break
                finally:
                    await connection.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node.name} did not replay CREATE DATABASE {name}")
                await asyncio.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def destroy(self) -> None:
        for part in (self.proxy, *self.nodes, self.etcd):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()
        shutil.rmtree(self.root, ignore_errors=True)
