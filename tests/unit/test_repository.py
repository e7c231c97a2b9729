"""The documents hold together: every relative link leads to a file and heading that exist,
and the README fits on a screen or four. (That no file names a file outside the repository
is checked over what git tracks: tests/system/test_repository.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.docs import README_MAX_LINES, broken_links, readme_lines

MARKDOWN = ["README.md", "docs/API.md", "docs/OPERATIONS.md", "docs/SECURITY.md",
            "docs/ARCHITECTURE.md", "docs/BENCHMARKS.md", "docs/TESTING.md",
            "examples/portal_backoffice/README.md"]


def test_the_readme_fits_on_a_screen_or_four() -> None:
    lines = readme_lines()
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail into docs/"


@pytest.mark.parametrize("name", MARKDOWN)
def test_relative_links_lead_to_files_and_headings_that_exist(name: str) -> None:
    broken = broken_links(name)
    assert not broken, f"{name}: broken links {broken}"


def test_only_the_unit_touches_its_connection() -> None:
    """Every statement goes through the store's Unit (execute, fetchrow, write, flush), so
    none runs past the deferred writes: a read that would miss them, or a write sent
    before them. The unit's connection is private to store/unit.py."""
    repo = Path(__file__).resolve().parents[2]
    offenders = []
    for path in sorted((repo / "mfa_service").rglob("*.py")):
        if path.relative_to(repo).as_posix() == "mfa_service/store/unit.py":
            continue
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if re.search(r"\b(tx|unit|_unit|self)\.(_?conn)\b", line):
                offenders.append(f"{path.relative_to(repo)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
