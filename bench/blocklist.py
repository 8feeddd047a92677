"""What the password blocklist costs: its memory, and the time of a check (a set lookup after NFKC
and case folding, and the context words), with PASSWORD_MIN_LENGTH at 15 and at 8.

    .venv/bin/python bench/blocklist.py    (bench/run.py prints the same lines in its results)
"""

from __future__ import annotations

import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from password_rules import PasswordRules, blocklist

CHECKS = 20_000


def per_check_us(rules: PasswordRules, password: str) -> float:
    """Median of 5 runs, in microseconds: the length rule, the blocklist and the context words."""
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(CHECKS):
            rules.refusal(password)
            rules.context_refusal(password, "alice", "alice@example.com")
        runs.append((time.perf_counter() - start) / CHECKS * 1e6)
    return statistics.median(runs)


def figures() -> list[str]:
    lines = [
        "| `PASSWORD_MIN_LENGTH` | blocklist entries | memory kept | made in (at startup) | one check (median) |",
        "|---|---|---|---|---|",
    ]
    for length in (15, 8):
        blocklist.cache_clear()
        tracemalloc.start()
        start = time.perf_counter()
        entries = len(blocklist(length))
        made = time.perf_counter() - start
        memory = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        check = per_check_us(PasswordRules(length), "correct horse battery staple")
        lines.append(f"| {length} | {entries:,} | {memory / 1024:,.0f} KiB | {made * 1000:.0f} ms | {check:.1f} µs |")
    return lines


if __name__ == "__main__":
    print("\n".join(figures()))
