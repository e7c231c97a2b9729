"""What every tier agrees on: the repository root, the fixed start time and keyring of the
tests, settings for an in-process server, and PostgreSQL.

PostgreSQL: ``MFA_TEST_POSTGRES_URL`` (default postgres@127.0.0.1:5432, trust auth).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import make_url

from mfa_service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("MFA_TEST_POSTGRES_URL",
                              "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Mid-step start (RFC 6238 steps are 30 s): 2026-03-02T10:00:15Z.
T0 = datetime(2026, 3, 2, 10, 0, 15, tzinfo=UTC)
TEST_KEYRING = "test-1:" + "A" * 43


def asyncpg_dsn(url: str) -> str:
    """A SQLAlchemy URL as asyncpg's own DSN (for asyncpg.connect)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def migrate_to_head(url: str) -> None:
    """The production path: `mfa-service migrate` before `serve`."""
    from mfa_service.store import migrate
    from mfa_service.store.engine import create_engine

    engine = create_engine(make_url(url))
    try:
        await migrate.upgrade(engine)
    finally:
        await engine.dispose()


def make_settings(database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url, "listen_addr": "127.0.0.1:0", "keyring": TEST_KEYRING,
        "health_probe_seconds": 0.2, "shutdown_grace_seconds": 0.5, "log_format": "text",
        "shutdown_drain_seconds": 0,
        # The shared server only queues messages; delivery tests run their own dispatchers
        # against real SMTP/HTTP servers.
        "outbox_dispatcher": False,
    }
    values.update(overrides)
    return Settings.model_validate(values)
