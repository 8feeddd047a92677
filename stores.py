"""All SQL lives here. A store is handed a session; it never commits, rolls back or closes it.

Writes to a user are single conditional statements (`UPDATE ... WHERE id = ? AND token_version = ?`):
the database decides a race, so a change based on what a request read earlier cannot overwrite a
change that committed in between (a lost update), and a row that is gone is "nothing matched".
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, Row, and_, bindparam, case, delete, exists, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.expression import false

from models import TokenFamily, User, email_key


def token_holds(user_id: Any, version: Any, family: Any) -> ColumnElement[bool]:
    """What a token needs to be good: its user exists, is not disabled, still has the token's
    version (a password change raises it), and the token's family is alive (signout, reuse and
    an operator end it)."""
    alive = exists().where(TokenFamily.id == family, TokenFamily.user_id == User.id)
    return and_(User.id == user_id, User.token_version == version, User.disabled.is_(False), alive)


# Built once: the hot lookups skip constructing (and cache-keying) a statement per request.
BY_USERNAME = select(User).where(User.username == bindparam("username"))
BY_EMAIL_KEY = select(User).where(User.email_key == bindparam("email_key"))
CURRENT = select(User).where(token_holds(bindparam("user_id"), bindparam("version"), bindparam("family")))
# Public profiles need three columns, not whole ORM objects: a Core select on the table loads
# plain rows and skips the ORM's compile and loading steps.
users = User.__table__
PUBLIC = select(users.c.id, users.c.username, users.c.created_at).where(users.c.disabled.is_(False))
PUBLIC_BY_USERNAME = PUBLIC.where(users.c.username == bindparam("username"))
# A signin's: Core on the table, built once (the ORM's unit of work for one new row costs more CPU
# than the INSERT's round trip).
families = TokenFamily.metadata.tables[TokenFamily.__tablename__]
EXPIRED_FAMILIES = delete(families).where(families.c.expires_at < bindparam("now"))
NEW_FAMILY = insert(families)
# Core statements: nothing is loaded into the session, and no stale ORM state is flushed.
NO_SYNC = {"synchronize_session": False}


def escape_like(text: str) -> str:
    """`text` matched literally by LIKE (with ESCAPE '\\'): its % and _ are not wildcards."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def taken_key(error: IntegrityError) -> Literal["username", "email"]:
    """Which unique key an insert or update of a user broke: asyncpg names the constraint
    (uq_users_username_key), SQLite's message the column (users.username_key). Not from
    PostgreSQL's message, whose DETAIL quotes the values: an address may spell "username"."""
    name = getattr(getattr(error.orig, "__cause__", None), "constraint_name", None) or str(error.orig)
    return "username" if "username" in name else "email"


class UserStore:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def current(self, user_id: int, version: int, family: str) -> User | None:
        """The user a token names, if the token still holds (see token_holds)."""
        return await self.session.scalar(CURRENT, {"user_id": user_id, "version": version, "family": family})

    async def get_by_username(self, username: str) -> User | None:
        return await self.session.scalar(BY_USERNAME, {"username": username})

    async def username_taken(self, username: str) -> bool:
        """Whether a user has this username, in any case."""
        statement = select(User.id).where(User.username_key == username.lower())
        return await self.session.scalar(statement) is not None

    async def get_by_email(self, email: str) -> User | None:
        return await self.session.scalar(BY_EMAIL_KEY, {"email_key": email_key(email)})

    async def public_by_username(self, username: str) -> Row[int, str, datetime] | None:
        return (await self.session.execute(PUBLIC_BY_USERNAME, {"username": username})).first()

    async def create(self, *, username: str, email: str, password_hash: str) -> User:
        """Insert now, so that a name or address already taken raises IntegrityError here
        (taken_key tells which). The request's transaction is then over: its 409 rolls back."""
        user = User(
            username=username,
            username_key=username.lower(),
            email=email,
            email_key=email_key(email),
            password_hash=password_hash,
        )
        self.session.add(user)
        await self.session.flush()
        return user

    async def update(self, user_id: int, version: int, family: str, changes: dict[str, Any]) -> User | None:
        """Apply the changes if the token still holds; None if not. A taken email raises
        IntegrityError here."""
        if not changes:
            return await self.current(user_id, version, family)
        if "email" in changes:  # another address is not proved yet (the same one, in another case, is)
            key = email_key(changes["email"])
            proved = case((User.email_key == key, User.email_verified), else_=false())
            changes = {**changes, "email_key": key, "email_verified": proved}
        statement = update(User).where(token_holds(user_id, version, family)).values(changes).returning(User)
        return await self.session.scalar(statement, execution_options=NO_SYNC)

    async def change_password(self, user_id: int, version: int, family: str, password_hash: str) -> bool:
        """Set a new password and a new token version (every earlier token stops working), if the
        token still holds: the version the old password was checked against is still the user's."""
        statement = (
            update(User)
            .where(token_holds(user_id, version, family))
            .values(password_hash=password_hash, token_version=User.token_version + 1)
            .returning(User.id)
        )
        return await self.session.scalar(statement, execution_options=NO_SYNC) is not None

    async def signed_in(self, user_id: int, checked_hash: str, new_hash: str | None = None) -> Row[int, bool] | None:
        """Record a signin: (token version, disabled) if `checked_hash` (the hash a password was
        just verified against) is still the user's, storing `new_hash` in its place if given;
        None otherwise (a password change committed meanwhile)."""
        statement = (
            update(User)
            .where(User.id == user_id, User.password_hash == checked_hash)
            .values(last_signin_at=datetime.now(UTC), password_hash=new_hash or checked_hash)
            .returning(User.token_version, User.disabled)
        )
        return (await self.session.execute(statement, execution_options=NO_SYNC)).first()

    async def set_password(self, user_id: int, password_hash: str) -> None:
        """A new password (a reset's) and a new token version: every earlier token stops working."""
        statement = (
            update(User)
            .where(User.id == user_id)
            .values(password_hash=password_hash, token_version=User.token_version + 1)
        )
        await self.session.execute(statement, execution_options=NO_SYNC)

    async def verified(self, user_id: int, email: str) -> User | None:
        """Mark the user's address verified, if `email` (the address a token was sent to) is still it."""
        statement = (
            update(User)
            .where(User.id == user_id, User.email_key == email_key(email))
            .values(email_verified=True)
            .returning(User)
        )
        return await self.session.scalar(statement, execution_options=NO_SYNC)

    async def delete(self, user_id: int, version: int, family: str) -> bool:
        """Delete the user (and so, by the foreign key, its token families) if the token still holds."""
        statement = delete(User).where(token_holds(user_id, version, family)).returning(User.id)
        return await self.session.scalar(statement, execution_options=NO_SYNC) is not None

    async def list_page(self, *, after: str | None, limit: int) -> Sequence[Row[int, str, datetime]]:
        """Keyset pagination: public profiles of the users whose username sorts after `after`."""
        query = PUBLIC.order_by(users.c.username).limit(limit)
        if after is not None:
            query = query.where(users.c.username > after)
        return (await self.session.execute(query)).all()

    async def admin_page(self, *, after: str | None, limit: int, prefix: str | None) -> Sequence[User]:
        """Every user (disabled ones too), by username, keyset-paginated; `prefix`: only those whose
        username or email starts with it, in any case."""
        query = select(User).order_by(User.username).limit(limit)
        if after is not None:
            query = query.where(User.username > after)
        if prefix:
            pattern = escape_like(prefix.lower()) + "%"
            folded = escape_like(email_key(prefix)) + "%"
            query = query.where(
                or_(User.username_key.like(pattern, escape="\\"), User.email_key.like(folded, escape="\\"))
            )
        return (await self.session.scalars(query)).all()

    async def set_flags(self, user_id: int, **flags: bool) -> bool:
        """Set `is_admin` or `disabled`; False if the user is gone."""
        statement = update(User).where(User.id == user_id).values(**flags).returning(User.id)
        return await self.session.scalar(statement, execution_options=NO_SYNC) is not None

    async def delete_user(self, user_id: int) -> bool:
        """Delete the user (an operator's doing: no token to hold); False if already gone."""
        statement = delete(User).where(User.id == user_id).returning(User.id)
        return await self.session.scalar(statement, execution_options=NO_SYNC) is not None


