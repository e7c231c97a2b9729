"""The dispatcher: sends what the outbox holds, retries with backoff, loses nothing.

Each process runs one. It wakes when this process enqueued a message (``wake``) and
otherwise polls, so messages written by other processes, retries that became due and
messages left by a crash are picked up too. A message is claimed for a lease in a short
transaction, sent outside any transaction (a slow provider holds no connection), then
settled only if the claim still holds. Providers get the message id as idempotency key,
so a crash between "provider accepted" and "row settled" does not become a second SMS
at providers that honour it.

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
from collections.abc import Mapping
from datetime import timedelta

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from mfa_service.clock import Clock
from mfa_service.crypto import DecryptionError, Keyring
from mfa_service.delivery.messages import DeliveryError, OutgoingMessage
from mfa_service.delivery.outbox import decode_payload
from mfa_service.delivery.senders import Sender
from mfa_service.domain import Channel
from mfa_service.errors import StoreError
from mfa_service.store.database import Database
from mfa_service.store.outbox import (
    EXPIRED,
    FAILED,
    SENT,
    SUPERSEDED,
    OutboxMessage,
    OutboxState,
)
from mfa_service.telemetry import Metrics

log = logging.getLogger("mfa_service.delivery")


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
        """Claim and process one batch of due messages; returns how many were claimed."""
        now = self._clock.now()
        async with self._db.transaction() as tx:
            claimed = await tx.outbox.claim_due(now, self._lease, self._batch)
        if claimed:
            await asyncio.gather(*(self._traced(m) for m in claimed))
        return len(claimed)

    async def _traced(self, m: OutboxMessage) -> None:
        if self._tracer is None:
            await self._process(m)
            return
        with self._tracer.start_as_current_span("outbox send", kind=SpanKind.PRODUCER,
                                                attributes={
                                                    "mfa.channel": m.channel.value,
                                                    "mfa.message.kind": m.kind,
                                                    "mfa.attempt": m.attempts}):
            await self._process(m)

    def _outcome(self, m: OutboxMessage, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.delivery(m.channel.value, m.kind, outcome)
        if self._tracer is not None:
            span = trace.get_current_span()
            span.set_attribute("mfa.outcome", outcome)
            if outcome not in ("sent", "superseded", "expired"):
                span.set_status(Status(StatusCode.ERROR, outcome))

    async def _process(self, m: OutboxMessage) -> None:
        now = self._clock.now()
        if now >= m.not_after:
            self._outcome(m, "expired")
            await self._settle(m, EXPIRED, "expired before it could be sent")
            return
        if m.kind == "code" and not m.challenge_open:
            self._outcome(m, "superseded")
            await self._settle(m, SUPERSEDED, "challenge closed before sending")
            return
        try:
            if m.payload_ciphertext is None or m.payload_key_id is None:
                raise DecryptionError("no payload")
            subject, text = decode_payload(self._keyring, m.message_id, m.payload_key_id,
                                           m.payload_ciphertext)
        except (DecryptionError, ValueError, KeyError):
            log.error("outbox message cannot be decrypted", extra={"message_id": m.message_id})
            self._outcome(m, "failed")
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
                self._outcome(m, "failed")
                log.warning("message refused by provider", extra={
                    "message_id": m.message_id, "channel": m.channel.value, "error": str(exc)})
                await self._settle(m, FAILED, str(exc))
            return
        except Exception as exc:  # a sender bug must not lose the message
            log.exception("sender failed unexpectedly", extra={"message_id": m.message_id})
            await self._retry(m, f"internal: {type(exc).__name__}", None)
            return
        self._outcome(m, "sent")
        await self._settle(m, SENT, None)
        log.info("message sent", extra={"message_id": m.message_id, "channel": m.channel.value,
                                        "attempt": m.attempts})

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
            self._outcome(m, "expired" if m.kind == "code" else "failed")
            await self._settle(m, EXPIRED if m.kind == "code" else FAILED,
                               f"gave up: {error}")
            return
        self._outcome(m, "retry")
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

