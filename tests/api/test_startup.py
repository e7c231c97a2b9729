"""A start that fails part-way closes what it had opened (app.py builds on an exit stack):
no database connection is left behind for the operator's next attempt to trip over."""

from __future__ import annotations

import logging
import socket

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from mfa_service.app import create_server
from mfa_service.crypto import Keyring
from mfa_service.errors import ConfigurationError
from tests.conftest import TEST_KEYRING, make_settings


async def _connections(url: str) -> int:
    u = make_url(url)
    conn = await asyncpg.connect(host=u.host, port=u.port, user=u.username,
                                 database="postgres")
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", u.database)
        return count
    finally:
        await conn.close()


async def test_a_start_that_cannot_listen_leaves_no_connection_open(postgres_url: str) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        before = await _connections(postgres_url)
        settings = make_settings(postgres_url, health_listen_addr=f"127.0.0.1:{port}")
        with pytest.raises(ConfigurationError, match="cannot listen"):
            await create_server(settings, keyring=Keyring.parse(TEST_KEYRING))
        # The build had pinged and checked the schema on a pooled connection.
        assert await _connections(postgres_url) == before
    finally:
        taken.close()


async def test_a_start_on_postgres_without_autovacuum_warns_the_operator(
        postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """With autovacuum off nothing refreshes the statistics the prepared statements were
    planned with; the operator hears it once, at start. Which way this box's PostgreSQL
    is set decides which half of the test speaks: both are checked against the server's
    own ``SHOW autovacuum``."""
    u = make_url(postgres_url)
    conn = await asyncpg.connect(host=u.host, port=u.port, user=u.username,
                                 database=u.database)
    try:
        autovacuum = await conn.fetchval("SHOW autovacuum")
    finally:
        await conn.close()
    caplog.set_level(logging.WARNING, logger="mfa_service")
    app = await create_server(make_settings(postgres_url), keyring=Keyring.parse(TEST_KEYRING))
    await app.stop(0)
    warned = [r.getMessage() for r in caplog.records if "autovacuum is off" in r.getMessage()]
    if autovacuum == "on":
        assert warned == []
    else:
        assert len(warned) == 1 and "ANALYZE" in warned[0]


async def test_no_statistics_warning_on_the_embedded_default(
        sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mfa_service")
    app = await create_server(make_settings(sqlite_url), keyring=Keyring.parse(TEST_KEYRING))
    await app.stop(0)
    assert not [r for r in caplog.records if "autovacuum" in r.getMessage()]
