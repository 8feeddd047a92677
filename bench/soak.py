"""The soak (scripts/bench --soak MINUTES): a mixed load against one worker for a long while, sampling
its RSS, the PostgreSQL connections and the p99 every 10 s. Over the second half of the run RSS
may grow by at most 5% and the connection count not at all.

Each virtual user signs up, signs in, then loops over lookups, its /me, list pages, a signup now
and then, and a refresh that really rotates its own tokens (a reused one would end its family).
Written to bench/soak.md, with bench/soak.svg, a plot of the samples.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

SAMPLE_SECONDS = 10
USERS = 24


@dataclass
class Sample:
    seconds: float
    rss_mb: float
    pg_connections: int
    p99_ms: float
    requests: int


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def virtual_user(url: str, n: int, seeded: int, stop: float, latencies: list[float], failures: list[str]) -> None:
    name, password = f"soak{n:03d}", "Kiwi-Tango-Mango-57"
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def timed(method: str, path: str, **kwargs: Any) -> httpx.Response:
            start = time.perf_counter()
            response = await client.request(method, path, **kwargs)
            latencies.append(time.perf_counter() - start)
            if response.status_code >= 500:
                failures.append(f"{method} {path}: {response.status_code}")
            return response

        body = {"username": name, "password": password, "email": f"{name}@example.com"}
        await timed("POST", "/api/users/signup", json=body)
        tokens = (await timed("POST", "/api/users/signin", json={"username": name, "password": password})).json()
        i = 0
        while time.monotonic() < stop:
            i += 1
            choice = random.random()
            if choice < 0.55:
                await timed("GET", f"/api/users/user{random.randint(1, seeded):07d}")
            elif choice < 0.75:
                await timed("GET", "/api/users/me", headers={"Authorization": f"Bearer {tokens['access_token']}"})
            elif choice < 0.9:
                await timed("GET", f"/api/users?limit=50&after=user{random.randint(1, seeded - 60):07d}")
            elif choice < 0.95:
                new = f"{name}n{i:07d}"
                await timed("POST", "/api/users/signup", json={**body, "username": new, "email": f"{new}@example.com"})
            else:
                auth = {"Authorization": f"Bearer {tokens['refresh_token']}"}
                refreshed = await timed("POST", "/api/users/refresh", headers=auth)
                if refreshed.status_code == 200:
                    tokens = refreshed.json()
                else:
                    failures.append(f"refresh: {refreshed.status_code}")


async def soak(url: str, pid: int, pg_connections: Any, minutes: float, seeded: int) -> list[Sample]:
    stop = time.monotonic() + minutes * 60
    latencies: list[float] = []
    failures: list[str] = []
    users = [asyncio.ensure_future(virtual_user(url, n, seeded, stop, latencies, failures)) for n in range(USERS)]
    samples: list[Sample] = []
    start = time.monotonic()
    while time.monotonic() < stop:
        await asyncio.sleep(SAMPLE_SECONDS)
        window, latencies[:] = latencies[:], []
        p99 = statistics.quantiles(window, n=100)[98] * 1000 if len(window) > 100 else float("nan")
        connections = await asyncio.to_thread(pg_connections)
        samples.append(Sample(time.monotonic() - start, rss_mb(pid), connections, p99, len(window)))
        rate = len(window) / SAMPLE_SECONDS
        print(f"soak {samples[-1].seconds:6.0f} s  RSS {samples[-1].rss_mb:6.1f} MB  PG connections "
              f"{connections:3d}  p99 {p99:7.1f} ms  {rate:6.0f} req/s", flush=True)  # fmt: skip
    await asyncio.gather(*users)
    if failures:
        raise RuntimeError(f"{len(failures)} failures, for example: {failures[:5]}")
    return samples


def verdict(samples: list[Sample]) -> tuple[bool, str]:
    half = samples[len(samples) // 2 - 1 :]
    growth = (half[-1].rss_mb - half[0].rss_mb) / half[0].rss_mb
    connections_grew = max(s.pg_connections for s in half[1:]) > half[0].pg_connections
    ok = growth <= 0.05 and not connections_grew
    text = (
        f"Over the second half ({half[0].seconds:.0f} s to {half[-1].seconds:.0f} s): RSS "
        f"{half[0].rss_mb:.1f} to {half[-1].rss_mb:.1f} MB ({growth * 100:+.1f}%, at most +5% allowed); "
        f"PostgreSQL connections {half[0].pg_connections} at the start of it, at most "
        f"{max(s.pg_connections for s in half)} after ({'grew' if connections_grew else 'did not grow'}). "
        f"**{'Holds' if ok else 'Does not hold'}.**"
    )
    return ok, text


def report(samples: list[Sample], minutes: float) -> str:
    _, text = verdict(samples)
    lines = [
        "# Soak",
        "",
        f"`scripts/bench --soak {minutes:g}`: one worker, {USERS} virtual users (lookups 55%, /me 20%, list "
        "pages 15%, signups 5%, refreshes that rotate 5%), a sample every 10 s.",
        "",
        text,
        "",
        "![RSS, connections and p99 over the run](soak.svg)",
        "",
        "| seconds | RSS MB | PG connections | p99 ms | req/s |",
        "|---|---|---|---|---|",
        *(
            f"| {s.seconds:.0f} | {s.rss_mb:.1f} | {s.pg_connections} | {s.p99_ms:.1f} | "
            f"{s.requests / SAMPLE_SECONDS:.0f} |"
            for s in samples
        ),
    ]
    return "\n".join(lines) + "\n"


def svg(samples: list[Sample]) -> str:
    """Three small line charts (RSS, connections, p99) over time: plain SVG, no plotting library."""
    width, height, pad = 640, 150, 40
    charts = [("RSS MB", [s.rss_mb for s in samples]), ("PG connections", [float(s.pg_connections) for s in samples]),
              ("p99 ms", [s.p99_ms for s in samples])]  # fmt: skip
    end = samples[-1].seconds
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height * 3}" font-size="11">']
    for row, (label, values) in enumerate(charts):
        top, low, high = row * height, 0.0, max(values) * 1.15 or 1
        points = " ".join(
            f"{pad + (s.seconds / end) * (width - 2 * pad):.1f},"
            f"{top + height - pad / 2 - ((v - low) / (high - low)) * (height - pad):.1f}"
            for s, v in zip(samples, values, strict=True)
        )
        parts += [
            f'<text x="{pad}" y="{top + 14}">{label} (0 to {high:.0f}) over {end:.0f} s</text>',
            f'<line x1="{pad}" y1="{top + height - pad / 2}" x2="{width - pad}" y2="{top + height - pad / 2}" '
            'stroke="#999"/>',
            f'<polyline fill="none" stroke="#1f6feb" stroke-width="2" points="{points}"/>',
        ]
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
