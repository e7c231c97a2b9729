"""Retention: ended rows go after their keep period; live and pending ones never do (a
PENDING factor long past its TTL is disabled, not deleted)."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from mfa.v1 import two_factor_service_pb2 as pb
from sqlalchemy import func, select

from mfa_service.app import App
from mfa_service.clock import FixedClock
from mfa_service.store.models import (
    audit_events,
    challenges,
    factors,
    outbox,
    sessions,
    user_lockouts,
)
from mfa_service.store.retention import Retention, purge
from tests.support.client import enroll_app, login

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub


async def _count(app: App, table: object, column: object, value: str) -> int:
    async with app.database.engine.connect() as conn:
        return int(await conn.scalar(
            select(func.count()).select_from(table).where(column == value)) or 0)  # type: ignore[arg-type]


async def test_purge_keeps_what_is_live_and_deletes_what_ended(
        stub: Stub, app: App, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    revoked = await login(stub, factor, fresh_clock)
    await stub.RevokeSession(pb.RevokeSessionRequest(session_token=revoked.session_token))
    await login(stub, factor, fresh_clock)  # this one just expires
    step_up = await login(stub, factor, fresh_clock)
    await stub.Enroll(pb.EnrollRequest(user_id=user_id, method=pb.METHOD_EMAIL,
                                       email=f"{user_id}@example.com",
                                       application=pb.APPLICATION_PORTAL,
                                       session_token=step_up.session_token))
    t0 = fresh_clock.now()
    assert await _count(app, sessions, sessions.c.user_id, user_id) == 3
    assert await _count(app, outbox, outbox.c.user_id, user_id) >= 1  # pending (no dispatcher)

    async def purge_at(when: timedelta) -> None:
        async with app.database.transaction() as tx:
            # In batches until nothing is left, as the maintenance loop does: the shared
            # database holds other tests' rows too (more than one batch of them).
            while any((await purge(tx, t0 + when, Retention())).values()):
                pass

    await purge_at(timedelta(days=1, minutes=10))
    # The revoked session is gone; the other two ended (idle) less than a day ago: kept.
    assert await _count(app, sessions, sessions.c.user_id, user_id) == 2
    assert await _count(app, challenges, challenges.c.user_id, user_id) == 0
    # The email enrolment never confirmed is long gone: DISABLED, kept for the record.
    async with app.database.engine.connect() as conn:
        statuses = sorted((await conn.execute(select(factors.c.method, factors.c.status).where(
            factors.c.user_id == user_id))).all())
    assert statuses == [("authenticator_app", "active"), ("email", "disabled"),
                        ("recovery_code", "active")]
    pending = await _count(app, outbox, outbox.c.user_id, user_id)
    assert pending >= 1  # never sent: never deleted

    await purge_at(timedelta(days=3))
    assert await _count(app, sessions, sessions.c.user_id, user_id) == 0
    assert await _count(app, outbox, outbox.c.user_id, user_id) == pending

    while await app.dispatcher.run_once():  # send it (console sender in this server)
        pass
    await purge_at(timedelta(days=3))
    assert await _count(app, outbox, outbox.c.user_id, user_id) == pending  # sent < 7 days
    await purge_at(timedelta(days=8))
    assert await _count(app, outbox, outbox.c.user_id, user_id) == 0
    # Factors and the audit trail are kept for good.
    assert await _count(app, factors, factors.c.user_id, user_id) == 3
    assert await _count(app, audit_events, audit_events.c.user_id, user_id) > 10


async def test_purge_keeps_the_users_lockout_counters(
        stub: Stub, app: App, user_id: str, fresh_clock: FixedClock) -> None:
    """A user's lockout counter outlives every purge, with its lock_version: the version
    only grows, or Verify's one-statement lock and read could take a stale read for a
    current one (store/hot.py)."""
    factor = await enroll_app(stub, user_id, fresh_clock)
    await login(stub, factor, fresh_clock)

    async def version() -> int | None:
        async with app.database.engine.connect() as conn:
            return await conn.scalar(select(user_lockouts.c.lock_version).where(
                user_lockouts.c.user_id == user_id))

    before = await version()
    assert before is not None
    async with app.database.transaction() as tx:
        while any((await purge(tx, fresh_clock.now() + timedelta(days=30), Retention()))
                  .values()):
            pass
    assert await version() == before
    await login(stub, factor, fresh_clock)
    after = await version()
    assert after is not None and after > before
