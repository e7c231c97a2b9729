"""Running and checking Alembic migrations on the service's own engine."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from mfa_service.errors import ConfigurationError


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "mfa_service:migrations")
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (idempotent)."""

    def _run(connection: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)

    async with engine.begin() as conn:
        await conn.run_sync(_run)


async def current_revision(engine: AsyncEngine) -> str | None:
    def _current(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(_current)


async def require_current_schema(engine: AsyncEngine) -> None:
    """Refuse to serve on an un-migrated or outdated schema, saying what to do."""
    current, head = await current_revision(engine), head_revision()
    if current is None:
        raise ConfigurationError(
            "the database has no mfa-service schema: run `mfa-service migrate` first")
    if current != head:
        raise ConfigurationError(
            f"the database schema is at revision {current}, this build needs {head}: "
            "run `mfa-service migrate` (or deploy the build that matches the schema)")
