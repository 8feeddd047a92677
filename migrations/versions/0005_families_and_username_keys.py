"""refresh tokens as families (in place of one revocation per used token); usernames unique
regardless of case

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Tokens issued before this revision name no family: they stop working, and their users sign in
again. If two existing usernames differ only in case, the migration stops and names them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.batch import recreated_on_sqlite

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.drop_index("ix_revoked_tokens_expires_at", table_name="revoked_tokens")
    op.drop_table("revoked_tokens")
    op.create_table(
        "token_families",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("user_id", Id, nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_token_families"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_token_families_user", ondelete="CASCADE"),
    )
    op.create_index("ix_token_families_user_id", "token_families", ["user_id"])
    op.create_index("ix_token_families_expires_at", "token_families", ["expires_at"])

    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("username_key", sa.String(20), nullable=True))
    users = sa.table("users", sa.column("id", Id), sa.column("username", sa.String), sa.column("username_key"))
    connection = op.get_bind()
    owners: dict[str, list[str]] = {}
    for username in connection.scalars(sa.select(users.c.username).order_by(users.c.id)):
        owners.setdefault(username.lower(), []).append(username)
    shared = {key: names for key, names in owners.items() if len(names) > 1}
    if shared:
        listed = "; ".join(", ".join(names) for _, names in sorted(shared.items()))
        raise RuntimeError(
            f"{len(shared)} username(s) differ only in case from another ({listed}). "
            "Rename all but one of each group, then run the migration again."
        )
    connection.execute(users.update().values(username_key=sa.func.lower(users.c.username)))
    with recreated_on_sqlite("users") as batch:
        batch.alter_column("username_key", existing_type=sa.String(20), nullable=False)
        batch.create_unique_constraint("uq_users_username_key", ["username_key"])


def downgrade() -> None:
    with recreated_on_sqlite("users") as batch:
        batch.drop_constraint("uq_users_username_key", type_="unique")
        batch.drop_column("username_key")
    op.drop_index("ix_token_families_expires_at", table_name="token_families")
    op.drop_index("ix_token_families_user_id", table_name="token_families")
    op.drop_table("token_families")
    op.create_table(
        "revoked_tokens",
        sa.Column("jti", sa.String(32), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("jti", name="pk_revoked_tokens"),
    )
    op.create_index("ix_revoked_tokens_expires_at", "revoked_tokens", ["expires_at"])
