"""The documents hold together: every relative link leads to a file and heading that exist,
and the README fits on a screen or four. (That no file names a file outside the repository
is checked over what git tracks: tests/system/test_repository.py.)"""

from __future__ import annotations

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
