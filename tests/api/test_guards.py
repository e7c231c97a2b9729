"""Guarded writes (store/unit.py): a deferred conditional write whose row count is its
answer. The per-user lock normally makes them impossible to lose; these tests take it out
of the way and show that replay safety does not rest on it alone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy import func, select

from mfa_service.app import App
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.errors import GuardLost
from mfa_service.factors.totp import AuthenticatorApp
from mfa_service.service import audit
from mfa_service.service.sessions import token_hash
from mfa_service.store.database import Transaction
from mfa_service.store.models import sessions
from mfa_service.store.repositories import ChallengeRepository
from mfa_service.store.security import LockoutState
from tests.support.client import enroll_app, login, totp_at
from tests.support.config import TEST_KEYRING, asyncpg_dsn
from tests.support.locks import until_waiting, users_lock_held
from tests.support.replica import Replica

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub


async def _lost(app: App, write: Callable[[Transaction], None]) -> str:
    """The guard a transaction doing ``write`` lost (it must lose one)."""
    with pytest.raises(GuardLost) as lost:
        await _run(app, write)
    return lost.value.guard


async def _run(app: App, write: Callable[[Transaction], None]) -> None:
    async with app.database.transaction() as tx:
        write(tx)


async def test_a_guard_that_matches_no_row_rolls_the_transaction_back(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)  # its step is now recorded
    now = fresh_clock.now()

    def old_step(tx: Transaction) -> None:
        tx.later.factors.accept_totp_step(factor.factor_id, 1, now)  # step 1: long past

    def old_step_and_audit(tx: Transaction) -> None:
        old_step(tx)  # PostgreSQL: now inside the combined WITH, not a lone UPDATE
        audit.record(tx, now, audit.Event.ALARM, audit.Outcome.FAILED, _who(),
                     user_id=user_id, detail={"test": "guard"})

    def stale_counter(tx: Transaction) -> None:
        tx.later.factors.use_with_secret(factor.factor_id, "k", b"new", now, previous=b"not it")

    assert await _lost(app, old_step) == "totp_step"
    assert await _lost(app, old_step_and_audit) == "totp_step"
    assert await _lost(app, stale_counter) == "passkey_counter"
    # Rolled back whole: the audit row written beside the guard is not there.
    async with app.database.transaction(readonly=True) as tx:
        events = await tx.audit.page(user_id, start=now - timedelta(seconds=1))
    assert not [e for e in events if e.detail.get("test") == "guard"]
    # A guard that holds passes (a step after the recorded one).
    await _run(app, lambda tx: tx.later.factors.accept_totp_step(factor.factor_id, 10**9, now))
    # A factor disabled meanwhile is touched by nobody.
    async with app.database.transaction() as tx:
        await tx.factors.disable(factor.factor_id, now)
    assert await _lost(app, lambda tx: tx.later.factors.touch(factor.factor_id, now)) == (
        "factor_active")


def _who() -> Any:
    from mfa_service.domain import AuditContext
    return AuditContext(caller="test")


@pytest.mark.postgres
async def test_without_the_user_lock_one_totp_code_still_logs_in_once(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two verifications race with one TOTP code on two challenges, the per-user lock replaced by
    a plain read and both checks held until both passed: the TOTP step's guard lets one
    commit and rolls the other back; run again, it sees the step taken (a replay)."""
    if app.database.engine.dialect.name != "postgresql":
        pytest.skip("SQLite serialises every writing transaction: nothing can overlap")
    factor = await enroll_app(stub, user_id, fresh_clock)

    async def no_lock(self: ChallengeRepository, challenge_id: str) -> Any:
        found = await self.get_with_factor(challenge_id)
        return (*found, LockoutState(0, None, None, False)) if found else None

    barrier = asyncio.Barrier(2)
    arrivals = 0
    original = AuthenticatorApp.check

    async def held_check(self: AuthenticatorApp, *args: Any) -> Any:
        nonlocal arrivals
        verdict = await original(self, *args)
        arrivals += 1
        if arrivals <= 2:  # the two first runs meet here; a run again passes straight on
            await asyncio.wait_for(barrier.wait(), timeout=10)
        return verdict

    monkeypatch.setattr(ChallengeRepository, "locked_with_factor", no_lock)
    monkeypatch.setattr(AuthenticatorApp, "check", held_check)
    # Two open challenges on one factor need two purposes (a new one of the same purpose
    # supersedes the old); both record the TOTP step when approved.
    opened = [await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=factor.factor_id, purpose=purpose,
        application=pb.APPLICATION_PORTAL))
        for purpose in (pb.PURPOSE_LOGIN, pb.PURPOSE_REGENERATE_RECOVERY_CODES)]
    code = totp_at(factor.secret, fresh_clock)
    # One channel each: the two calls must reach the server side by side.
    channels = [aio.insecure_channel(f"127.0.0.1:{app.port}") for _ in opened]
    try:
        results = await asyncio.gather(*(pb_grpc.TwoFactorServiceStub(ch).Verify(
            pb.VerifyRequest(challenge_id=c.challenge_id, code=code))
            for ch, c in zip(channels, opened, strict=True)))
    finally:
        for ch in channels:
            await ch.close()
    assert sorted(r.result for r in results) == [pb.VERIFY_RESULT_APPROVED,
                                                 pb.VERIFY_RESULT_INVALID_CODE]
    loser = next(r for r in results if r.result == pb.VERIFY_RESULT_INVALID_CODE)
    assert loser.attempts_remaining == 4  # the run again counted its one attempt
    async with app.database.engine.connect() as conn:
        created = await conn.scalar(select(func.count()).select_from(sessions).where(
            sessions.c.user_id == user_id))
    assert created == (1 if results[0].result == pb.VERIFY_RESULT_APPROVED else 0)


