"""The ORM models (typed, SQLAlchemy 2.x). Alembic's migrations are the schema's source of truth;
tests/test_schema.py checks that these agree with them."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Dialect,
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
Id = BigInteger().with_variant(Integer(), "sqlite")
# Binary collation, so usernames compare and sort alike on SQLite and PostgreSQL.
Username = String(20).with_variant(String(20, collation="C"), "postgresql")


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_users"),
        UniqueConstraint("username", name="uq_users_username"),
        UniqueConstraint("email_key", name="uq_users_email_key"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Id, Identity(always=False))
    username: Mapped[str] = mapped_column(Username)
    email: Mapped[str] = mapped_column(String(254))  # as the user typed it (after email-validator)
    email_key: Mapped[str] = mapped_column(String(EMAIL_KEY_LENGTH))  # email_key(email): unique
    password_hash: Mapped[str] = mapped_column(String(255))
    address: Mapped[str | None] = mapped_column(String(100), default=None)
    phone_number: Mapped[str | None] = mapped_column(String(11), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=lambda: datetime.now(UTC))
    # Bumped when the password changes: every token issued before carries an older value.
    token_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class RevokedToken(Base):
    """A refresh token that was used or signed out; kept until it would have expired anyway."""

    __tablename__ = "revoked_tokens"
    __table_args__ = (PrimaryKeyConstraint("jti", name="pk_revoked_tokens"),)

    jti: Mapped[str] = mapped_column(String(32))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class SigninFailure(Base):
    """Failed password checks counted for the signin throttle, in a fixed window from the first.

    One row per (client address, username) for the per-user rule, and one per address with
    `username = ''` for the per-address rule (a signin's username is never empty).
    """

    __tablename__ = "signin_failures"
    __table_args__ = (PrimaryKeyConstraint("address", "username", name="pk_signin_failures"),)

    address: Mapped[str] = mapped_column(String(ADDRESS_LENGTH))
    username: Mapped[str] = mapped_column(String(100))
    window_start: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    failures: Mapped[int] = mapped_column(Integer)
