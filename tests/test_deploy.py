"""The deployment files say what the README says they do (the image itself: scripts/test-container)."""

from __future__ import annotations

from typing import Any

import yaml

from chaos import SERVE_FLAGS
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
    # Every top-level module is the app's, so the image takes them all (scripts/test-container
    # then proves that the image runs).
    dockerfile = (PROJECT_DIR / "Dockerfile").read_text()
    dockerignore = (PROJECT_DIR / ".dockerignore").read_text().split()
    assert "COPY alembic.ini *.py ./" in dockerfile
    assert {"!*.py", "!alembic.ini", "!migrations/", "!requirements.txt"} <= set(dockerignore)
    assert "USER 10001:10001" in dockerfile
    assert "HEALTHCHECK" in dockerfile


def test_the_service_is_served_the_same_way_everywhere() -> None:
    """scripts/serve, the image and the tests' uvicorn get the same flags (the head limit, no banner)."""
    for script in ("scripts/serve", "scripts/container-start"):
        text = (PROJECT_DIR / script).read_text()
        assert " ".join(SERVE_FLAGS) in text.replace("\\\n    ", ""), script
        assert '--timeout-graceful-shutdown "${GRACEFUL_TIMEOUT:-20}"' in text, script
