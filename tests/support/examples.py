"""How many examples the property-based tests run (Hypothesis).

A run of the whole suite (``./scripts/test``, CI) runs each test's full count. A run of the
fast tiers only (``pytest tests/unit tests/api``, ``pytest -m "unit or api"``: no system
test selected) runs a third of it, at least ``least``, so that it stays within two minutes
on a 2-core machine (docs/TESTING.md). ``MFA_TEST_EXAMPLES=full`` or ``=fast`` says which,
whatever the selection. tests/conftest.py decides before the test modules are imported
(Hypothesis reads its settings when a test is decorated).
"""

from __future__ import annotations

import os

FAST_SHARE = 3
_fast = False


def choose(fast: bool) -> None:
    """Called once by tests/conftest.py: is this a fast-tier run? MFA_TEST_EXAMPLES wins."""
    global _fast
    chosen = os.environ.get("MFA_TEST_EXAMPLES", "").strip().lower()
    if chosen not in ("", "full", "fast"):
        raise ValueError(f"MFA_TEST_EXAMPLES={chosen!r}: say full or fast")
    _fast = chosen == "fast" if chosen else fast


def is_fast() -> bool:
    return _fast


def examples(full: int, *, least: int = 5) -> int:
    """``full`` in a full run; in a fast-tier run a third of it, never fewer than ``least``
    (nor more than ``full``)."""
    return min(full, max(least, full // FAST_SHARE)) if _fast else full
