"""The schema's revision: applying the migrations (Alembic, in migrations/), and telling whether a
database is at their head (/readyz)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent


def alembic_config(database_url: str | None = None) -> Any:
    from alembic.config import Config

    config = Config(str(PROJECT_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_DIR / "migrations"))
    config.attributes["database_url"] = database_url
    return config


def upgrade_schema(database_url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations (blocking; from async code, run it in a thread)."""
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def downgrade_schema(database_url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(database_url), revision)


@dataclass(frozen=True)
class SchemaRevisions:
    """The migrations' head, and every revision this code knows (read once, at startup)."""

    head: str
    known: frozenset[str]

    @classmethod
    def from_migrations(cls) -> SchemaRevisions:
        from alembic.script import ScriptDirectory

        script = ScriptDirectory.from_config(alembic_config())
        return cls(str(script.get_current_head()), frozenset(rev.revision for rev in script.walk_revisions()))

    def behind(self, revision: str | None) -> bool:
        """True if a database at `revision` needs this code's migrations. A revision this code does
        not know is taken to be newer (a later release migrated first, during a rolling deploy)."""
        return revision is None or (revision != self.head and revision in self.known)
