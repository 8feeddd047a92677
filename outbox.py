"""The outbox: a mail is a row written in the transaction of the request that sends it, so a request
that rolls back sends nothing and a 2xx means the mail is queued durably; the delivery loop
(mailer.py) sends it after that commits. This is the outbox's SQL."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, and_, delete, func, insert, or_, select, update

from db import DBSession
from mail import new_message_id
from models import MailMessage

PENDING, SENT, FAILED = "pending", "sent", "failed"
CLAIMED = (
    MailMessage.id, MailMessage.message_id, MailMessage.recipient, MailMessage.subject, MailMessage.body,
    MailMessage.attempts, MailMessage.created_at, MailMessage.kind,
)  # fmt: skip


async def queue(
    session: DBSession,
    wake: Callable[[], None] | None,
    *,
    kind: str,
    sender: str,
    recipient: str,
    subject: str,
    body: str,
    now: datetime,
    token_expires_at: datetime | None = None,
) -> None:
    """Write a mail in `session`'s transaction; `wake` (the delivery loop's) is called once it commits."""
    row = {"message_id": new_message_id(sender), "kind": kind, "recipient": recipient, "subject": subject,
           "body": body, "status": PENDING, "attempts": 0, "next_attempt_at": now, "created_at": now,
           "token_expires_at": token_expires_at}  # fmt: skip
    await session.execute(NEW_MESSAGE, row)
    if wake is not None:
        session.on_commit(wake)


# Built once: a signup writes one, and the idle loop looks every few seconds.
NEW_MESSAGE = insert(MailMessage.metadata.tables[MailMessage.__tablename__])
PENDING_COUNT = select(func.count(), func.min(MailMessage.next_attempt_at)).where(MailMessage.status == PENDING)


class OutboxStore:
    def __init__(self, session: DBSession) -> None:
        self.session = session

    async def pending(self) -> Row[int, datetime | None]:
        """(how many wait, when the first of them is due): one cheap look, for an idle loop."""
        return (await self.session.execute(PENDING_COUNT)).one()

    async def claim(self, now: datetime, lease: timedelta, limit: int) -> Sequence[Any]:
        """Take up to `limit` due messages for this process for `lease`, counting a try of each. On
        PostgreSQL, rows another process is claiming are skipped, not waited for (SKIP LOCKED); on
        SQLite the writing transaction's lock makes claims take turns."""
        due = (
            select(MailMessage.id)
            .where(
                MailMessage.status == PENDING,
                MailMessage.next_attempt_at <= now,
                or_(MailMessage.claimed_until.is_(None), MailMessage.claimed_until < now),
            )
            .order_by(MailMessage.next_attempt_at, MailMessage.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        statement = (
            update(MailMessage)
            .where(MailMessage.id.in_(due.scalar_subquery()))
            .values(claimed_until=now + lease, attempts=MailMessage.attempts + 1)
            .returning(*CLAIMED)
        )
        return (await self.session.execute(statement, execution_options={"synchronize_session": False})).all()

    async def sent(self, messages: list[int], now: datetime) -> None:
        """Sent: their bodies (and with them any link and token) go; who, what and when stay."""
        statement = (
            update(MailMessage)
            .where(MailMessage.id.in_(messages))
            .values(status=SENT, sent_at=now, body=None, claimed_until=None, last_error=None)
        )
        await self.session.execute(statement, execution_options={"synchronize_session": False})

    async def retry(self, message: int, at: datetime, error: str) -> None:
        await self._set(message, next_attempt_at=at, claimed_until=None, last_error=error[:200])

    async def failed(self, message: int, error: str) -> None:
        """Kept for an operator, body included, until the token it carries would have expired."""
        await self._set(message, status=FAILED, claimed_until=None, last_error=error[:200])

    async def _set(self, message: int, **values: object) -> None:
        statement = update(MailMessage).where(MailMessage.id == message).values(**values)
        await self.session.execute(statement, execution_options={"synchronize_session": False})

    async def purge(self, now: datetime, retention: timedelta) -> None:
        """Sent messages older than MAIL_RETENTION go; failed ones lose their body once their token
        has expired."""
        await self.session.execute(
            delete(MailMessage).where(MailMessage.status == SENT, MailMessage.sent_at < now - retention)
        )
        expired = and_(MailMessage.status == FAILED, MailMessage.token_expires_at < now, MailMessage.body.is_not(None))
        await self.session.execute(
            update(MailMessage).where(expired).values(body=None), execution_options={"synchronize_session": False}
        )
