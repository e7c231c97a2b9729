"""Moved to tests/support/softauthn.py; this re-export keeps the old imports working."""

from tests.support.softauthn import *  # noqa: F403
