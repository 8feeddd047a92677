"""Prometheus metrics for the whole service: one process's, or (when server.py set
PROMETHEUS_MULTIPROC_DIR for several workers) every worker's, summed at each scrape."""

from __future__ import annotations

import logging
import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

logger = logging.getLogger("users")

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client when it is imported


class Metrics:
    """The service's metrics, for one process, or for the whole service (multiprocess mode)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, web_concurrency: int = 1) -> None:
        self.directory = os.environ.get(MULTIPROCESS)
        if web_concurrency > 1 and self.directory is None:
            logger.warning("metrics count this worker only: start several workers with server.py (scripts/serve)")
        # A registry of its own: several apps in one process (tests) must not clash. In
        # multiprocess mode the numbers go to files instead, and a scrape reads them all.
        self.registry = CollectorRegistry()
        registry = None if self.directory is not None else self.registry
        self.requests = Counter(
            "http_requests_total", "Answers, by route template and status.", ["method", "route", "status"],
            registry=registry,
        )  # fmt: skip
        self.duration = Histogram(
            "http_request_duration_seconds", "Time to answer, by route template.", ["method", "route"],
            buckets=BUCKETS, registry=registry,
        )  # fmt: skip
        self.pool_size = Gauge(
            "db_pool_size", "Database connections the pools hold open.", registry=registry, multiprocess_mode="livesum"
        )
        self.pool_checked_out = Gauge(
            "db_pool_checked_out", "Database connections in use by a request.", registry=registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.transactions = Counter(
            "db_transactions_total", "Request transactions that did work, by how they ended.", ["outcome"],
            registry=registry,
        )  # fmt: skip
        self.unavailable = Counter(
            "db_unavailable_total", "Answers that said 503: the database was unavailable.", registry=registry
        )
        self.breach_check_failures = Counter(
            "password_breach_check_failures_total", "Breached-password checks that got no answer from the range API.",
            registry=registry,
        )  # fmt: skip
        self.auth_events = Counter(
            "auth_events_total", "Events of the security trail, by kind (signin, signin_failed...).", ["event"],
            registry=registry,
        )  # fmt: skip
        self.mail_messages = Counter(
            "mail_messages_total", "Mails the delivery loop tried, by outcome: sent, retried, failed.", ["outcome"],
            registry=registry,
        )  # fmt: skip
        self.mail_pending = Gauge(
            "mail_outbox_pending", "Mails waiting in the outbox to be sent.", registry=registry,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._outcomes: dict[str, Any] = {}
        self._events: dict[str, Any] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:  # label lookups take a lock: do each once
            children = (self.requests.labels(method, route, str(status)), self.duration.labels(method, route))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def transaction_ended(self, outcome: str) -> None:
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self.transactions.labels(outcome)
        child.inc()

    def audit_event(self, event: str) -> None:
        child = self._events.get(event)
        if child is None:
            child = self._events[event] = self.auth_events.labels(event)
        child.inc()

    def watch_pool(self, pool_events_target: Any) -> None:
        """Keep the pool gauges current from the pool's own events."""
        from sqlalchemy import event

        event.listen(pool_events_target, "connect", lambda *_: self.pool_size.inc())
        event.listen(pool_events_target, "close", lambda *_: self.pool_size.dec())
        event.listen(pool_events_target, "close_detached", lambda *_: self.pool_size.dec())
        event.listen(pool_events_target, "checkout", lambda *_: self.pool_checked_out.inc())
        event.listen(pool_events_target, "checkin", lambda *_: self.pool_checked_out.dec())

    def exposition(self) -> bytes:
        if self.directory is None:
            return bytes(generate_latest(self.registry))
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        return bytes(generate_latest(registry))

    def process_ended(self) -> None:
        """This worker's live gauges stop counting (at shutdown)."""
        if self.directory is not None:
            multiprocess.mark_process_dead(os.getpid(), path=self.directory)  # type: ignore[no-untyped-call]
