"""All SQL lives here. A store is handed a session; it never commits, rolls back or closes it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from db import RevokedToken, User


class UserStore:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, user_id: int) -> User | None:
        return await self.session.get(User, user_id)

    async def get_by_username(self, username: str) -> User | None:
        return await self.session.scalar(select(User).where(User.username == username))

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

    async def list_page(self, *, after: str | None, limit: int) -> Sequence[User]:
        """Keyset pagination: the users whose username sorts after `after`."""
        query = select(User).order_by(User.username).limit(limit)
        if after is not None:
            query = query.where(User.username > after)
        return (await self.session.scalars(query)).all()


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
