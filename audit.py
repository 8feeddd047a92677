"""The security trail: one row an event (who signed in, failed, was throttled, changed what; what an
operator did to whom), its SQL, and for each event that commits one structured log line (logger
`users.audit`) and a count in `auth_events_total{event}`.

An event of a request that succeeds is written in the request's transaction, and said (logged,
counted) once that commits; an event of a refused one (a failed or throttled signin, a reused
refresh token) is written in a short transaction of its own, as the throttle's counts are.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, insert, select
from starlette.requests import Request

from addresses import client_address
from db import DBSession
from metrics import Metrics
from models import EVENTS, USER_AGENT_LENGTH, AuditEvent, User
from resources import resources

logger = logging.getLogger("users.audit")

COMMAND_LINE = "command line"  # the actor of what manage.py does


@dataclass(frozen=True)
class Origin:
    """Where a request came from: its client's canonical address and User-Agent (cut to fit)."""

    address: str | None = None
    user_agent: str | None = None

    @classmethod
    def of(cls, request: Request) -> Origin:
        agent = request.headers.get("user-agent")
        return cls(client_address(request.scope), agent[:USER_AGENT_LENGTH] if agent else None)


@dataclass(frozen=True)
class Event:
    event: str
    user_id: int | None
    username: str | None  # as it was, or as it was typed (a failed signin)
    address: str | None
    user_agent: str | None
    actor: str | None = None  # the operator, for what an operator did
    detail: str | None = None


INSERT = insert(
    AuditEvent.metadata.tables[AuditEvent.__tablename__]
)  # built once: Core on the table, as a hot path's statements are


class AuditStore:
    def __init__(self, session: DBSession) -> None:
        self.session = session

    async def add(self, event: Event, at: datetime) -> None:
        await self.session.execute(INSERT, {"at": at, **asdict(event)})

    async def purge(self, before: datetime) -> None:
        await self.session.execute(delete(AuditEvent).where(AuditEvent.at < before))

    async def page(
        self,
        *,
        user_id: int | None = None,
        username: str | None = None,
        event: str | None = None,
        after: int | None = None,
        limit: int,
    ) -> Sequence[AuditEvent]:
        """Newest first; `after`: the id of the last event of the previous page."""
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if user_id is not None:
            query = query.where(AuditEvent.user_id == user_id)
        if username is not None:
            query = query.where(AuditEvent.username == username)
        if event is not None:
            query = query.where(AuditEvent.event == event)
        if after is not None:
            query = query.where(AuditEvent.id < after)
        return (await self.session.scalars(query)).all()


async def record(
    session: DBSession,
    event: str,
    user: User | None = None,
    *,
    request: Request | None = None,
    username: str | None = None,
    actor: str | None = None,
    detail: str | None = None,
) -> None:
    """Write an event in `session`'s transaction (of `request`: where it came from); it is logged
    and counted once that commits."""
    assert event in EVENTS, event
    origin = Origin.of(request) if request is not None else Origin()
    metrics = resources(request).metrics if request is not None else None
    written = Event(
        event, user.id if user else None, user.username if user else username, origin.address, origin.user_agent,
        actor, detail,
    )  # fmt: skip
    await AuditStore(session).add(written, datetime.now(UTC))
    session.on_commit(lambda: said(written, metrics))


async def purge(session: DBSession, retention_days: int) -> None:
    """Events older than AUDIT_RETENTION_DAYS, deleted on the way (by the writes of refused
    signins, which a spray makes, and by signups)."""
    await AuditStore(session).purge(datetime.now(UTC) - timedelta(days=retention_days))


def said(event: Event, metrics: Metrics | None) -> None:
    """The event's log line (no password, token or hash is ever in an event) and its count."""
    fields = {name: value for name, value in asdict(event).items() if value is not None}
    logger.info("%s %s", event.event, " ".join(f"{k}={v}" for k, v in fields.items() if k != "event"), extra=fields)
    if metrics is not None:
        metrics.audit_event(event.event)
