"""PostgreSQL connections kept between transactions (store/database.py: ``_connection``).

A transaction leaves its connection for the next one instead of returning it to
SQLAlchemy's pool, but only in the state a fresh checkout has. These tests show the ways
that could go wrong: a connection left in AUTOCOMMIT would run a later writing
transaction's statements each on its own (the user's lock released at once); a writer
that failed must not hand on its open transaction (and the locks it took); and
connections the server ended must not fail one call each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from sqlalchemy import text

from mfa_service import deadline
from mfa_service.app import App
from mfa_service.errors import DeadlineExceeded, StoreUnavailable
from mfa_service.store.database import Database
from tests.support.config import asyncpg_dsn
from tests.support.statements import counting

END_OUR_CONNECTIONS = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
    " WHERE application_name = 'mfa-service' AND datname = current_database()")


async def _unavailable_of_six(read: Callable[[], Awaitable[None]]) -> int:
    """How many of six reads, one after another, fail UNAVAILABLE."""
    failed = 0
    for _ in range(6):
        try:
            await read()
        except StoreUnavailable:
            failed += 1
    return failed


def _postgres_only(app: App) -> Database:
    if app.database.engine.dialect.name != "postgresql":
        pytest.skip("connections are kept on PostgreSQL only")
    return app.database


async def _one_transaction(db: Database) -> None:
    """A writing transaction's hot and SQLAlchemy statements run in one transaction."""
    async with db.transaction() as tx:
        hot = (await tx.fetchrow("SELECT txid_current() AS x"))["x"]
        again = (await tx.fetchrow("SELECT txid_current() AS x"))["x"]
        through_sqlalchemy = (await tx.execute(text("SELECT txid_current()"))).scalar()
    assert hot == again == through_sqlalchemy


async def test_a_writing_transaction_after_an_autocommit_read_is_one_transaction(
        app: App) -> None:
    db = _postgres_only(app)
    for _ in range(3):
        # A read that ran a SQLAlchemy statement switched its connection to AUTOCOMMIT:
        # that one goes back to the pool (which resets it), never to the next writer.
        async with db.transaction(readonly=True) as tx:
            await tx.execute(text("SELECT 1"))
        await _one_transaction(db)
        # A read of hot statements only never switches: its connection is kept.
        async with db.transaction(readonly=True) as tx:
            await tx.fetchrow("SELECT 1")
        await _one_transaction(db)


async def test_a_failed_writer_hands_on_no_transaction_and_no_lock(
        app: App, database_url: str) -> None:
    """A writer that raised after taking a lock: the lock is free for others at once,
    and the next writers (on kept connections) each run a transaction of their own."""
    db = _postgres_only(app)
    await _one_transaction(db)  # a writer's connection, kept

    async def refused_under_a_lock() -> None:
        async with db.transaction() as tx:
            await tx.fetchrow("SELECT pg_advisory_xact_lock(4242) AS l")
            raise RuntimeError("refused under the lock")

    with pytest.raises(RuntimeError):
        await refused_under_a_lock()
    other = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock(4242)")
        await other.execute("SELECT pg_advisory_unlock(4242)")
    finally:
        await other.close()
    seen = set()
    for _ in range(3):
        async with db.transaction() as tx:
            seen.add((await tx.fetchrow("SELECT txid_current() AS x"))["x"])
            # No transaction left open: this one is not inside another's.
            assert (await tx.fetchrow(
                "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory'"
                " AND objid = 4242"))["n"] == 0
    assert len(seen) == 3


async def test_connections_the_server_ended_fail_one_call_not_one_each(
        app: App, database_url: str) -> None:
    db = _postgres_only(app)

    async def hold() -> None:
        async with db.transaction(readonly=True) as tx:
            await tx.fetchrow("SELECT 1")
            await asyncio.sleep(0.05)

    await asyncio.gather(*(hold() for _ in range(4)))  # four connections, then kept
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        assert await admin.fetchval(END_OUR_CONNECTIONS) >= 4
    finally:
        await admin.close()

    async def read() -> None:
        async with db.transaction(readonly=True) as tx:
            assert (await tx.fetchrow("SELECT 1 AS one"))["one"] == 1

    assert await _unavailable_of_six(read) <= 1


async def test_hot_reads_keep_one_connection_and_survive_connections_the_server_ended(
        app: App, database_url: str) -> None:
    """``Database.read_hot`` (CheckSession's statements without a unit of work): calls one
    after another run on one kept connection, each in autocommit (no transaction left
    open), and connections the server ended fail at most one call."""
    db = _postgres_only(app)
    assert db.hot_sessions is not None
    first = await db.read_hot("SELECT pg_backend_pid() AS pid")
    again = await db.read_hot("SELECT pg_backend_pid() AS pid")
    assert first["pid"] == again["pid"]  # kept, not checked out again
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        # A statement of its own: no transaction left open on the kept connection.
        assert await admin.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1",
                                    first["pid"]) == "idle"
        await _one_transaction(db)  # what a read leaves is a fresh checkout's state
        assert await admin.fetchval(END_OUR_CONNECTIONS) >= 1
    finally:
        await admin.close()

    async def read() -> None:
        assert (await db.read_hot("SELECT 1 AS one"))["one"] == 1

    assert await _unavailable_of_six(read) <= 1


async def test_a_hot_read_past_its_deadline_sends_nothing(app: App) -> None:
    db = _postgres_only(app)

    async def late() -> None:
        deadline.set_remaining(0.0, asyncio.get_running_loop().time())
        with counting(app) as statements:
            with pytest.raises(DeadlineExceeded):
                await db.read_hot("SELECT 1")
            assert statements.seen == []

    await asyncio.create_task(late())  # its own context: the deadline goes with it


async def test_a_hot_read_cut_by_its_deadline_leaves_nothing_running(
        app: App, database_url: str) -> None:
    """The deadline cancels the statement: DEADLINE_EXCEEDED, the connection is not kept
    (its state is unsure), the server stops the statement, and the next read works."""
    db = _postgres_only(app)

    async def short() -> None:
        deadline.set_remaining(0.2, asyncio.get_running_loop().time())
        with pytest.raises(DeadlineExceeded):
            await db.read_hot("SELECT pg_sleep(5)")

    await asyncio.create_task(short())
    assert (await db.read_hot("SELECT 1 AS one"))["one"] == 1
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        for _ in range(50):
            running = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                " AND query = 'SELECT pg_sleep(5)' AND datname = current_database()")
            if running == 0:
                break
            await asyncio.sleep(0.05)
        assert running == 0
    finally:
        await admin.close()
