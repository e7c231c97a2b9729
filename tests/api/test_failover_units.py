"""The pieces of a failover that need no second database: a sent message whose settle
fails is never sent again by this process, and multi-host database URLs are checked at
start-up (the real primary-and-standby run is tests/system/test_failover.py).

The database "blinks" here by making the settle statement fail (StoreUnavailable, what
a dead primary gives) while everything else still works: the harshest case for the
dispatcher, which then even claims the row again once the lease has run out.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.delivery.dispatcher import Dispatcher
from mfa_service.delivery.messages import OutgoingMessage
from mfa_service.delivery.outbox import enqueue
from mfa_service.domain import Channel, MessageKind, Outgoing
from mfa_service.errors import StoreUnavailable
from mfa_service.store.database import Database
from mfa_service.store.engine import create_engine
from mfa_service.store.models import outbox
from mfa_service.store.outbox import OutboxRepository
from tests.support.config import T0, TEST_KEYRING

KEYRING = Keyring.parse(TEST_KEYRING)


class RecordingSender:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, message: OutgoingMessage) -> None:
        self.sent.append(message.message_id)

    async def aclose(self) -> None:
        return None


class Blink:
    """Makes ``OutboxRepository.mark_sent`` fail while ``down`` (a dead primary)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.down = False
        self.failed = 0
        real = OutboxRepository.mark_sent

        async def mark_sent(repo: OutboxRepository, message_id: str,
                            sent_at: datetime) -> bool:
            if self.down:
                self.failed += 1
                raise StoreUnavailable()
            return await real(repo, message_id, sent_at)

        monkeypatch.setattr(OutboxRepository, "mark_sent", mark_sent)


@pytest.fixture
async def database(sqlite_url: str) -> AsyncIterator[Database]:
    db = Database(create_engine(make_url(sqlite_url)))
    try:
        yield db
    finally:
        await db.dispose()


async def _queue(db: Database, clock: FixedClock) -> str:
    user = f"user-{uuid.uuid4().hex[:10]}"
    async with db.transaction() as tx:
        return enqueue(tx, KEYRING, Outgoing(
            kind=MessageKind.NOTICE, channel=Channel.EMAIL, destination=f"{user}@example.com",
            user_id=user, subject="notice", text="something changed",
            not_after=clock.now() + timedelta(hours=1)), clock.now())


async def _row(db: Database, message_id: str) -> tuple[str, int, bool]:
    async with db.transaction(readonly=True) as tx:
        row = (await tx.execute(select(outbox).where(outbox.c.id == message_id))).one()
    return row.state, row.attempts, row.payload_ciphertext is None


def _dispatcher(db: Database, clock: FixedClock, sender: RecordingSender,
                lease: float) -> Dispatcher:
    # Every channel: the SQLite file is shared with other tests' messages.
    return Dispatcher(db, KEYRING, clock, dict.fromkeys(Channel, sender),
                      lease=timedelta(seconds=lease), batch=100)


async def _drain(dispatcher: Dispatcher) -> None:
    while await dispatcher.run_once():
        pass


