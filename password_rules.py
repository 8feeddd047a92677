"""Which passwords are refused, as NIST SP 800-63B rev 4 says (and OWASP ASVS 5.0 agrees): a length
(at least PASSWORD_MIN_LENGTH, at most 64), no composition rule, not on the blocklist (every entry of
zxcvbn's list of common passwords that the length rule lets through, in any case), and not
containing a context word (the username, the email's local part, the service's name). Passwords are
compared, and hashed, in Unicode's NFKC form: one passphrase typed on two keyboards is one password.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import unicodedata
from dataclasses import dataclass
from pathlib import Path

MAX_LENGTH = 64
FLOOR = 8  # ASVS 5.0's lowest minimum; NIST's is 15 where the password is the only factor
CONTEXT_WORD_LENGTH = 4  # shorter context words are too likely by chance to refuse a password for


def normalized(password: str) -> str:
    """The form a password is compared and hashed in (NFKC: compatibility characters such as
    full-width letters or ligatures become the plain ones)."""
    return unicodedata.normalize("NFKC", password)


def common_passwords() -> list[str]:
    """zxcvbn's list of the 30,000 most used passwords, read from its data file: importing zxcvbn
    would build its matchers over all of its lists (12 MB and 0.7 s a worker)."""
    spec = importlib.util.find_spec("zxcvbn")  # where it is, without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("zxcvbn is not installed (requirements.txt)")
    source = (Path(spec.submodule_search_locations[0]) / "frequency_lists.py").read_text()
    for line in source.splitlines():
        name, _, value = line.strip().partition(": ")
        if name == '"passwords"' and value.endswith('.split(","),'):
            listed: str = ast.literal_eval(value.removesuffix('.split(","),'))
            return listed.split(",")
    raise RuntimeError("zxcvbn's frequency_lists.py has no passwords line: requirements.txt pins the one read here")


@functools.cache
def blocklist(min_length: int) -> frozenset[str]:
    """The common passwords the length rule lets through, case-folded: a set, so a check is one
    lookup, not a scan of 30,000 entries (made once, at startup: lifespan.py)."""
    return frozenset(word.casefold() for word in common_passwords() if min_length <= len(word) <= MAX_LENGTH)


def blocklist_pattern(min_length: int) -> str:
    """The blocklist as one regular expression over the typed password, in any case, for the
    OpenAPI document: [Pp][Aa]... and \\xHH for symbols read the same in Python, Rust and ECMA."""

    def any_case(word: str) -> str:
        return "".join(
            f"[{c.upper()}{c.lower()}]" if c.isalpha() else c if c.isdigit() else f"\\x{ord(c):02x}" for c in word
        )

    words = sorted(blocklist(min_length), key=lambda word: (-len(word), word))
    return "^(?:" + "|".join(map(any_case, words)) + ")$"


@dataclass(frozen=True)
class PasswordRules:
    """The rules a new password must meet, with the service's settings."""

    min_length: int = 15
    service_name: str = "users"

    def refusal(self, password: str) -> str | None:
        """Why `password` is refused by the length rule or the blocklist, in words for its field
        error; None if it is not."""
        if not self.min_length <= len(password) <= MAX_LENGTH:
            return f"use {self.min_length} to {MAX_LENGTH} characters"
        if normalized(password).casefold() in blocklist(self.min_length):
            return "this is one of the most common passwords: choose another"
        return None

    def context_refusal(self, password: str, username: str, email: str) -> str | None:
        """Why `password` is refused for containing a word of its context; None if it is not."""
        folded = normalized(password).casefold()
        words = {
            "your username": username,
            "the name of your email address": email.rpartition("@")[0],
            "the service's name": self.service_name,
        }
        for what, word in words.items():
            word = normalized(word).casefold()
            if len(word) >= CONTEXT_WORD_LENGTH and word in folded:
                return f"must not contain {what}"
        return None
