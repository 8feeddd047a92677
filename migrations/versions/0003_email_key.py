"""emails unique by their case-folded form (email_key), the same on SQLite and PostgreSQL

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

SQLite's lower() folds ASCII only, so `ÉLISE@example.com` and `élise@example.com` could both sign
up there. The key is computed in Python (as models.email_key did) for every existing row. If two
existing accounts turn out to share a key, the migration stops and names them: which one keeps
the address is for a person to decide.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.batch import recreated_on_sqlite

# Frozen copies of what models.py said when this migration was written: a later change there must
# not change what this migration did.
EMAIL_KEY_LENGTH = 762


def email_key(email: str) -> str:
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", email).casefold())


revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("email_key", sa.String(EMAIL_KEY_LENGTH), nullable=True))
    users = sa.table("users", sa.column("id", sa.BigInteger), sa.column("email", sa.String), sa.column("email_key"))
    connection = op.get_bind()
    owners: dict[str, list[int]] = {}
    for user_id, email in connection.execute(sa.select(users.c.id, users.c.email).order_by(users.c.id)):
        owners.setdefault(email_key(email), []).append(user_id)
    shared = {key: ids for key, ids in owners.items() if len(ids) > 1}
    if shared:
        listed = "; ".join(f"{key}: users {', '.join(map(str, ids))}" for key, ids in sorted(shared.items()))
        raise RuntimeError(
            f"{len(shared)} email address(es) belong to more than one account once case is folded ({listed}). "
            "Give all but one of each group another address, then run the migration again."
        )
    for key, (user_id,) in owners.items():
        connection.execute(users.update().where(users.c.id == user_id).values(email_key=key))
    op.drop_index("uq_users_email_lower", table_name="users")
    with recreated_on_sqlite("users") as batch:
        batch.alter_column("email_key", existing_type=sa.String(EMAIL_KEY_LENGTH), nullable=False)
        batch.create_unique_constraint("uq_users_email_key", ["email_key"])


def downgrade() -> None:
    with recreated_on_sqlite("users") as batch:
        batch.drop_constraint("uq_users_email_key", type_="unique")
        batch.drop_column("email_key")
    op.create_index("uq_users_email_lower", "users", [sa.text("lower(email)")], unique=True)