async def _read_while_the_lock_is_held(app: App, user_id: str, change: str, row_id: str,
                                       read: Callable[[Transaction], Awaitable[Any]], *,
                                       importing: bool = False) -> Any:
    """``read`` in a transaction of the service while another transaction holds the
    user's lock (as every call of the user takes it; ``importing``: as the bulk import
    takes it) and runs ``change`` on ``row_id``; that one commits only once ``read``'s
    statement waits for the lock."""
    async with users_lock_held(app, user_id, importing=importing) as held:
        await held.holder.execute(change, row_id)

        async def reading() -> Any:
            async with app.database.transaction() as tx:
                return await read(tx)

        task = asyncio.create_task(reading())
        await held.until_waiting("WITH l AS%")
        await held.commit()
        return await asyncio.wait_for(task, timeout=10)


@pytest.mark.postgres
async def test_a_lock_granted_late_reads_what_its_holder_committed(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """Verify takes the user's lock and reads the challenge in one statement, whose snapshot
    is older than the lock when it had to wait. Here another transaction holds the lock,
    counts two attempts on the challenge and commits while the read waits: the read must
    return the two attempts (the lock's version says the snapshot is stale: read again),
    not the snapshot's none."""
    if app.database.engine.dialect.name != "postgresql":
        pytest.skip("SQLite serialises every writing transaction: nothing can wait")
    factor = await enroll_app(stub, user_id, fresh_clock)
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    found = await _read_while_the_lock_is_held(
        app, user_id, "UPDATE challenges SET attempts = 2 WHERE id = $1", ch.challenge_id,
        lambda tx: tx.challenges.locked_with_factor(ch.challenge_id))
    assert found is not None
    challenge, record, _ = found
    assert challenge.attempts == 2
    assert record.factor.factor_id == factor.factor_id


@pytest.mark.postgres
async def test_challenge_lock_granted_late_reads_the_factor_its_holder_changed(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """The same for Challenge's lock and factor read: the holder disables the factor and
    commits while the read waits; the read returns the factor DISABLED."""
    if app.database.engine.dialect.name != "postgresql":
        pytest.skip("SQLite serialises every writing transaction: nothing can wait")
    factor = await enroll_app(stub, user_id, fresh_clock)
    _, record = await _read_while_the_lock_is_held(
        app, user_id, "UPDATE factors SET status = 'disabled' WHERE id = $1",
        factor.factor_id, lambda tx: tx.factors.locked_with(user_id, factor.factor_id))
    assert record is not None and record.factor.status.value == "disabled"


@pytest.mark.postgres
async def test_challenge_waiting_for_an_imports_lock_reads_what_the_import_changed(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """The bulk import (store/bulk.py) takes the same per-user lock for many users at once.
    It must add one to lock_version as every other lock does: a Challenge that waited for
    it would otherwise take its older snapshot for current and open a challenge on a
    factor the import had just disabled."""
    if app.database.engine.dialect.name != "postgresql":
        pytest.skip("SQLite serialises every writing transaction: nothing can wait")
    factor = await enroll_app(stub, user_id, fresh_clock)
    _, record = await _read_while_the_lock_is_held(
        app, user_id, "UPDATE factors SET status = 'disabled' WHERE id = $1",
        factor.factor_id, lambda tx: tx.factors.locked_with(user_id, factor.factor_id),
        importing=True)
    assert record is not None and record.factor.status.value == "disabled"


@pytest.mark.postgres
async def test_a_call_refused_under_the_lock_leaves_no_transaction_open(
        app: App, stub: Stub, database_url: str, user_id: str, fresh_clock: FixedClock) -> None:
    """On PostgreSQL a writing transaction opens no SQLAlchemy transaction object: BEGIN
    rides on the first hot statement and COMMIT is sent on the raw connection. A call
    refused after it took the user's lock must still roll back before its connection goes
    back to the pool: else the next call on that connection would run inside the old
    transaction, holding the lock, and commit whatever it left."""
    if app.database.engine.dialect.name != "postgresql":
        pytest.skip("the raw-connection transaction is PostgreSQL's")
    factor = await enroll_app(stub, user_id, fresh_clock)
    other = f"{user_id}-other"
    for _ in range(3):  # more than once, so a pooled connection is used again
        with pytest.raises(aio.AioRpcError) as refused:
            await stub.Challenge(pb.ChallengeRequest(
                user_id=other, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
                application=pb.APPLICATION_PORTAL))  # another user's factor: after the lock
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    pg = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        assert await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'mfa-service'"
            " AND datname = current_database() AND state LIKE 'idle in transaction%'") == 0
        for _ in range(3):  # calls that commit, on the same pooled connections
            ok = await stub.Challenge(pb.ChallengeRequest(
                user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
                application=pb.APPLICATION_PORTAL))
            assert ok.challenge_id
        # The refused calls created the other user's lock row in their transactions:
        # rolled back, it never appears, not even after later calls committed.
        assert await pg.fetchval(
            "SELECT count(*) FROM user_lockouts WHERE user_id = $1", other) == 0
    finally:
        await pg.close()


async def _check_while_the_session_row_is_held(app: App, stub: Stub, database_url: str,
                                               token: str, change: str) -> bool:
    """CheckSession of ``token`` while another transaction holds the session's row,
    having run ``change`` on it; that one commits once the check's statement waits."""
    pg = await asyncpg.connect(asyncpg_dsn(database_url))
    watcher = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        held = pg.transaction()
        await held.start()
        _, stored = token_hash(Keyring.parse(TEST_KEYRING), token)  # as the row keeps it
        assert await pg.execute(change + " WHERE token_hash = $1", stored) == "UPDATE 1"
        async def check() -> pb.CheckSessionResponse:
            return await stub.CheckSession(pb.CheckSessionRequest(
                session_token=token, application=pb.APPLICATION_PORTAL))

        checking = asyncio.create_task(check())
        await until_waiting(watcher, "UPDATE sessions SET idle_expires_at%")
        await held.commit()
        answer = await asyncio.wait_for(checking, timeout=10)
        return bool(answer.valid)
    finally:
        await pg.close()
        await watcher.close()


@pytest.mark.postgres
@pytest.mark.parametrize(("change", "valid"), [
    # A revocation that commits while the check's slide waits for the row wins: the read
    # before it saw the session live, but it is not.
    ("UPDATE sessions SET revoked_at = now() AT TIME ZONE 'UTC'", False),
    # Another check's slide of the same session does not end it.
    ("UPDATE sessions SET idle_expires_at = idle_expires_at + interval '1 minute'", True),
])
@pytest.mark.parametrize("cached", [False, True], ids=["read-then-slide", "cached"])
async def test_a_check_that_slides_the_idle_deadline_sees_what_committed_meanwhile(
        app: App, stub: Stub, database_url: str, user_id: str, fresh_clock: FixedClock,
        change: str, valid: bool, cached: bool) -> None:
    """On PostgreSQL CheckSession reads the session and, when due, slides its idle
    deadline with a second statement on the same autocommit connection
    (store/hot.py: TOUCH_LIVE_SESSION), not in a transaction of its own; a session in
    the cache is slid by that statement alone. Either way the slide decides."""
    if app.database.engine.dialect.name != "postgresql":
        pytest.skip("SQLite serialises every writing transaction: nothing can wait")
    factor = await enroll_app(stub, user_id, fresh_clock)
    session = await login(stub, factor, fresh_clock)
    if cached:
        await Replica(app, stub).cache_on()
        assert await Replica(app, stub).valid(session.session_token)  # now in the cache
    fresh_clock.advance(5 * 60)  # the idle deadline would move by more than a minute
    assert await _check_while_the_session_row_is_held(
        app, stub, database_url, session.session_token, change) is valid
