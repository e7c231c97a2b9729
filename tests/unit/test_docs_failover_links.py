"""The failover and scaling notes (issue #20): their relative links lead somewhere.

tests/test_repository.py checks the older documents; these are checked the same way.
"""

from __future__ import annotations

import pytest

from tests import test_repository


@pytest.mark.parametrize("name", ["docs/SCALING.md", "docs/FAILOVER.md",
                                  "docs/OPERATIONS.md", "README.md"])
def test_the_failover_and_scaling_notes_link_only_to_what_exists(name: str) -> None:
    test_repository.test_relative_links_lead_to_files_and_headings_that_exist(name)


def test_the_readme_still_fits() -> None:
    test_repository.test_the_readme_fits_on_a_screen_or_four()
