"""The unit tier is pure: a test here that opens a network connection, listens on a port or
starts a process fails at once (it belongs in tests/api or tests/system, docs/TESTING.md).

The guard replaces, for the duration of each test, ``socket.socket.connect``/``bind``/
``connect_ex`` and ``subprocess.Popen`` (what asyncio, httpx, asyncpg and ``subprocess.run``
all go through) with a refusal. In-memory transports (httpx.ASGITransport) and reading the
repository's own files stay allowed. The tiers run in order, unit first, so no server of an
api test is alive in the background while these run.
"""

from __future__ import annotations

import socket
import subprocess
from typing import Any, NoReturn

import pytest


class NotAUnitTest(AssertionError):
    pass


def _refuse(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> NoReturn:
        raise NotAUnitTest(f"a unit test may not {what}: move it to tests/api or tests/system")
    return refused


@pytest.fixture(autouse=True)
def _pure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _refuse("open a network connection"))
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse("open a network connection"))
    monkeypatch.setattr(socket.socket, "bind", _refuse("listen on a port"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a process"))
