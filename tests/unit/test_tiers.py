"""The test suite's own layout (docs/TESTING.md): every test module lives in a tier, the
tiers are the registered markers, fixtures live in conftest files and helpers in
tests/support, and no test module imports another."""

from __future__ import annotations

import re
import tomllib

from tests.conftest import TIERS
from tests.support.config import REPO

TESTS = REPO / "tests"


def test_every_test_module_lives_in_a_tier() -> None:
    outside = sorted(str(p.relative_to(REPO)) for p in TESTS.rglob("test_*.py")
                     if p.relative_to(TESTS).parts[0] not in TIERS)
    assert not outside, f"move these into tests/unit, tests/api or tests/system: {outside}"
    for tier in TIERS:
        assert (TESTS / tier / "__init__.py").exists()
        assert list((TESTS / tier).glob("test_*.py")), tier


def test_the_tiers_are_the_registered_markers_and_unknown_ones_are_refused() -> None:
    options = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["tool"]["pytest"][
        "ini_options"]
    registered = {marker.split(":")[0] for marker in options["markers"]}
    assert set(TIERS) <= registered
    assert "--strict-markers" in options["addopts"].split()


def test_fixtures_live_in_conftest_files_and_helpers_in_support() -> None:
    fixture = re.compile(r"^@pytest\.fixture", re.MULTILINE)
    in_support = sorted(str(p.relative_to(REPO)) for p in (TESTS / "support").rglob("*.py")
                        if fixture.search(p.read_text("utf-8")))
    assert not in_support, f"fixtures belong in a conftest.py: {in_support}"


def test_no_test_module_imports_another() -> None:
    imports_a_test = re.compile(r"^\s*(from tests(\.\w+)*\.test_\w+ import|from tests(\.\w+)* "
                                r"import test_)", re.MULTILINE)
    found = sorted(str(p.relative_to(REPO)) for p in TESTS.rglob("*.py")
                   if imports_a_test.search(p.read_text("utf-8")))
    assert not found, f"move what they share into tests/support: {found}"
