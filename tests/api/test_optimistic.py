"""A login without the user's lock first (store/unit.py, "optimistic"; which calls try it:
service/optimism.py).

On PostgreSQL a login's Challenge and Verify read without the lock and send their writes
as one statement that is its own transaction, writing only if the user's lock_version is
still what the read found. These tests show the path is taken, and play what it must
survive: a call of the same user's that commits between the read and the write, and a
call that turns out to need the lock after all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy import func, select

from mfa_service.app import App
from mfa_service.clock import FixedClock
from mfa_service.domain import AuditContext
from mfa_service.errors import GuardLost, NeedsLock
from mfa_service.service import audit
from mfa_service.store import hot
from mfa_service.store.database import Transaction
from mfa_service.store.models import audit_events, challenges, sessions, user_lockouts
from mfa_service.store.unit import USER_LOCK
from tests.support.client import enroll_app, rich_error, totp_at
from tests.support.locks import users_lock_held
from tests.support.rig import Rig, code_in, enroll_phone, eventually, phone_text
from tests.support.statements import counting

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

pytestmark = pytest.mark.postgres


@pytest.fixture(autouse=True)
def _postgres_only(app: App) -> None:
    if app.database.engine.dialect.name != "postgresql":
        pytest.skip("SQLite serialises every writing transaction: no call reads unlocked")


def wrong(code: str) -> str:
    return f"{(int(code) + 500_000) % 1_000_000:06d}"


async def refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    e = rich_error(err.value)
    return e.code, e.reason


async def _login_challenge(stub: Stub, user_id: str, factor_id: str) -> pb.ChallengeResponse:
    return await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))


async def _lockout_row(app: App, user_id: str) -> Any:
    async with app.database.engine.connect() as conn:
        return (await conn.execute(select(user_lockouts).where(
            user_lockouts.c.user_id == user_id))).one()


async def _count(app: App, table: Any, **where: str) -> int:
    async with app.database.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table).where(
            *(table.c[k] == v for k, v in where.items())))).scalar_one())


async def test_a_login_reads_unlocked_and_writes_in_one_statement(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    before = (await _lockout_row(app, user_id)).lock_version
    seen: list[str] = []

    def observe(_: int, sql: str) -> None:
        if "user_lockouts" in sql:  # a login's statements (not another test's checks)
            seen.append(sql)

    hot.observers.append(observe)
    try:
        ch = await _login_challenge(stub, user_id, factor.factor_id)
        ok = await stub.Verify(pb.VerifyRequest(
            challenge_id=ch.challenge_id, code=totp_at(factor.secret, fresh_clock)))
    finally:
        hot.observers.remove(observe)
    assert ok.result == pb.VERIFY_RESULT_APPROVED and ok.session.session_token
    # Each RPC: its read (no lock taken), then its writes, which end in the check of
    # every guard (the user's lock_version first).
    assert seen[0] == hot.USER_WITH_FACTOR and seen[2] == hot.CHALLENGE_USER_WITH_FACTOR
    for batch in (seen[1], seen[3]):
        assert batch.startswith("WITH w0 AS (UPDATE user_lockouts")
        assert "mfa_guard_lost(0)" in batch
    assert len(seen) == 4
    # Each moved lock_version on, as a lock would have.
    assert (await _lockout_row(app, user_id)).lock_version == before + 2


async def test_a_lockout_committed_between_the_read_and_the_write_refuses_the_login(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """Another call of the user's (here: a run of wrong codes elsewhere) holds the lock
    and locks the user out; Verify's unlocked read found no lockout. Verify's writes must
    not stand on that read: they find the lock held and write nothing (they never wait
    for it: their statement is its own COMMIT, which no deadline may cut), and Verify runs
    again under the lock, waits for it within its deadline, and refuses the locked-out
    user. (Nothing else guards this: the lockout is not a row the login writes.)"""
    factor = await enroll_app(stub, user_id, fresh_clock)
    ch = await _login_challenge(stub, user_id, factor.factor_id)
    code = totp_at(factor.secret, fresh_clock)
    async with users_lock_held(app, user_id) as held:
        until = (fresh_clock.now() + timedelta(minutes=15)).replace(tzinfo=None)
        await held.holder.execute("UPDATE user_lockouts SET consecutive_failures = 10,"
                                  " locked_until = $2 WHERE user_id = $1", user_id, until)

        async def verifying() -> pb.VerifyResponse:
            return await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=code))

        verify = asyncio.create_task(verifying())
        # Until Verify, run again under the lock, waits for it.
        await held.until_waiting("WITH l AS (INSERT%")
        await held.commit()
        answer = await refused(asyncio.wait_for(verify, timeout=10))
    assert answer == (grpc.StatusCode.RESOURCE_EXHAUSTED, "ERROR_REASON_USER_LOCKED_OUT")
    assert await _count(app, sessions, user_id=user_id) == 0
    async with app.database.engine.connect() as conn:
        attempts = (await conn.execute(select(challenges.c.attempts).where(
            challenges.c.id == ch.challenge_id))).scalar_one()
    assert attempts == 0  # the unlocked try's attempt was undone with the rest


async def test_a_wrong_code_read_unlocked_is_counted_once(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """The failure count rides in the write that stands for the lock (one UPDATE of the
    user's row): counted once, and lock_version moved once."""
    factor = await enroll_app(stub, user_id, fresh_clock)
    ch = await _login_challenge(stub, user_id, factor.factor_id)
    before = await _lockout_row(app, user_id)
    failed = await stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, code=wrong(totp_at(factor.secret, fresh_clock))))
    assert failed.result == pb.VERIFY_RESULT_INVALID_CODE
    after = await _lockout_row(app, user_id)
    assert after.consecutive_failures == before.consecutive_failures + 1
    assert after.lock_version == before.lock_version + 1
    # The challenge's opening and this failed attempt, each audited once.
    assert await _count(app, audit_events, challenge_id=ch.challenge_id) == 2


