"""The audit command's times: a naive time is UTC. (Key rotation and the support desk's reset
in-process: tests/api/test_admin.py; the commands as subprocesses: tests/system/test_admin.py.)"""

from __future__ import annotations

from datetime import UTC, datetime


def test_naive_times_are_utc() -> None:
    from mfa_service.cli_admin import parse_instant

    assert parse_instant("2026-03-02") == datetime(2026, 3, 2, tzinfo=UTC)
    assert parse_instant("2026-03-02T11:00:00+01:00") == datetime(2026, 3, 2, 10, tzinfo=UTC)
