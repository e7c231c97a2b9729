"""The CheckSession cache (PostgreSQL): answers from memory, and a revocation is seen at
once in the revoking process and within a second in every other one (NOTIFY), whichever
path revoked (logout, log out everywhere, a disabled factor, an operator's reset). A lost
listener turns the cache off until it is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy.engine import make_url

from mfa_service.app import create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.service.admin import AdminService
from mfa_service.store.database import Database
from mfa_service.store.engine import create_engine
from tests.support.client import enroll_app, login, totp_at
from tests.support.config import TEST_KEYRING, make_settings
from tests.support.replica import Replica
from tests.support.statements import counting


@pytest.fixture
async def replicas(postgres_url: str, fresh_clock: FixedClock) -> AsyncIterator[list[Replica]]:
    """Two server processes' worth of servers on one PostgreSQL database."""
    out, channels = [], []
    for _ in range(2):
        app = await create_server(make_settings(postgres_url), clock=fresh_clock,
                                  keyring=Keyring.parse(TEST_KEYRING))
        channel = aio.insecure_channel(f"127.0.0.1:{app.port}")
        channels.append(channel)
        out.append(Replica(app, pb_grpc.TwoFactorServiceStub(channel)))
    for r in out:
        await r.cache_on()
    yield out
    for channel in channels:
        await channel.close()
    for r in out:
        await r.app.stop(0)


async def seen_within(replica: Replica, token: str, seconds: float) -> float:
    """How long until ``replica`` says the session is no longer valid (fails past it)."""
    started = time.monotonic()
    while await replica.valid(token):
        assert time.monotonic() - started < seconds, "revocation not seen in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_a_cached_check_costs_no_statement_and_a_logout_is_seen_at_once(
        replicas: list[Replica], user_id: str, fresh_clock: FixedClock) -> None:
    a = replicas[0]
    factor = await enroll_app(a.stub, user_id, fresh_clock)
    session = await login(a.stub, factor, fresh_clock)
    assert await a.valid(session.session_token)  # read from the database, now cached
    with counting(a.app) as statements:
        for _ in range(5):
            assert await a.valid(session.session_token)
        assert statements.sql == []
    await a.stub.RevokeSession(pb.RevokeSessionRequest(session_token=session.session_token))
    assert not await a.valid(session.session_token)  # the same process: at once


@pytest.mark.parametrize("revoked_unheard", [False, True])
async def test_a_cached_session_due_for_its_slide_is_slid_in_one_statement(
        replicas: list[Replica], postgres_url: str, user_id: str, fresh_clock: FixedClock,
        revoked_unheard: bool) -> None:
    """An active user's session is in the cache and, once a minute, due for a slide of
    its idle deadline: the slide alone goes to the database (no read before it). It
    still decides in the database whether the session lives: a revocation whose
    eviction this process never heard of (written here without its NOTIFY) answers
    invalid, in that same one statement."""
    a = replicas[0]
    factor = await enroll_app(a.stub, user_id, fresh_clock)
    session = await login(a.stub, factor, fresh_clock)
    assert await a.valid(session.session_token)  # read from the database, now cached
    if revoked_unheard:
        dsn = make_url(postgres_url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute("UPDATE sessions SET revoked_at = now() AT TIME ZONE 'UTC'"
                                " WHERE user_id = $1", user_id)
        finally:
            await admin.close()
        assert await a.valid(session.session_token)  # the cache has not heard of it
    fresh_clock.advance(5 * 60)  # the idle deadline would move by more than a minute
    with counting(a.app) as statements:
        answer = await a.stub.CheckSession(pb.CheckSessionRequest(
            session_token=session.session_token, application=pb.APPLICATION_PORTAL))
        assert [sql.split()[0] for sql in statements.sql] == ["UPDATE"], statements.sql
    assert answer.valid is not revoked_unheard
    if not revoked_unheard:
        assert answer.idle_expires_at.ToDatetime() == (
            fresh_clock.now() + timedelta(minutes=30)).replace(tzinfo=None)
        with counting(a.app) as statements:  # slid and cached again
            assert await a.valid(session.session_token)
            assert statements.sql == []


@pytest.mark.parametrize("how", ["logout", "everywhere", "disable", "admin_reset"])
async def test_every_revocation_reaches_the_other_replica_within_a_second(
        replicas: list[Replica], postgres_url: str, user_id: str,
        fresh_clock: FixedClock, how: str) -> None:
    a, b = replicas
    factor = await enroll_app(b.stub, user_id, fresh_clock)
    session = await login(b.stub, factor, fresh_clock)
    token = session.session_token
    for _ in range(3):  # cached on A
        assert await a.valid(token)
    if how == "logout":
        await b.stub.RevokeSession(pb.RevokeSessionRequest(session_token=token))
    elif how == "everywhere":
        await b.stub.RevokeSession(pb.RevokeSessionRequest(user_id=user_id))
    elif how == "disable":
        ch = await b.stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_DISABLE,
            application=pb.APPLICATION_PORTAL))
        done = await b.stub.Disable(pb.DisableRequest(
            user_id=user_id, factor_id=factor.factor_id, challenge_id=ch.challenge_id,
            code=totp_at(factor.secret, fresh_clock)))
        assert done.result == pb.VERIFY_RESULT_APPROVED
    else:  # an operator, from a process of its own (mfa-service admin reset-user)
        database = Database(create_engine(make_url(postgres_url)))
        try:
            await AdminService(database, fresh_clock).reset_user(user_id, "lost phone")
        finally:
            await database.dispose()
    assert await seen_within(a, token, 1.0) < 1.0


async def test_a_lost_listener_turns_the_cache_off_until_it_is_back(
        replicas: list[Replica], postgres_url: str, user_id: str,
        fresh_clock: FixedClock) -> None:
    a = replicas[0]
    factor = await enroll_app(a.stub, user_id, fresh_clock)
    session = await login(a.stub, factor, fresh_clock)
    assert await a.valid(session.session_token)
    dsn = make_url(postgres_url).set(drivername="postgresql").render_as_string(
        hide_password=False)
    admin = await asyncpg.connect(dsn)
    try:  # every server's listening connection on this database goes away
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'mfa-service-revocations' AND datname = $1",
            make_url(postgres_url).database)
    finally:
        await admin.close()
    cache = a.app.revocations._cache if a.app.revocations else None
    assert cache is not None
    for _ in range(100):
        if not cache.enabled:
            break
        await asyncio.sleep(0.01)
    assert not cache.enabled and len(cache) == 0
    with counting(a.app) as statements:
        assert await a.valid(session.session_token)
        assert len(statements.sql) == 1  # from the database while the listener is away
    await a.cache_on()  # reconnected


async def test_no_cache_behind_pgbouncer(postgres_url: str, fresh_clock: FixedClock) -> None:
    """Transaction pooling keeps no session for LISTEN: invalidations would be lost."""
    app = await create_server(make_settings(postgres_url, database_pooler="pgbouncer"),
                              clock=fresh_clock, keyring=Keyring.parse(TEST_KEYRING))
    try:
        assert app.revocations is None
    finally:
        await app.stop(0)
