"""The ORM models (typed, SQLAlchemy 2.x). Alembic's migrations are the schema's source of truth;
tests/test_schema.py checks that these agree with them."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Identity,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import false
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
# Room for any canonical address (addresses.py), and for a device token's id in the throttle.
ADDRESS_LENGTH = 64
USER_AGENT_LENGTH = 200  # what is kept of a client's User-Agent
IDENTIFIER_LENGTH = 254  # what a signin names: a username, or an email address


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
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    last_signin_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    email_verified: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


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
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)  # the signin: SESSION_MAX_AGE counts from it
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime)  # the signin, then the latest refresh
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)  # when `generation` was made
    user_agent: Mapped[str | None] = mapped_column(String(USER_AGENT_LENGTH), default=None)
    address: Mapped[str | None] = mapped_column(String(ADDRESS_LENGTH), default=None)


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
    username: Mapped[str] = mapped_column(String(IDENTIFIER_LENGTH))
    window_start: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    failures: Mapped[int] = mapped_column(Integer)


EVENTS = (
    "signup", "signin", "signin_failed", "signin_throttled", "refresh_reused", "signout", "session_ended",
    "password_changed", "email_changed", "account_deleted", "account_disabled", "account_enabled",
    "admin_granted", "admin_revoked", "throttle_cleared", "password_reset_requested", "password_reset",
    "email_verified",
)  # fmt: skip


class AuditEvent(Base):
    """The security trail: who signed in, failed, changed what, and which operator did what to
    whom. Kept AUDIT_RETENTION_DAYS; a deleted account's events stay, with `user_id` emptied and
    the username as it was."""

    __tablename__ = "audit_events"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_audit_events"),
        Index("ix_audit_events_user_id", "user_id", "id"),
        Index("ix_audit_events_username", "username", "id"),
        Index("ix_audit_events_event", "event", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(ID_TYPE, Identity(always=False))
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    event: Mapped[str] = mapped_column(String(32))  # one of EVENTS
    user_id: Mapped[int | None] = mapped_column(
        ID_TYPE, ForeignKey("users.id", ondelete="SET NULL", name="fk_audit_events_user")
    )
    username: Mapped[str | None] = mapped_column(String(IDENTIFIER_LENGTH))  # as it was, or as it was typed
    address: Mapped[str | None] = mapped_column(String(ADDRESS_LENGTH))
    user_agent: Mapped[str | None] = mapped_column(String(USER_AGENT_LENGTH))
    actor: Mapped[str | None] = mapped_column(String(32))  # the operator, for what an operator did
    detail: Mapped[str | None] = mapped_column(String(200))


class AccountToken(Base):
    """A password reset or email verification token: random, stored only as its SHA-256, valid
    until `expires_at`, once (`used_at`). A verification token proves `email`, the address it was
    sent to."""

    __tablename__ = "account_tokens"
    __table_args__ = (
        PrimaryKeyConstraint("token_hash", name="pk_account_tokens"),
        Index("ix_account_tokens_user_id", "user_id", "purpose"),
    )

    token_hash: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(16))  # "reset" or "verify"
    # Checked at COMMIT: recovery.py writes a stand-in token in a savepoint that it rolls back.
    user_id: Mapped[int] = mapped_column(
        ID_TYPE,
        ForeignKey(
            "users.id", ondelete="CASCADE", name="fk_account_tokens_user", deferrable=True, initially="DEFERRED"
        ),
    )
    email: Mapped[str] = mapped_column(String(254))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class MailMessage(Base):
    """The outbox: a mail is written in the transaction of the request that sends it, and
    delivered after that commits by the delivery loop (mailer.py). Once sent, its body is dropped."""

    __tablename__ = "mail_outbox"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_mail_outbox"),
        UniqueConstraint("message_id", name="uq_mail_outbox_message_id"),
        Index("ix_mail_outbox_due", "status", "next_attempt_at"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(ID_TYPE, Identity(always=False))
    message_id: Mapped[str] = mapped_column(String(200))  # the Message-ID header, the same on every try
    kind: Mapped[str] = mapped_column(String(32))
    recipient: Mapped[str] = mapped_column(String(254))
    subject: Mapped[str] = mapped_column(String(200))
    body: Mapped[str | None] = mapped_column(Text)  # None once sent
    status: Mapped[str] = mapped_column(String(16))  # "pending", "sent" or "failed"
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)  # a process is sending it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    last_error: Mapped[str | None] = mapped_column(String(200), default=None)
    token_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)  # of the token it carries
