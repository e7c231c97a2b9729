"""Telemetry's defaults: nothing is built when nothing is exported, and logs are JSON off a
terminal and text on one. (Traces and metrics as a backend receives them:
tests/api/test_telemetry.py.)"""

from __future__ import annotations

import io

import pytest

from mfa_service import telemetry
from mfa_service.logs import default_format
from tests.support.config import make_settings


@pytest.mark.parametrize("database_url", [
    "sqlite+aiosqlite:///mfa-service.db", "postgresql+asyncpg://mfa@db.internal/mfa"],
    ids=["sqlite", "postgres"])
def test_nothing_is_built_when_nothing_is_exported(database_url: str) -> None:
    settings = make_settings(database_url)  # nothing connects: the URL is only a setting
    tel = telemetry.configure(settings)
    assert (tel.tracer_provider, tel.meter_provider, tel.metrics) == (None, None, None)
    assert tel.server_interceptor() is None and tel.http_transport() is None


def test_json_is_the_default_off_a_terminal_and_text_on_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert default_format() == "json"
    monkeypatch.setattr("sys.stderr", Tty())
    assert default_format() == "text"
