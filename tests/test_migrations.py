"""The migrations: every one runs up and down on both databases from an empty one, and those that
rewrite existing rows do it right, or stop and say why."""

from __future__ import annotations

import ast
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy.exc import IntegrityError

from conftest import PROJECT_DIR, DirectDatabase, in_thread
from migrate import SchemaRevisions, alembic_config, downgrade_schema, upgrade_schema

pytestmark = pytest.mark.anyio

HEAD = SchemaRevisions.from_migrations().head


# SQLite cannot reflect an expression index (0002's lower(email)); batch mode copies the table anyway.
@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
async def test_every_migration_runs_up_and_down_from_an_empty_database(unmigrated_url: str) -> None:
    db = DirectDatabase(unmigrated_url)
    script = ScriptDirectory.from_config(alembic_config())
    revisions = [revision.revision for revision in reversed(list(script.walk_revisions()))]  # oldest first
    for revision in revisions:
        in_thread(upgrade_schema, unmigrated_url, revision)
        assert await db.scalar("SELECT version_num FROM alembic_version") == revision
    for revision in reversed(revisions[:-1]):
        in_thread(downgrade_schema, unmigrated_url, revision)
        assert await db.scalar("SELECT version_num FROM alembic_version") == revision
    in_thread(downgrade_schema, unmigrated_url, "base")
    assert await db.rows("SELECT version_num FROM alembic_version") == []
    in_thread(upgrade_schema, unmigrated_url)  # and up again, all the way
    assert await db.scalar("SELECT version_num FROM alembic_version") == HEAD


async def insert_users(db: DirectDatabase, emails: list[str]) -> None:
    for i, email in enumerate(emails):
        await db.execute(
            "INSERT INTO users (username, email, password_hash, created_at) VALUES (:name, :email, 'x', :now)",
            {"name": f"old{i}", "email": email, "now": datetime(2026, 1, 1, tzinfo=UTC)},
        )


async def test_the_migration_gives_existing_rows_their_email_key(unmigrated_url: str) -> None:
    url_at_0002 = unmigrated_url
    in_thread(upgrade_schema, url_at_0002, "0002")  # before email_key
    db = DirectDatabase(url_at_0002)
    await insert_users(db, ["Alice@Example.com", "ÉLISE@example.com", "bob@example.com"])
    await db.execute("DELETE FROM users WHERE username = 'old2'")  # the highest id, deleted

    in_thread(upgrade_schema, url_at_0002)

    keys = await db.rows("SELECT username, email, email_key FROM users ORDER BY id")
    assert [tuple(row) for row in keys] == [
        ("old0", "Alice@Example.com", "alice@example.com"),
        ("old1", "ÉLISE@example.com", "élise@example.com"),
    ]
    with pytest.raises(IntegrityError):  # every row has a key from now on
        await insert_users(db, ["carol@example.com"])


async def test_the_migration_stops_on_addresses_that_fold_to_the_same_key(tmp_path: Path) -> None:
    # Only SQLite can hold such a pair at 0002: PostgreSQL's lower() already folds É to é.
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    in_thread(upgrade_schema, url, "0002")
    db = DirectDatabase(url)
    await insert_users(db, ["ÉLISE@example.com", "élise@example.com", "x@example.com"])
    rows_before = await db.rows("SELECT * FROM users ORDER BY id")

    with pytest.raises(RuntimeError, match=r"élise@example.com: users 1, 2"):
        in_thread(upgrade_schema, url)

    # Nothing half done: still at 0002, the table as it was; once resolved, it migrates.
    assert await db.scalar("SELECT version_num FROM alembic_version") == "0002"
    assert await db.rows("SELECT * FROM users ORDER BY id") == rows_before
    await db.execute("UPDATE users SET email = 'elise2@example.com' WHERE id = 2")
    in_thread(upgrade_schema, url)
    assert await db.scalar("SELECT version_num FROM alembic_version") == HEAD


async def test_the_migration_stops_on_usernames_that_differ_only_in_case(unmigrated_url: str) -> None:
    url_at_0004 = unmigrated_url
    in_thread(upgrade_schema, url_at_0004, "0004")  # before usernames had a case-folded key
    db = DirectDatabase(url_at_0004)
    for i, name in enumerate(["Alice", "alice", "bob"]):
        await db.execute(
            "INSERT INTO users (username, email, email_key, password_hash, created_at)"
            " VALUES (:name, :email, :email, 'x', :now)",
            {"name": name, "email": f"u{i}@example.com", "now": datetime(2026, 1, 1, tzinfo=UTC)},
        )

    with pytest.raises(RuntimeError, match="differ only in case from another \\(Alice, alice\\)"):
        in_thread(upgrade_schema, url_at_0004)

    assert await db.scalar("SELECT version_num FROM alembic_version") == "0004"
    await db.execute("UPDATE users SET username = 'alice2' WHERE username = 'alice'")
    in_thread(upgrade_schema, url_at_0004)
    rows = await db.rows("SELECT username, username_key FROM users ORDER BY id")
    assert [tuple(row) for row in rows] == [("Alice", "alice"), ("alice2", "alice2"), ("bob", "bob")]


def test_migrations_import_no_product_code() -> None:
    """Frozen: a migration holds its own copies, so that editing models.py cannot change one."""
    allowed = {*sys.stdlib_module_names, "sqlalchemy", "alembic", "migrations"}
    for path in sorted((PROJECT_DIR / "migrations" / "versions").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for module in modules:
                    assert module.split(".")[0] in allowed, f"{path.name} imports {module}"