class TokenFamilyStore:
    """Refresh-token families: one row per signin, whatever the number of refreshes."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def start(
        self, family: str, user_id: int, expires_at: datetime, user_agent: str | None, address: str | None
    ) -> None:
        """A new family (a session) at generation 0. Families whose last token has expired are
        purged on the way: they protect nothing any more."""
        now = datetime.now(UTC)
        await self.session.execute(EXPIRED_FAMILIES, {"now": now})
        row = {"id": family, "user_id": user_id, "generation": 0, "expires_at": expires_at, "created_at": now,
               "last_used_at": now, "user_agent": user_agent, "address": address}  # fmt: skip
        await self.session.execute(NEW_FAMILY, row)

    async def get(self, family: str, user_id: int) -> TokenFamily | None:
        """The family; None if it has ended (or never was, or is another user's)."""
        statement = select(TokenFamily).where(TokenFamily.id == family, TokenFamily.user_id == user_id)
        found: TokenFamily | None = await self.session.scalar(statement, execution_options={"populate_existing": True})
        return found

    async def of_user(self, user_id: int) -> Sequence[TokenFamily]:
        """The user's live sessions, newest first."""
        statement = select(TokenFamily).where(
            TokenFamily.user_id == user_id, TokenFamily.expires_at >= datetime.now(UTC)
        )
        return (await self.session.scalars(statement.order_by(TokenFamily.created_at.desc(), TokenFamily.id))).all()

    async def rotate(self, family: str, user_id: int, generation: int, expires_at: datetime) -> int | None:
        """Move the family on from `generation`, if that is still its newest: the new generation.
        None if another rotation (or the family's end) came first."""
        now = datetime.now(UTC)
        statement = (
            update(TokenFamily)
            .where(TokenFamily.id == family, TokenFamily.user_id == user_id, TokenFamily.generation == generation)
            .values(generation=TokenFamily.generation + 1, expires_at=expires_at, last_used_at=now, rotated_at=now)
            .returning(TokenFamily.generation)
        )
        rotated: int | None = await self.session.scalar(statement, execution_options=NO_SYNC)
        return rotated

    async def end(self, family: str, user_id: int, generation: int | None = None) -> bool:
        """End the family (if `generation` is given: only if that is still its newest)."""
        condition = [TokenFamily.id == family, TokenFamily.user_id == user_id]
        if generation is not None:
            condition.append(TokenFamily.generation == generation)
        statement = delete(TokenFamily).where(*condition).returning(TokenFamily.id)
        return await self.session.scalar(statement, execution_options=NO_SYNC) is not None

    async def end_all(self, user_id: int, *, but: str | None = None) -> int:
        """End the user's families (but the one `but` names): how many there were."""
        statement = delete(TokenFamily).where(TokenFamily.user_id == user_id)
        if but is not None:
            statement = statement.where(TokenFamily.id != but)
        result = await self.session.execute(statement.returning(TokenFamily.id))
        return len(result.all())
