"""Moved to tests/support/rig.py; this re-export keeps `from tests.rig import ...` working."""

from tests.support.rig import *  # noqa: F403
