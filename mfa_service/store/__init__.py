"""The store: SQLAlchemy tables, the engine, and one narrow repository per aggregate.

SQLAlchemy is the schema authority (Alembic migrations in mfa_service/migrations).
Repositories speak SQLAlchemy Core on an AsyncConnection rather than the ORM: on this
machine Core costs roughly half the CPU of the ORM per statement (docs/BENCHMARKS.md, "Baselines"),
and the hot paths (Verify, CheckSession) are a handful of statements each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mfa_service.settings import Settings
    from mfa_service.store.database import Database


def open_database(settings: Settings, *, pool_size: int | None = None) -> Database:
    """The one place an engine is made from settings (server, workers, CLI commands).

    Nothing is connected yet: the first statement (or ``Database.ping``) connects.
    """
    from mfa_service.store.database import Database
    from mfa_service.store.engine import create_engine, database_url

    password = (settings.database_password.get_secret_value()
                if settings.database_password else None)
    return Database(create_engine(
        database_url(settings.database_url, password),
        pool_size=pool_size or settings.database_pool_size,
        timeout=settings.database_timeout_seconds, pooler=settings.database_pooler),
        pooled=settings.database_pooler != "none")
