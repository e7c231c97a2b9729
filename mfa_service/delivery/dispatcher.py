"""The dispatcher: sends what the outbox holds, retries with backoff, loses nothing.

Each process runs one. It wakes when this process enqueued a message (``wake``) and
otherwise polls, so messages written by other processes, retries that became due and
messages left by a crash are picked up too. A message is claimed for a lease in a short
transaction, sent outside any transaction (a slow provider holds no connection), then
settled only if the claim still holds. Providers get the message id as idempotency key,
so a crash between "provider accepted" and "row settled" does not become a second SMS
at providers that honour it.

The database may blink between "provider accepted" and "row settled" (a failover: the
primary is gone, the standby not yet promoted). Then the settle is retried with a bounded
backoff until the database answers, for as long as the lease keeps other processes off
the row, and the message id stays in an in-memory record of sent-but-unsettled messages:
those settles are retried first at every pass, and the record is consulted before every
send, so this process never hands the message to a provider again, even if it claims
the row again. Only if the process itself dies before the settle lands, or the database
stays away for longer than the lease, can another process send it a second time: the
idempotency key is what then stops the providers that honour one (docs/FAILOVER.md).

Telemetry (when on): each claimed message is processed in a span of its own
(``outbox send``, with its channel and kind, never the destination) whose children are
the provider's HTTP request and the settling statements; every outcome is counted by
channel, kind and outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from mfa_service import deadline
from mfa_service.clock import Clock
from mfa_service.crypto import DecryptionError, Keyring
from mfa_service.delivery.messages import DeliveryError, OutgoingMessage
from mfa_service.delivery.outbox import decode_payload
from mfa_service.delivery.senders import Sender
from mfa_service.domain import Channel, DeliveryOutcome, MessageKind
from mfa_service.errors import DeadlineExceeded, StoreError
from mfa_service.store.database import Database
from mfa_service.store.outbox import (
    EXPIRED,
    FAILED,
    SUPERSEDED,
    OutboxMessage,
    OutboxState,
)
from mfa_service.telemetry import Metrics

log = logging.getLogger("mfa_service.delivery")

# Settling a sent message while the database does not answer: first retry after 50 ms,
# doubling to 2 s. Quick enough to land within a second of a promotion, and a handful of
# attempts a second at most while the database is gone.
SETTLE_RETRY_FIRST_SECONDS = 0.05
SETTLE_RETRY_MAX_SECONDS = 2.0


@dataclass
class _Sent:
    """A message a provider accepted whose row is not yet settled (this process only)."""

    sent_at: datetime  # when the provider accepted it (the row's sent_at)
    lease_end: float  # loop time until which no other process may claim the row


class Dispatcher:
    def __init__(self, db: Database, keyring: Keyring, clock: Clock,
                 senders: Mapping[Channel, Sender], *, lease: timedelta = timedelta(minutes=1),
                 batch: int = 20, backoff_base: float = 1.0, backoff_max: float = 300.0,
                 poll_seconds: float = 1.0, tracer: Tracer | None = None,
                 metrics: Metrics | None = None) -> None:
        self._db = db
        self._keyring = keyring
        self._clock = clock
        self._senders = senders
        self._lease = lease
        self._batch = batch
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._poll = poll_seconds
        self._tracer = tracer
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._stopping = False
        # message id -> sent, not yet settled. Consulted before every send; entries leave
        # once the row is settled (or found settled). It only grows while the database is
        # away, and then nothing new is claimed: at most the batches in hand at the time.
        self._unsettled: dict[str, _Sent] = {}
        # Messages being processed now: a claim that came round again (its lease ran out
        # mid-send) is left to the task that already has it.
        self._in_hand: set[str] = set()
        # Claim tokens whose COMMIT's answer was lost (reclaimed on the next pass).
        self._doubtful: set[str] = set()

    @property
    def unsettled(self) -> frozenset[str]:
        """Ids of messages sent by this process whose row is not settled yet."""
        return frozenset(self._unsettled)

    def stop(self) -> None:
        """Finish the current pass, then return from ``run`` (claimed rows are settled)."""
        self._stopping = True
        self._wake.set()

    def wake(self) -> None:
        """Ask for an immediate pass (called after a transaction that enqueued committed)."""
        self._wake.set()

    async def run(self) -> None:
        """Loop until ``stop`` (or cancellation)."""
        while not self._stopping:
            self._wake.clear()
            try:
                while await self.run_once() == self._batch and not self._stopping:
                    pass  # a full batch: there may be more due right now
            except StoreError:
                log.warning("outbox pass failed: database unavailable")
            except Exception:
                log.exception("outbox pass failed")
            if self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll)

    async def run_once(self) -> int:
        """Claim and process one batch of due messages; returns how many were claimed.

        Settles of messages already sent are retried first."""
        await self._settle_unsettled()
        now = self._clock.now()
        lease_end = asyncio.get_running_loop().time() + self._lease.total_seconds()
        claimed = await self._reclaim_doubtful(now)
        token = str(uuid.uuid4())
        try:
            async with self._db.transaction() as tx:
                claimed += await tx.outbox.claim_due(now, self._lease, self._batch, token)
        except (StoreError, DeadlineExceeded):
            # The COMMIT may have landed with its answer lost (the primary died between):
            # then the rows are ours for the lease, and nobody else may send them.
            self._doubtful.add(token)
            raise
        fresh = [m for m in claimed if m.message_id not in self._in_hand]
        if fresh:
            await asyncio.gather(*(self._traced(m, lease_end) for m in fresh))
        return len(claimed)

    async def _reclaim_doubtful(self, now: datetime) -> list[OutboxMessage]:
        """Messages of claims whose outcome was unknown, found again by their token."""
        found: list[OutboxMessage] = []
        for token in list(self._doubtful):
            async with self._db.transaction() as tx:
                found += await tx.outbox.reclaim(token, now, self._lease)
            self._doubtful.discard(token)
        return found

    async def _settle_unsettled(self) -> None:
        """One attempt per message sent but not settled; a database still away ends the
        round (the claim that follows will say so)."""
        for message_id, sent in list(self._unsettled.items()):
            if message_id in self._in_hand:
                continue  # its own task is retrying it
            try:
                await self._mark_sent(message_id, sent)
            except (StoreError, DeadlineExceeded):
                log.warning("settling sent messages still fails: database unavailable",
                            extra={"unsettled": len(self._unsettled)})
                return

    async def _traced(self, m: OutboxMessage, lease_end: float) -> None:
        self._in_hand.add(m.message_id)
        try:
            if self._tracer is None:
                await self._process(m, lease_end)
                return
            with self._tracer.start_as_current_span("outbox send", kind=SpanKind.PRODUCER,
                                                    attributes={
                                                        "mfa.channel": m.channel.value,
                                                        "mfa.message.kind": m.kind,
                                                        "mfa.attempt": m.attempts}):
                await self._process(m, lease_end)
        finally:
            self._in_hand.discard(m.message_id)

    def _outcome(self, m: OutboxMessage, outcome: DeliveryOutcome) -> None:
        if self._metrics is not None:
            self._metrics.delivery(m.channel.value, m.kind.value, outcome.value)
        if self._tracer is not None:
            span = trace.get_current_span()
            span.set_attribute("mfa.outcome", outcome)
            if outcome not in (DeliveryOutcome.SENT, DeliveryOutcome.SUPERSEDED,
                               DeliveryOutcome.EXPIRED):
                span.set_status(Status(StatusCode.ERROR, outcome))

    async def _process(self, m: OutboxMessage, lease_end: float) -> None:
        sent = self._unsettled.get(m.message_id)
        if sent is not None:
            # This process sent it already (counted then); only its settle was lost. Never
            # again to the provider, and SENT even if its code has expired since.
            sent.lease_end = lease_end
            await self._settle_sent(m.message_id, sent)
            return
        now = self._clock.now()
        if now >= m.not_after:
            self._outcome(m, DeliveryOutcome.EXPIRED)
            await self._settle(m, EXPIRED, "expired before it could be sent")
            return
        if m.kind is MessageKind.CODE and not m.challenge_open:
            self._outcome(m, DeliveryOutcome.SUPERSEDED)
            await self._settle(m, SUPERSEDED, "challenge closed before sending")
            return
        try:
            if m.payload_ciphertext is None or m.payload_key_id is None:
                raise DecryptionError("no payload")
            subject, text = decode_payload(self._keyring, m.message_id, m.payload_key_id,
                                           m.payload_ciphertext)
        except (DecryptionError, ValueError, KeyError):
            log.error("outbox message cannot be decrypted", extra={"message_id": m.message_id})
            self._outcome(m, DeliveryOutcome.FAILED)
            await self._settle(m, FAILED, "payload cannot be decrypted")
            return
        sender = self._senders[m.channel]
        try:
            await sender.send(OutgoingMessage(message_id=m.message_id, channel=m.channel,
                                              to=m.destination, subject=subject, text=text))
        except DeliveryError as exc:
            if exc.retryable:
                await self._retry(m, str(exc), exc.retry_after_seconds)
            else:
                self._outcome(m, DeliveryOutcome.FAILED)
                log.warning("message refused by provider", extra={
                    "message_id": m.message_id, "channel": m.channel.value, "error": str(exc)})
                await self._settle(m, FAILED, str(exc))
            return
        except Exception as exc:  # a sender bug must not lose the message
            log.exception("sender failed unexpectedly", extra={"message_id": m.message_id})
            await self._retry(m, f"internal: {type(exc).__name__}", None)
            return
        # Recorded before anything can fail: from here on this process never sends it again.
        sent = self._unsettled[m.message_id] = _Sent(self._clock.now(), lease_end)
        self._outcome(m, DeliveryOutcome.SENT)
        log.info("message sent", extra={"message_id": m.message_id, "channel": m.channel.value,
                                        "attempt": m.attempts})
        await self._settle_sent(m.message_id, sent)

    async def _settle_sent(self, message_id: str, sent: _Sent) -> None:
        """Settle a sent message, retrying (bounded backoff) while the database does not
        answer, until its lease ends. Past that the record stays: the next passes retry
        it first, and this process still never sends it again."""
        loop = asyncio.get_running_loop()
        delay = SETTLE_RETRY_FIRST_SECONDS
        failures = 0
        while True:
            # Each attempt ends with the lease too (a connect or statement that hangs on
            # a dead host must not outlast it); a COMMIT is never cut short.
            reset = deadline.deadline_var.set(sent.lease_end)
            try:
                await self._mark_sent(message_id, sent)
            except (StoreError, DeadlineExceeded):
                failures += 1
                wait = delay * random.uniform(0.9, 1.1)  # noqa: S311 - jitter, not a secret
                if loop.time() + wait >= sent.lease_end:
                    log.warning("message sent but not settled within its lease; retried at "
                                "every pass, never sent again by this process",
                                extra={"message_id": message_id, "attempts": failures})
                    return
                if failures == 1:
                    log.warning("message sent, settling it failed: database unavailable; "
                                "retrying", extra={"message_id": message_id})
                await asyncio.sleep(wait)
                delay = min(SETTLE_RETRY_MAX_SECONDS, delay * 2)
                continue
            finally:
                deadline.deadline_var.reset(reset)
            if failures:
                log.info("sent message settled after the database came back", extra={
                    "message_id": message_id, "attempts": failures + 1})
            return

    async def _mark_sent(self, message_id: str, sent: _Sent) -> None:
        async with self._db.transaction() as tx:
            settled = await tx.outbox.mark_sent(message_id, sent.sent_at)
        # Settled by us, or already settled (a COMMIT whose answer was lost): either way
        # the row is no longer due.
        self._unsettled.pop(message_id, None)
        if not settled:
            log.info("sent message was already settled", extra={"message_id": message_id})

    def backoff(self, attempts: int, hint: float | None = None) -> float:
        """Exponential backoff with +-10 % jitter (so retries from many rows spread out)."""
        delay = min(self._backoff_max, self._backoff_base * 2.0 ** max(0, attempts - 1))
        if hint is not None:
            delay = min(self._backoff_max, max(delay, hint))
        jitter: float = random.uniform(0.9, 1.1)  # noqa: S311 - jitter, not a secret
        return delay * jitter

    async def _retry(self, m: OutboxMessage, error: str, hint: float | None) -> None:
        when = self._clock.now() + timedelta(seconds=self.backoff(m.attempts, hint))
        if when >= m.not_after:
            self._outcome(m, DeliveryOutcome.EXPIRED if m.kind is MessageKind.CODE
                          else DeliveryOutcome.FAILED)
            await self._settle(m, EXPIRED if m.kind is MessageKind.CODE else FAILED,
                               f"gave up: {error}")
            return
        self._outcome(m, DeliveryOutcome.RETRY)
        log.warning("delivery failed, will retry", extra={
            "message_id": m.message_id, "channel": m.channel.value, "attempt": m.attempts,
            "retry_at": when.isoformat(), "error": error})
        async with self._db.transaction() as tx:
            await tx.outbox.retry_later(m.message_id, m.claim_token, when, error)

    async def _settle(self, m: OutboxMessage, state: OutboxState, error: str | None) -> None:
        async with self._db.transaction() as tx:
            settled = await tx.outbox.settle(m.message_id, m.claim_token, state,
                                             self._clock.now(), error)
        if not settled:
            log.warning("outbox claim lost before settling", extra={"message_id": m.message_id})

