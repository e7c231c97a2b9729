"""Alembic is the schema authority: migrations match the models on both backends, and
`serve` refuses a database whose schema is missing or outdated."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url

from mfa_service import cli
from mfa_service.app import create_server
from mfa_service.crypto import Keyring
from mfa_service.errors import ConfigurationError
from mfa_service.store import migrate
from mfa_service.store.engine import create_engine
from mfa_service.store.models import SENT_CHALLENGE_INDEXES, Base
from tests.support.config import TEST_KEYRING, make_settings


async def test_migrated_schema_matches_the_models(database_url: str) -> None:
    engine = create_engine(make_url(database_url))

    def diff(conn: Connection) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))

    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(diff) == []
        assert await migrate.current_revision(engine) == migrate.head_revision()
    finally:
        await engine.dispose()


@pytest.mark.parametrize(("index", "column"), SENT_CHALLENGE_INDEXES)
async def test_the_send_counters_use_their_partial_indexes(
        database_url: str, index: str, column: str) -> None:
    """The per-destination, per-range and per-country counts find their rows through
    indexes that hold only challenges which sent something, on PostgreSQL and on SQLite;
    an app challenge, with NULL there, is in none of them."""
    engine = create_engine(make_url(database_url))
    value = "'DK'" if column == "phone_region" else ("'\\x00'::bytea" if "postgresql"
                                                     in database_url else "x'00'")
    query = (f"SELECT count(*) FROM challenges WHERE {column} = {value}"  # noqa: S608
             " AND created_at > '2026-01-01'")
    try:
        async with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                plan = (await conn.execute(text("EXPLAIN " + query))).scalars().all()
            else:
                plan = [r[3] for r in await conn.execute(text("EXPLAIN QUERY PLAN " + query))]
            assert any(index in line for line in plan), plan
            defined = (await conn.execute(text(
                "SELECT indexdef FROM pg_indexes WHERE indexname = :n"
                if engine.dialect.name == "postgresql" else
                "SELECT sql FROM sqlite_master WHERE name = :n"), {"n": index})).scalar_one()
            assert f"{column} IS NOT NULL" in defined.replace("(", "").replace(")", "")
    finally:
        await engine.dispose()


async def test_serve_refuses_an_unmigrated_postgres(empty_postgres: str) -> None:
    with pytest.raises(ConfigurationError, match="run `mfa-service migrate` first"):
        await create_server(make_settings(empty_postgres), keyring=Keyring.parse(TEST_KEYRING))


async def test_serve_refuses_an_outdated_schema_then_migrate_fixes_it(
        empty_postgres: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A database one revision behind this build: serve refuses it and names the
    revisions; `mfa-service migrate` (the command, in-process) brings it to head, and
    serve then starts."""
    head = migrate.head_revision()
    previous = ScriptDirectory.from_config(migrate.alembic_config()).get_revision(
        head).down_revision
    assert isinstance(previous, str)
    engine = create_engine(make_url(empty_postgres))
    try:
        await migrate.upgrade(engine, previous)
        with pytest.raises(ConfigurationError,
                           match=f"at revision {previous}, this build needs {head}"):
            await create_server(make_settings(empty_postgres),
                                keyring=Keyring.parse(TEST_KEYRING))

        settings = make_settings(empty_postgres)
        await cli._migrate(settings)
        assert f"schema at revision {head} (was {previous})" in capsys.readouterr().out
        assert await migrate.current_revision(engine) == head
        async with engine.connect() as conn:  # the last revision's DDL ran, not just its stamp
            assert await conn.run_sync(
                lambda sync: list(compare_metadata(MigrationContext.configure(sync),
                                                   Base.metadata))) == []
        app = await create_server(settings, keyring=Keyring.parse(TEST_KEYRING))
        await app.stop(0)
    finally:
        await engine.dispose()


async def test_downgrade_to_base_and_back(tmp_path: object, empty_postgres: str) -> None:
    for url in (f"sqlite+aiosqlite:///{tmp_path}/m.db", empty_postgres):
        engine = create_engine(make_url(url))
        try:
            await migrate.upgrade(engine)
            await _downgrade(engine)
            assert await migrate.current_revision(engine) is None
            await migrate.upgrade(engine)
            assert await migrate.current_revision(engine) == migrate.head_revision()
        finally:
            await engine.dispose()


async def _downgrade(engine: object) -> None:
    from alembic import command
    from sqlalchemy.ext.asyncio import AsyncEngine

    assert isinstance(engine, AsyncEngine)

    def run(conn: Connection) -> None:
        cfg = migrate.alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")

    async with engine.begin() as conn:
        await conn.run_sync(run)