async def test_a_settle_that_fails_is_retried_until_the_database_answers(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FixedClock(T0 + timedelta(days=400))
    sender, blink = RecordingSender(), Blink(monkeypatch)
    dispatcher = _dispatcher(database, clock, sender, lease=30)
    await _drain(dispatcher)  # other tests' rows in the shared file
    message_id = await _queue(database, clock)
    sender.sent.clear()

    blink.down = True
    pass_ = asyncio.create_task(dispatcher.run_once())
    loop = asyncio.get_running_loop()
    start = loop.time()
    while blink.failed < 3:  # sent, and the settle failing with backoff
        assert loop.time() - start < 5
        await asyncio.sleep(0.01)
    assert sender.sent == [message_id] and dispatcher.unsettled == {message_id}
    assert not pass_.done()  # still retrying, within the lease
    blink.down = False
    await asyncio.wait_for(pass_, timeout=5)  # the next attempt lands

    assert await _row(database, message_id) == ("sent", 1, True)
    assert dispatcher.unsettled == frozenset()
    clock.advance(3600)
    await _drain(dispatcher)
    assert sender.sent == [message_id]


async def test_past_the_lease_the_same_process_claims_it_again_but_never_resends(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FixedClock(T0 + timedelta(days=401))
    sender, blink = RecordingSender(), Blink(monkeypatch)
    dispatcher = _dispatcher(database, clock, sender, lease=0.3)
    await _drain(dispatcher)
    message_id = await _queue(database, clock)
    sender.sent.clear()

    blink.down = True
    await asyncio.wait_for(dispatcher.run_once(), timeout=5)  # gives up at the lease's end
    assert sender.sent == [message_id] and dispatcher.unsettled == {message_id}
    assert (await _row(database, message_id))[0] == "pending"

    clock.advance(10)  # the lease has run out: the row is due again
    # The retried settle fails again, the row is claimed again: not sent, settled.
    assert await asyncio.wait_for(dispatcher.run_once(), timeout=5) == 1
    assert sender.sent == [message_id]
    assert (await _row(database, message_id))[:2] == ("pending", 2)

    blink.down = False
    assert await dispatcher.run_once() == 0  # the retried settle, first
    assert await _row(database, message_id) == ("sent", 2, True)
    assert dispatcher.unsettled == frozenset() and sender.sent == [message_id]


async def test_a_late_settle_wins_over_a_claim_that_another_process_took(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our lease ran out while the database was away, another dispatcher claimed the row
    and its provider failed: our settle still marks it SENT, so nobody sends it again."""
    clock = FixedClock(T0 + timedelta(days=402))
    ours, theirs, blink = RecordingSender(), RecordingSender(), Blink(monkeypatch)
    first = _dispatcher(database, clock, ours, lease=0.3)
    await _drain(first)
    message_id = await _queue(database, clock)
    ours.sent.clear()
    blink.down = True
    await asyncio.wait_for(first.run_once(), timeout=5)
    clock.advance(10)
    async with database.transaction() as tx:  # the other process's claim
        [claimed] = await tx.outbox.claim_due(clock.now(), timedelta(seconds=60), 10)
    assert claimed.message_id == message_id
    blink.down = False
    await first.run_once()
    assert await _row(database, message_id) == ("sent", 2, True)
    async with database.transaction() as tx:  # the other one's retry matches nothing
        assert not await tx.outbox.retry_later(message_id, claimed.claim_token,
                                               clock.now(), "provider down")
        assert await tx.outbox.claim_due(clock.now() + timedelta(hours=1),
                                         timedelta(seconds=60), 10) == []
    assert ours.sent == [message_id] and theirs.sent == []


# -- multi-host database URLs --------------------------------------------------------------


# -- no primary among the hosts ------------------------------------------------------------


async def test_a_claim_whose_commit_answer_was_lost_is_sent_without_waiting_the_lease(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The primary dies between a claim's COMMIT and its answer: the rows are claimed (for
    the lease), but the dispatcher heard StoreUnavailable. It remembers the claim token
    and finds those rows again on its next pass, instead of leaving them for the lease."""
    clock = FixedClock(T0 + timedelta(days=500))
    sender = RecordingSender()
    dispatcher = _dispatcher(database, clock, sender, lease=90)
    await _drain(dispatcher)  # other tests' rows in the shared file
    message_id = await _queue(database, clock)
    sender.sent.clear()
    real = OutboxRepository.claim_due
    lost = {"once": True}

    async def claim_then_lose_the_answer(repo: OutboxRepository, *args: object) -> object:
        claimed = await real(repo, *args)  # type: ignore[arg-type]
        if lost.pop("once", False):
            await repo._unit._conn.commit()  # the COMMIT lands...
            raise StoreUnavailable()  # ...and its answer is lost
        return claimed

    monkeypatch.setattr(OutboxRepository, "claim_due", claim_then_lose_the_answer)
    with pytest.raises(StoreUnavailable):
        await dispatcher.run_once()
    assert await _row(database, message_id) == ("pending", 1, False)  # claimed for 90 s
    await dispatcher.run_once()  # the same clock: the lease has not run out
    assert sender.sent == [message_id]
    assert await _row(database, message_id) == ("sent", 1, True)