async def test_concurrent_wrong_codes_of_one_user_are_each_counted(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """Four wrong codes at once on one challenge: the unlocked tries collide on
    lock_version, the losers run again under the lock, and every attempt is counted once,
    on the challenge and on the user's lockout counter alike."""
    factor = await enroll_app(stub, user_id, fresh_clock)
    ch = await _login_challenge(stub, user_id, factor.factor_id)
    before = await _lockout_row(app, user_id)
    bad = wrong(totp_at(factor.secret, fresh_clock))
    results = await asyncio.gather(*(stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, code=bad)) for _ in range(4)))
    assert sorted(r.attempts_remaining for r in results) == [1, 2, 3, 4]
    assert {r.result for r in results} == {pb.VERIFY_RESULT_INVALID_CODE}
    after = await _lockout_row(app, user_id)
    assert after.consecutive_failures == before.consecutive_failures + 4
    async with app.database.engine.connect() as conn:
        attempts = (await conn.execute(select(challenges.c.attempts).where(
            challenges.c.id == ch.challenge_id))).scalar_one()
    assert attempts == 4


async def test_a_statement_that_needs_the_lock_stops_before_writing(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """What an unlocked unit may not do raises NeedsLock, and nothing it deferred is
    written: the use case runs again under the lock."""
    factor = await enroll_app(stub, user_id, fresh_clock)
    before = await _lockout_row(app, user_id)
    async def then(step: Callable[[Transaction], Awaitable[Any]]) -> None:
        async with app.database.transaction(optimistic=True) as tx:
            await tx.factors.locked_with(user_id, factor.factor_id)
            tx.later.factors.touch(factor.factor_id, fresh_clock.now())
            await step(tx)

    with pytest.raises(NeedsLock):
        await then(lambda tx: tx.lockouts.lock(user_id))
    with pytest.raises(NeedsLock):  # a read after a write
        await then(lambda tx: tx.factors.get(factor.factor_id))
    assert (await _lockout_row(app, user_id)).lock_version == before.lock_version


async def test_a_lock_taken_and_released_after_the_read_makes_the_writes_stand_down(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """The other half of the check: a call of the user's that took the lock and committed
    between the read and the writes (so nothing holds the lock any more) moved
    lock_version on. The writes find it moved: GuardLost, and none of them stands."""
    factor = await enroll_app(stub, user_id, fresh_clock)
    before = await _count(app, audit_events, user_id=user_id)

    async def another_call() -> None:
        async with app.database.engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            async with raw.transaction():
                await raw.fetchrow(hot.LOCK_USER, user_id)

    async def read_then_write() -> None:
        async with app.database.transaction(optimistic=True) as tx:
            await tx.factors.locked_with(user_id, factor.factor_id)
            await another_call()
            audit.record(tx, fresh_clock.now(), audit.Event.CHALLENGE, audit.Outcome.OK,
                         AuditContext(caller="test"), user_id=user_id,
                         factor_id=factor.factor_id)

    with pytest.raises(GuardLost) as lost:
        await read_then_write()
    assert lost.value.guard == USER_LOCK
    assert await _count(app, audit_events, user_id=user_id) == before


async def test_a_phone_login_through_a_process_that_never_saw_the_factor(
        rig: Rig, user_id: str) -> None:
    """A second server process (another worker, or this one after a restart) knows
    nothing of a phone factor: its first login Challenge tries without the lock, finds it
    must lock the number and count the send (NeedsLock), and runs again under the lock;
    one text is sent, and the code logs in there. From then on it knows, and a Challenge
    costs the budgeted five statements again."""
    factor_id, number = await enroll_phone(rig, user_id)
    other: App = await rig.restart()  # another server on the same database
    async with aio.insecure_channel(f"127.0.0.1:{other.port}") as channel:
        stub = pb_grpc.TwoFactorServiceStub(channel)
        sent = len(rig.calls_to(number))
        ch = await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_PORTAL))
        sms = (await eventually(lambda: rig.calls_to(number)[sent:]))
        ok = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id,
                                                code=code_in(phone_text(sms[-1]))))
        assert ok.result == pb.VERIFY_RESULT_APPROVED and ok.session.session_token
        assert len(rig.calls_to(number)) == sent + 1
        rig.clock.advance(61)  # past the resend cooldown
        with counting(other) as statements:
            again = await stub.Challenge(pb.ChallengeRequest(
                user_id=user_id, factor_id=factor_id, purpose=pb.PURPOSE_LOGIN,
                application=pb.APPLICATION_PORTAL))
        assert again.challenge_id
        [rpc] = {t for t, sql in statements.seen if "INSERT INTO user_lockouts" in sql}
        assert len([sql for t, sql in statements.seen if t == rpc]) == 5, statements.sql
