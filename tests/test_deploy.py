"""The deployment files say what the README says they do (the image itself: scripts/test-container)."""

from __future__ import annotations

from typing import Any

import yaml

from conftest import PROJECT_DIR


def test_compose_runs_the_service_beside_postgresql_with_health_checks_and_a_volume() -> None:
    compose: dict[str, Any] = yaml.safe_load((PROJECT_DIR / "compose.yaml").read_text())
    db, api = compose["services"]["db"], compose["services"]["api"]
    assert db["image"] == "postgres:15"
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert db["volumes"] == ["pgdata:/var/lib/postgresql/data"]
    assert "pgdata" in compose["volumes"]
    assert api["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert api["environment"]["DATABASE_URL"].startswith("postgresql://users:users@db:5432/")
    assert api["ports"] == ["127.0.0.1:8000:8000"]


def test_the_image_copies_every_module_the_app_imports() -> None:
    dockerfile = (PROJECT_DIR / "Dockerfile").read_text()
    dockerignore = (PROJECT_DIR / ".dockerignore").read_text().split()
    modules = sorted(path.name for path in PROJECT_DIR.glob("*.py"))  # every top-level module is the app's
    assert "app.py" in modules
    for module in (*modules, "alembic.ini"):
        assert module in dockerfile
        assert f"!{module}" in dockerignore
    assert "USER 10001:10001" in dockerfile
    assert "HEALTHCHECK" in dockerfile
