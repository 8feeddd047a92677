"""All SQL lives here. A store is handed a session; it never commits, rolls back or closes it."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from db import User


class UserStore:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get_by_username(self, username: str) -> User | None:
        return await self.session.scalar(select(User).where(User.username == username))

    async def create(self, *, username: str, email: str, password_hash: str) -> User:
        """Insert now, so a duplicate raises IntegrityError here; the savepoint keeps the
        transaction usable afterwards, to find out which of the two was taken."""
        user = User(username=username, email=email, password_hash=password_hash)
        async with self.session.begin_nested():
            self.session.add(user)
        return user

    async def list_page(self, *, after: str | None, limit: int) -> Sequence[User]:
        """Keyset pagination: the users whose username sorts after `after`."""
        query = select(User).order_by(User.username).limit(limit)
        if after is not None:
            query = query.where(User.username > after)
        return (await self.session.scalars(query)).all()
