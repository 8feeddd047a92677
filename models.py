"""The ORM models (typed, SQLAlchemy 2.x). Alembic's migrations are the schema's source of truth;
tests/test_schema.py checks that these agree with them."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Dialect,
    ForeignKey,
    Identity,
    Integer,
    PrimaryKeyConstraint,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def email_key(email: str) -> str:
    """What makes two addresses the same one: Unicode case folding (canonical caseless matching),
    done here in Python so that SQLite and PostgreSQL agree (SQLite's lower() folds ASCII only)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", email).casefold())


# Case folding can lengthen a string (ß becomes ss); this is room for any 254-character address.
EMAIL_KEY_LENGTH = 762
# Room for any IPv6 address with a zone; longer "addresses" (from a proxy's header) are cut to it.
ADDRESS_LENGTH = 64


class Base(DeclarativeBase):
    pass


# Ids are never reused: AUTOINCREMENT on SQLite (which needs the INTEGER type), IDENTITY on PostgreSQL.
ID_TYPE = BigInteger().with_variant(Integer(), "sqlite")
# Binary collation, so usernames compare and sort alike on SQLite and PostgreSQL.
USERNAME_TYPE = String(20).with_variant(String(20, collation="C"), "postgresql")


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_users"),
        UniqueConstraint("username", name="uq_users_username"),
        UniqueConstraint("username_key", name="uq_users_username_key"),
        UniqueConstraint("email_key", name="uq_users_email_key"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(ID_TYPE, Identity(always=False))
    username: Mapped[str] = mapped_column(USERNAME_TYPE)  # matched exactly, as typed
    username_key: Mapped[str] = mapped_column(String(20))  # username.lower(): unique regardless of case
    email: Mapped[str] = mapped_column(String(254))  # as the user typed it (after email-validator)
    email_key: Mapped[str] = mapped_column(String(EMAIL_KEY_LENGTH))  # email_key(email): unique
    password_hash: Mapped[str] = mapped_column(String(255))
    address: Mapped[str | None] = mapped_column(String(100), default=None)
    phone_number: Mapped[str | None] = mapped_column(String(11), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=lambda: datetime.now(UTC))
    # Bumped when the password changes: every token issued before carries an older value.
    token_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class TokenFamily(Base):
    """One signin's refresh tokens: each refresh rotates to the next generation, and only the
    newest is good. Presenting an older one (a reuse: someone else has it too) ends the family, as
    does signing out; the access tokens issued in it stop working at once. A family's row goes
    when it ends or its last refresh token expires, so storage grows with signins, not refreshes."""

    __tablename__ = "token_families"
    __table_args__ = (PrimaryKeyConstraint("id", name="pk_token_families"),)

    id: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[int] = mapped_column(
        ID_TYPE, ForeignKey("users.id", ondelete="CASCADE", name="fk_token_families_user"), index=True
    )
    generation: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class SigninFailure(Base):
    """Failures counted for the signin throttle, in a fixed window from the first.

    `kind` "password": one row per (client address, username) for the per-user rule, and one per
    address with `username = ''` for the per-address rule (a signin's username is never empty).
    `kind` "email": email-taken answers per (address, username), a count a signin does not clear.
    """

    __tablename__ = "signin_failures"
    __table_args__ = (PrimaryKeyConstraint("kind", "address", "username", name="pk_signin_failures"),)

    kind: Mapped[str] = mapped_column(String(16))
    address: Mapped[str] = mapped_column(String(ADDRESS_LENGTH))
    username: Mapped[str] = mapped_column(String(100))
    window_start: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    failures: Mapped[int] = mapped_column(Integer)
