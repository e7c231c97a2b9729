"""Alembic environment: always runs on a connection handed in by mfa_service.store.migrate.

The caller opens the connection from the service's own engine (with its password and
dialect tweaks) and runs Alembic through ``AsyncConnection.run_sync``; so this file never
starts an event loop of its own and works from inside a running one (tests, ``serve``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from mfa_service.store.models import Base

config = context.config


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `mfa-service migrate`, not the alembic command")
run(connection)
