"""The README is the entrance: every page in docs/ is linked from it, and every link leads somewhere."""

from __future__ import annotations

import re

from conftest import PROJECT_DIR


def test_every_docs_page_is_linked_from_the_readme_and_every_link_exists() -> None:
    readme = (PROJECT_DIR / "README.md").read_text()
    pages = {path.relative_to(PROJECT_DIR).as_posix() for path in (PROJECT_DIR / "docs").glob("*.md")}
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", readme))
    assert pages == linked
    for page in pages:
        text = (PROJECT_DIR / page).read_text()
        assert text.startswith("# "), page  # one question a page, as its title
        assert text.splitlines()[0].removeprefix("# ").strip(), page
        for target in re.findall(r"\]\(([a-z-]+\.md)", text):
            assert (PROJECT_DIR / "docs" / target).exists(), f"{page} links to a missing {target}"
