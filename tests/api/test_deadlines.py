"""The caller's deadline bounds the database work: DEADLINE_EXCEEDED, nothing half done.

Another connection holds what the RPC needs (PostgreSQL: the user's lock row; SQLite: the
write lock), so the RPC's statement waits past the caller's deadline. The server ends the
work itself (on PostgreSQL the waiting statement is cancelled on the server, not left
queued behind the lock), answers DEADLINE_EXCEEDED, never INTERNAL or UNKNOWN, and the
transaction rolled back: once the lock is free, nothing of the call is there.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from mfa_service import deadline
from mfa_service.app import App
from mfa_service.clock import FixedClock
from mfa_service.store.models import challenges
from tests.support.client import enroll_app
from tests.support.config import asyncpg_dsn

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

DEADLINE = 0.5


@asynccontextmanager
async def holding_the_users_lock(url: str, user_id: str) -> AsyncIterator[None]:
    """Another connection holds what a write of ``user_id`` needs, until the block ends."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        conn = sqlite3.connect(parsed.database or "", isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(asyncpg_dsn(url))
    try:
        async with pg.transaction():
            locked = await pg.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM user_lockouts WHERE user_id = $1 "
                "FOR UPDATE) AS l", user_id)
            assert locked == 1
            yield
    finally:
        await pg.close()


async def waiting_on_locks(url: str) -> int:
    """Backends of the server (application_name) waiting for a lock now."""
    pg = await asyncpg.connect(asyncpg_dsn(url))
    try:
        count: int = await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'mfa-service' "
            "AND datname = current_database() AND wait_event_type = 'Lock'")
        return count or 0
    finally:
        await pg.close()


async def test_a_deadline_shorter_than_the_wait_answers_deadline_exceeded_and_rolls_back(
        app: App, stub: Stub, database_url: str, user_id: str, fresh_clock: FixedClock,
        caplog: pytest.LogCaptureFixture) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)

    async def challenges_of_factor() -> int:
        async with app.database.transaction(readonly=True) as tx:
            count = (await tx.execute(select(func.count()).where(
                challenges.c.factor_id == factor.factor_id))).scalar()
        return count or 0

    before = await challenges_of_factor()
    request = pb.ChallengeRequest(user_id=user_id, factor_id=factor.factor_id,
                                  purpose=pb.PURPOSE_LOGIN, application=pb.APPLICATION_PORTAL)
    loop = asyncio.get_running_loop()
    with caplog.at_level(logging.INFO, logger="mfa_service"):
        async with holding_the_users_lock(database_url, user_id):
            started = loop.time()
            with pytest.raises(aio.AioRpcError) as err:
                await stub.Challenge(request, timeout=DEADLINE)
            took = loop.time() - started
            if make_url(database_url).get_backend_name() == "postgresql":
                await asyncio.sleep(0.2)  # the cancel request travels on its own connection
                assert await waiting_on_locks(database_url) == 0
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert took < DEADLINE + 0.5
        # The server ended the call itself (DEADLINE_EXCEEDED; CANCELLED when the gRPC
        # core's own cancellation at the deadline came first, e.g. while the connection
        # whose statement was cut short closed), never with an error.
        answered = [r for r in caplog.records if r.name == "mfa_service.rpc"
                    and getattr(r, "rpc", "") == "Challenge"]
        assert [getattr(r, "code", "") for r in answered][-1:] in (
            ["DEADLINE_EXCEEDED"], ["CANCELLED"])
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    # Rolled back: no challenge appeared, and the user's writes go on normally.
    assert await challenges_of_factor() == before
    opened = await stub.Challenge(request, timeout=10)
    assert opened.challenge_id
    assert await challenges_of_factor() == before + 1


async def test_an_already_expired_deadline_touches_nothing(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A call whose deadline is gone when it starts fails without a transaction.

    The caller's budget is spent on the way in (here: the transport is told none is left,
    as a call that queued behind others would find), so the outcome does not hang on a
    race between a 1 ms client timer and a fast server."""
    factor = await enroll_app(stub, user_id, fresh_clock)

    async def challenges_of_factor() -> int:
        async with app.database.transaction(readonly=True) as tx:
            count = (await tx.execute(select(func.count()).where(
                challenges.c.factor_id == factor.factor_id))).scalar()
        return count or 0

    before = await challenges_of_factor()
    set_remaining = deadline.set_remaining
    monkeypatch.setattr(deadline, "set_remaining",
                        lambda seconds, now: set_remaining(
                            None if seconds is None else -0.001, now))
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_PORTAL), timeout=10)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    monkeypatch.undo()
    assert await challenges_of_factor() == before
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id), timeout=10)
    assert listed.factors
