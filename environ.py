"""How settings are declared and read: `setting()` (a variable, its default, parser and meaning),
the parsers, values read from the environment through starlette.config (no .env file), secrets
from `NAME_FILE`, and the README table made from the declarations (settings.py holds them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.config import Config

T = TypeVar("T")


def setting(
    name: str, default: T, parse: Callable[[str], T], meaning: str, shown: str | None = None, secret: bool = False
) -> T:
    """A field of Settings, read from the environment variable `name`; `shown` is its default as
    the README says it, where that is not the value itself. A `secret` may come from a file named
    by `{name}_FILE` instead (Docker and Kubernetes secrets)."""
    metadata = {"name": name, "parse": parse, "meaning": meaning, "shown": shown, "secret": secret}
    return dataclasses.field(default=default, metadata=metadata)


def boolean(value: str) -> bool:
    if value.lower() not in ("true", "1", "false", "0"):
        raise ValueError(f"expected true or false, not {value!r}")
    return value.lower() in ("true", "1")


def optional(value: str) -> str | None:
    return value or None


def comma_separated(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def from_environ(declared: type[Any]) -> dict[str, Any]:
    """The values the environment sets for the fields of `declared` (a dataclass of setting()s),
    parsed; a ValueError naming the variable (never its value) for a bad one."""
    config = Config()  # environment only: no .env file is read
    values: dict[str, Any] = {}
    for field in dataclasses.fields(declared):
        name = field.metadata["name"]
        raw = config(name, default=None)
        if field.metadata["secret"]:
            raw = from_file(name, raw, config(f"{name}_FILE", default=None))
        if raw is not None:
            try:
                values[field.name] = field.metadata["parse"](raw)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
    return values


def from_file(name: str, value: str | None, path: str | None) -> str | None:
    """A secret's value, from `{name}_FILE` if that is set (its trailing newline dropped). Errors
    name the setting, never its value."""
    if path is None:
        return value
    if value is not None:
        raise ValueError(f"{name} and {name}_FILE are both set: set one of them")
    try:
        with open(path) as file:
            return file.read().rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"{name}_FILE: cannot read {path} ({exc.strerror})") from None


def shown(value: object) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def readme_table(declared: type[Any]) -> str:
    """The README's configuration table, made from the declarations."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(declared):
        default = field.metadata["shown"] or f"`{shown(field.default)}`"
        default = "none" if default == "`none`" else default
        name = f"`{field.metadata['name']}`" + (
            f" (or `{field.metadata['name']}_FILE`)" if field.metadata["secret"] else ""
        )
        lines.append(f"| {name} | {default} | {field.metadata['meaning']} |")
    return "\n".join(lines)
