"""sessions a user can see (when, where from, last used), operators (an admin role, disabled
accounts, the last signin), the security trail, and signin identifiers as long as an email

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

Sessions that exist when this runs get the time of the migration as their start and last use.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from migrations.batch import recreated_on_sqlite

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
When = sa.DateTime(timezone=True)


def upgrade() -> None:
    with recreated_on_sqlite("users") as batch:
        batch.add_column(sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("disabled", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("last_signin_at", When, nullable=True))

    with op.batch_alter_table("token_families") as batch:
        for column in ("created_at", "last_used_at", "rotated_at"):
            batch.add_column(sa.Column(column, When, nullable=True))
        batch.add_column(sa.Column("user_agent", sa.String(200), nullable=True))
        batch.add_column(sa.Column("address", sa.String(64), nullable=True))
    families = sa.table("token_families", sa.column("created_at", When), sa.column("last_used_at", When))
    now = datetime.now(UTC)
    op.get_bind().execute(families.update().values(created_at=now, last_used_at=now))
    with op.batch_alter_table("token_families") as batch:
        batch.alter_column("created_at", existing_type=When, nullable=False)
        batch.alter_column("last_used_at", existing_type=When, nullable=False)

    with op.batch_alter_table("signin_failures") as batch:
        batch.alter_column("username", existing_type=sa.String(100), type_=sa.String(254), existing_nullable=False)

    op.create_table(
        "audit_events",
        sa.Column("id", Id, sa.Identity(always=False), nullable=False),
        sa.Column("at", When, nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("user_id", Id, nullable=True),
        sa.Column("username", sa.String(254), nullable=True),
        sa.Column("address", sa.String(64), nullable=True),
        sa.Column("user_agent", sa.String(200), nullable=True),
        sa.Column("actor", sa.String(32), nullable=True),
        sa.Column("detail", sa.String(200), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_audit_events_user", ondelete="SET NULL"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_user_id", "audit_events", ["user_id", "id"])
    op.create_index("ix_audit_events_username", "audit_events", ["username", "id"])
    op.create_index("ix_audit_events_event", "audit_events", ["event", "id"])


def downgrade() -> None:
    for index in ("event", "username", "user_id", "at"):
        op.drop_index(f"ix_audit_events_{index}", table_name="audit_events")
    op.drop_table("audit_events")
    op.execute("DELETE FROM signin_failures WHERE length(username) > 100")  # counts that the old width cannot hold
    with op.batch_alter_table("signin_failures") as batch:
        batch.alter_column("username", existing_type=sa.String(254), type_=sa.String(100), existing_nullable=False)
    with op.batch_alter_table("token_families") as batch:
        for column in ("address", "user_agent", "rotated_at", "last_used_at", "created_at"):
            batch.drop_column(column)
    with recreated_on_sqlite("users") as batch:
        for column in ("last_signin_at", "disabled", "is_admin"):
            batch.drop_column(column)
