"""Password reset and email verification tokens: `secrets.token_urlsafe(32)` (256 random bits),
stored only as their SHA-256, valid until they expire, once. Their SQL."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

from sqlalchemy import Row, bindparam, delete, insert, select, update

from db import DBSession
from models import AccountToken

RESET, VERIFY = "reset", "verify"


def hashed(token: str) -> str:
    """What is stored of a token: enough to recognise it, nothing to use it with."""
    return hashlib.sha256(token.encode()).hexdigest()


# Built once, on the table: a signup writes one.
table = AccountToken.metadata.tables[AccountToken.__tablename__]
EXPIRED = delete(table).where(table.c.expires_at < bindparam("now"))
NEW_TOKEN = insert(table)


class AccountTokenStore:
    def __init__(self, session: DBSession) -> None:
        self.session = session

    async def add(self, purpose: str, user_id: int, email: str, expires_at: datetime) -> str:
        """A new token (the only time it is seen in clear: it goes into a mail). Expired tokens are
        purged on the way."""
        await self.session.execute(EXPIRED, {"now": datetime.now(UTC)})
        token = secrets.token_urlsafe(32)
        values = {"token_hash": hashed(token), "purpose": purpose, "user_id": user_id, "email": email}
        await self.session.execute(NEW_TOKEN, {**values, "expires_at": expires_at})
        return token

    async def find(self, purpose: str, token: str) -> AccountToken | None:
        """The token if it is good now: unused and unexpired."""
        statement = select(AccountToken).where(
            AccountToken.token_hash == hashed(token),
            AccountToken.purpose == purpose,
            AccountToken.used_at.is_(None),
            AccountToken.expires_at > datetime.now(UTC),
        )
        found: AccountToken | None = await self.session.scalar(statement)
        return found

    async def use(self, purpose: str, token: str) -> Row[int, str] | None:
        """Spend the token, if it is still good: (user id, email). None if another use came first,
        or it expired meanwhile: a token works once."""
        now = datetime.now(UTC)
        statement = (
            update(AccountToken)
            .where(
                AccountToken.token_hash == hashed(token),
                AccountToken.purpose == purpose,
                AccountToken.used_at.is_(None),
                AccountToken.expires_at > now,
            )
            .values(used_at=now)
            .returning(AccountToken.user_id, AccountToken.email)
        )
        return (await self.session.execute(statement, execution_options={"synchronize_session": False})).first()

    async def void(self, user_id: int, purpose: str) -> None:
        """Every unused token of this purpose of the user stops working."""
        statement = (
            update(AccountToken)
            .where(AccountToken.user_id == user_id, AccountToken.purpose == purpose, AccountToken.used_at.is_(None))
            .values(used_at=datetime.now(UTC))
        )
        await self.session.execute(statement, execution_options={"synchronize_session": False})
