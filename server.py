"""The one command line that serves the service: uvicorn with the service's HTTP protocol and
flags, and its settings, checked first (a misconfigured service exits at once, with one line, before
any worker starts). scripts/serve, the image and the tests all start it this way:

    python server.py [APP] [more uvicorn options]    (APP: app:create_app, a factory)
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from logs import configure_logging, flush_logs
from mail import Transport
from settings import Settings
from tokens import make_tokens

APP = "app:create_app"
PROMETHEUS_FILE = re.compile(r"(counter|gauge_[a-z]+|histogram|summary)_\d+\.db")
# The service's protocol (protocol.py), no Server banner, its own request log (observability.py)
# in place of uvicorn's access log, and asyncio's own event loop, which serves connections in
# turn when the CPU is the limit (docs/performance.md).
FLAGS = ["--factory", "--http", "protocol:HttpProtocol", "--no-server-header", "--no-access-log", "--loop", "asyncio"]


def command(settings: Settings, *extra: str) -> list[str]:
    """uvicorn's command line; `extra` may name another app first, and may repeat an option to
    override it (the last one given wins)."""
    app, extra = (extra[0], extra[1:]) if extra and not extra[0].startswith("-") else (APP, extra)
    return [
        *(sys.executable, "-m", "uvicorn", app, *FLAGS),
        *("--host", settings.host, "--port", str(settings.port)),
        *("--timeout-graceful-shutdown", str(settings.graceful_timeout)),
        # uvicorn trusts X-Forwarded-For from 127.0.0.1 by default: any local process, or a local
        # proxy that passes the client's own header on, could name any address.
        *(
            ("--proxy-headers", "--forwarded-allow-ips", settings.forwarded_allow_ips)
            if settings.forwarded_allow_ips
            else ("--no-proxy-headers",)
        ),
        *extra,
    ]


def metrics_directory(settings: Settings) -> Path | None:
    """With several workers, prometheus-client's multiprocess mode: each worker writes its numbers
    to files in one directory (PROMETHEUS_MULTIPROC_DIR, which must be set before the library is
    imported), and a scrape of any worker sums them. Emptied first, so that a restarted service
    counts from zero. None with one process."""
    if settings.web_concurrency <= 1:
        return None
    directory = Path(settings.metrics_dir or Path(tempfile.gettempdir()) / f"users-metrics-{settings.port}")
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.iterdir():  # prometheus-client's files, one a kind and process; nothing else
        if PROMETHEUS_FILE.fullmatch(stale.name):
            stale.unlink()
    return directory


def check(settings: Settings) -> None:
    """What would stop every worker stops the service here, at once, before uvicorn starts them."""
    if not (settings.signing_key_file or settings.secret_key):
        raise ValueError(
            "neither SIGNING_KEY_FILE nor SECRET_KEY is set: tokens need a key that every worker and replica "
            "share (docs/tokens.md; scripts/serve makes a development key)"
        )
    make_tokens(settings)
    Transport.from_url(settings.mail_url)


def fail(message: str, log_format: str) -> NoReturn:
    """One line, in the format LOG_FORMAT asks for, and a non-zero exit."""
    configure_logging(log_format if log_format in ("json", "text") else "text")
    logging.getLogger("users").error("not starting: %s", message)
    flush_logs()
    sys.exit(1)


def main() -> None:
    try:
        settings = Settings.from_environ()
        configure_logging(settings.log_format)
        check(settings)
    except ValueError as exc:
        fail(str(exc), os.environ.get("LOG_FORMAT", "text"))
    env = dict(os.environ)
    if (directory := metrics_directory(settings)) is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    argv = command(settings, *sys.argv[1:])
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    main()
