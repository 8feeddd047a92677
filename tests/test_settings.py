"""Every setting is declared once (settings.py): read from the environment by that declaration,
and the README's table is made from it."""

from __future__ import annotations

import dataclasses
import re

import pytest

from conftest import PROJECT_DIR
from environ import readme_table
from settings import Settings


def test_the_readme_table_is_the_declarations() -> None:
    readme = (PROJECT_DIR / "README.md").read_text()
    table = re.search(r"^\| variable \| default \| meaning \|\n(?:\|.*\n)+", readme, re.MULTILINE)
    assert table is not None
    assert table.group(0).strip() == readme_table(Settings), "the README's table differs: paste `python settings.py`"


def test_every_setting_is_read_from_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    given = {
        "DATABASE_URL": "postgresql://app@db/users",
        "DB_POOL_SIZE": "3",
        "DB_POOL_TIMEOUT": "1.5",
        "DB_PGBOUNCER": "true",
        "SECRET_KEY": "k" * 32,
        "SECRET_KEY_FALLBACKS": " a , b ,",
        "LOG_FORMAT": "json",
        "METRICS": "false",
        "PORT": "9000",
    }
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_environ()
    assert (settings.database_url, settings.pool_size, settings.pool_timeout) == ("postgresql://app@db/users", 3, 1.5)
    assert (settings.pgbouncer, settings.secret_key, settings.secret_key_fallbacks) == (True, "k" * 32, ("a", "b"))
    assert (settings.log_format, settings.metrics, settings.port) == ("json", False, 9000)
    names = [field.metadata["name"] for field in dataclasses.fields(Settings)]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(("name", "value"), [("DB_POOL_SIZE", "ten"), ("LOG_FORMAT", "xml"), ("METRICS", "maybe")])
def test_a_bad_value_names_its_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"^{name}: "):
        Settings.from_environ()
