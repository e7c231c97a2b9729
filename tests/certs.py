"""Moved to tests/support/certs.py; this re-export keeps `from tests.certs import ...` working."""

from tests.support.certs import *  # noqa: F403
