"""Moved to tests/support/pgcluster.py; this re-export keeps the old imports working."""

from tests.support.pgcluster import *  # noqa: F403
