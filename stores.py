"""All SQL lives here. A store is handed a session; it never commits, rolls back or closes it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, bindparam, delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from models import RevokedToken, User

# Built once: the hot lookups skip constructing (and cache-keying) a statement per request.
BY_USERNAME = select(User).where(User.username == bindparam("username"))
# Public profiles need three columns, not whole ORM objects: a Core select on the table loads
# plain rows and skips the ORM's compile and loading steps.
users = User.__table__
PUBLIC = select(users.c.id, users.c.username, users.c.created_at)
PUBLIC_BY_USERNAME = PUBLIC.where(users.c.username == bindparam("username"))


class UserStore:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, user_id: int) -> User | None:
        return await self.session.get(User, user_id)

    async def get_by_username(self, username: str) -> User | None:
        return await self.session.scalar(BY_USERNAME, {"username": username})

    async def public_by_username(self, username: str) -> Row[int, str, datetime] | None:
        return (await self.session.execute(PUBLIC_BY_USERNAME, {"username": username})).first()

    async def create(self, *, username: str, email: str, password_hash: str) -> User:
        """Insert now, so a duplicate raises IntegrityError here; the savepoint keeps the
        transaction usable afterwards, to find out which of the two was taken."""
        user = User(username=username, email=email, password_hash=password_hash)
        async with self.session.begin_nested():
            self.session.add(user)
        return user

    async def update(self, user: User, changes: dict[str, Any]) -> None:
        """Write the changes now, so a taken email raises IntegrityError here."""
        for name, value in changes.items():
            setattr(user, name, value)
        await self.session.flush()

    async def delete(self, user: User) -> None:
        await self.session.delete(user)
        await self.session.flush()

    async def list_page(self, *, after: str | None, limit: int) -> Sequence[Row[int, str, datetime]]:
        """Keyset pagination: public profiles of the users whose username sorts after `after`."""
        query = PUBLIC.order_by(users.c.username).limit(limit)
        if after is not None:
            query = query.where(users.c.username > after)
        return (await self.session.execute(query)).all()


class RevokedTokenStore:
    """Refresh tokens that may not be used again, kept until they would have expired."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def is_revoked(self, jti: str) -> bool:
        return await self.session.get(RevokedToken, jti) is not None

    async def revoke(self, jti: str, expires_at: datetime) -> None:
        """Revoke a token now; a second revocation of it (a racing reuse) raises IntegrityError.
        Revocations past their token's expiry are purged on the way: they protect nothing."""
        await self.session.execute(delete(RevokedToken).where(RevokedToken.expires_at < datetime.now(UTC)))
        self.session.add(RevokedToken(jti=jti, expires_at=expires_at))
        await self.session.flush()
