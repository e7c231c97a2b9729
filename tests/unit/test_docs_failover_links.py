"""The failover and scaling notes (issue #20): their relative links lead somewhere.

tests/unit/test_repository.py checks the older documents; these are checked the same way.
"""

from __future__ import annotations

import pytest

from tests.support.docs import README_MAX_LINES, broken_links, readme_lines


@pytest.mark.parametrize("name", ["docs/SCALING.md", "docs/FAILOVER.md",
                                  "docs/OPERATIONS.md", "README.md"])
def test_the_failover_and_scaling_notes_link_only_to_what_exists(name: str) -> None:
    broken = broken_links(name)
    assert not broken, f"{name}: broken links {broken}"


def test_the_readme_still_fits() -> None:
    assert readme_lines() <= README_MAX_LINES
