"""All SQL lives here. A store is handed a session; it never commits, rolls back or closes it.

Writes to a user are single conditional statements (`UPDATE ... WHERE id = ? AND token_version = ?`):
the database decides a race, so a change based on what a request read earlier cannot overwrite a
change that committed in between (a lost update), and a row that is gone is "nothing matched".
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Row, bindparam, case, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from models import RevokedToken, SigninFailure, User, email_key

# Built once: the hot lookups skip constructing (and cache-keying) a statement per request.
BY_USERNAME = select(User).where(User.username == bindparam("username"))
CURRENT = select(User).where(User.id == bindparam("user_id"), User.token_version == bindparam("version"))
# Public profiles need three columns, not whole ORM objects: a Core select on the table loads
# plain rows and skips the ORM's compile and loading steps.
users = User.__table__
PUBLIC = select(users.c.id, users.c.username, users.c.created_at)
PUBLIC_BY_USERNAME = PUBLIC.where(users.c.username == bindparam("username"))
# Core statements: nothing is loaded into the session, and no stale ORM state is flushed.
NO_SYNC = {"synchronize_session": False}


class UserStore:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def current(self, user_id: int, version: int) -> User | None:
        """The user a token names, if it still exists and the token's version is still its own."""
        return await self.session.scalar(CURRENT, {"user_id": user_id, "version": version})

    async def get_by_username(self, username: str) -> User | None:
        return await self.session.scalar(BY_USERNAME, {"username": username})

    async def public_by_username(self, username: str) -> Row[int, str, datetime] | None:
        return (await self.session.execute(PUBLIC_BY_USERNAME, {"username": username})).first()

    async def create(self, *, username: str, email: str, password_hash: str) -> User:
        """Insert now, so a duplicate raises IntegrityError here; the savepoint keeps the
        transaction usable afterwards, to find out which of the two was taken."""
        user = User(username=username, email=email, email_key=email_key(email), password_hash=password_hash)
        async with self.session.begin_nested():
            self.session.add(user)
        return user

    async def update(self, user_id: int, version: int, changes: dict[str, Any]) -> User | None:
        """Apply the changes if the user still has this token version; None if not (or gone).
        A taken email raises IntegrityError here."""
        if not changes:
            return await self.current(user_id, version)
        if "email" in changes:
            changes = {**changes, "email_key": email_key(changes["email"])}
        statement = (
            update(User).where(User.id == user_id, User.token_version == version).values(changes).returning(User)
        )
        return await self.session.scalar(statement, execution_options=NO_SYNC)

    async def change_password(self, user_id: int, version: int, password_hash: str) -> bool:
        """Set a new password and a new token version (every earlier token stops working), if the
        user still has the version that the old password was checked against."""
        statement = (
            update(User)
            .where(User.id == user_id, User.token_version == version)
            .values(password_hash=password_hash, token_version=User.token_version + 1)
            .returning(User.id)
        )
        return await self.session.scalar(statement, execution_options=NO_SYNC) is not None

    async def confirm_password(self, user_id: int, checked_hash: str, new_hash: str | None = None) -> int | None:
        """The user's token version if `checked_hash` (the hash a password was just verified
        against) is still the user's, storing `new_hash` in its place if given; None otherwise."""
        if new_hash is None:
            version: int | None = await self.session.scalar(
                select(User.token_version).where(User.id == user_id, User.password_hash == checked_hash)
            )
            return version
        statement = (
            update(User)
            .where(User.id == user_id, User.password_hash == checked_hash)
            .values(password_hash=new_hash)
            .returning(User.token_version)
        )
        version = await self.session.scalar(statement, execution_options=NO_SYNC)
        return version

    async def delete(self, user_id: int, version: int) -> bool:
        statement = delete(User).where(User.id == user_id, User.token_version == version).returning(User.id)
        return await self.session.scalar(statement, execution_options=NO_SYNC) is not None

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


class SigninFailureStore:
    """The signin throttle's counts: failures per (address, username) in a window from the first."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def count(self, address: str, username: str, now: datetime, window: timedelta) -> tuple[int, datetime]:
        """Count one more, in the current window or in a new one if it has passed, in one atomic
        statement (so that concurrent attempts cannot all read the same count): (count, window start)."""
        dialect = postgresql if self.session.get_bind().dialect.name == "postgresql" else sqlite
        expired = SigninFailure.window_start <= now - window
        statement = (
            dialect.insert(SigninFailure)
            .values(address=address, username=username, window_start=now, failures=1)
            .on_conflict_do_update(
                index_elements=[SigninFailure.address, SigninFailure.username],
                set_={
                    "failures": case((expired, 1), else_=SigninFailure.failures + 1),
                    "window_start": case((expired, now), else_=SigninFailure.window_start),
                },
            )
            .returning(SigninFailure.failures, SigninFailure.window_start)
        )
        failures, window_start = (await self.session.execute(statement)).one()
        return failures, window_start

    async def uncount(self, address: str, username: str, window_start: datetime) -> None:
        """Take back one count made in that window (it was not a failure after all)."""
        await self.session.execute(
            update(SigninFailure)
            .where(
                SigninFailure.address == address,
                SigninFailure.username == username,
                SigninFailure.window_start == window_start,
                SigninFailure.failures > 0,
            )
            .values(failures=SigninFailure.failures - 1)
        )

    async def clear(self, address: str, username: str) -> None:
        await self.session.execute(
            delete(SigninFailure).where(SigninFailure.address == address, SigninFailure.username == username)
        )

    async def purge(self, before: datetime) -> None:
        """Windows that started before `before` count for nothing any more."""
        await self.session.execute(delete(SigninFailure).where(SigninFailure.window_start < before))
