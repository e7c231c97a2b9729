"""The outbox: durable messages, claimed for a lease, settled only by their claimant."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.engine import Row

from mfa_service.domain import ChallengeState, Channel, MessageKind
from mfa_service.store.models import challenges, outbox
from mfa_service.store.unit import Unit


class OutboxState(StrEnum):
    """Where a message is: only PENDING ones are (re)tried; the others are settled."""

    PENDING = "pending"
    SENT = "sent"
    EXPIRED = "expired"  # its code expired before it could be sent
    SUPERSEDED = "superseded"  # its challenge closed before it could be sent
    FAILED = "failed"  # the provider refused it for good


PENDING, SENT, EXPIRED, SUPERSEDED, FAILED = (
    OutboxState.PENDING, OutboxState.SENT, OutboxState.EXPIRED, OutboxState.SUPERSEDED,
    OutboxState.FAILED)


@dataclass(frozen=True)
class OutboxMessage:
    """A claimed row, ready to decrypt and send."""

    message_id: str
    kind: MessageKind
    channel: Channel
    destination: str
    payload_ciphertext: bytes | None
    payload_key_id: str | None
    attempts: int
    not_after: datetime
    challenge_id: str | None
    challenge_open: bool
    claim_token: str


class OutboxWrites:
    """Messages queued at COMMIT, with the change that decided to send them
    (``tx.later.outbox``)."""

    def __init__(self, unit: Unit) -> None:
        self._unit = unit

    def add(self, *, message_id: str, now: datetime, kind: str, channel: Channel,
                  destination: str, user_id: str, factor_id: str | None,
                  challenge_id: str | None, payload_ciphertext: bytes, payload_key_id: str,
                  not_after: datetime) -> None:
        """Queue the message before COMMIT (with the change that decided to send it)."""
        self._unit.insert_later(outbox, {
            "id": message_id, "created_at": now, "kind": kind, "channel": channel.value,
            "destination": destination, "user_id": user_id, "factor_id": factor_id,
            "challenge_id": challenge_id, "payload_ciphertext": payload_ciphertext,
            "payload_key_id": payload_key_id, "state": PENDING, "attempts": 0,
            "next_attempt_at": now, "not_after": not_after, "claimed_until": None,
            "claim_token": None, "sent_at": None, "last_error": None})


class OutboxRepository:
    def __init__(self, unit: Unit) -> None:
        self._unit = unit

    async def claim_due(self, now: datetime, lease: timedelta, limit: int,
                        token: str | None = None) -> list[OutboxMessage]:
        """Claim up to ``limit`` due messages for ``lease``, under ``token`` (the caller's,
        so that it can find its claim again if the COMMIT's answer is lost: ``reclaim``).

        PostgreSQL: ``FOR UPDATE SKIP LOCKED`` lets several dispatchers claim disjoint rows
        without waiting on each other. SQLite: the writing transaction (BEGIN IMMEDIATE)
        already excludes every other claimant. A claim whose lease ran out (its process
        died mid-send) is due again.
        """
        due = (select(outbox.c.id).where(
            outbox.c.state == PENDING, outbox.c.next_attempt_at <= now,
            or_(outbox.c.claimed_until.is_(None), outbox.c.claimed_until <= now))
            .order_by(outbox.c.next_attempt_at).limit(limit)
            .with_for_update(skip_locked=True))
        ids = list((await self._unit.execute(due)).scalars())
        if not ids:
            return []
        token = token or str(uuid.uuid4())
        await self._unit.execute(
            update(outbox).where(outbox.c.id.in_(ids))
            .values(claimed_until=now + lease, claim_token=token,
                    attempts=outbox.c.attempts + 1))
        return await self._claimed(outbox.c.id.in_(ids), token)

    async def reclaim(self, token: str, now: datetime, lease: timedelta) -> list[OutboxMessage]:
        """The PENDING messages still claimed under ``token``, their lease renewed: a claim
        whose COMMIT may have landed although its answer was lost (the primary died
        between the two). Without this they would wait out the whole lease."""
        claimed = and_(outbox.c.claim_token == token, outbox.c.state == PENDING,
                       outbox.c.claimed_until > now)
        await self._unit.execute(update(outbox).where(claimed).values(
            claimed_until=now + lease))
        return await self._claimed(and_(outbox.c.claim_token == token,
                                        outbox.c.state == PENDING), token)

    async def _claimed(self, condition: Any, token: str) -> list[OutboxMessage]:
        rows = await self._unit.execute(
            select(outbox, challenges.c.state.label("challenge_state"))
            .select_from(outbox.outerjoin(challenges, challenges.c.id == outbox.c.challenge_id))
            .where(condition))
        return [_message(r, token) for r in rows]

    async def settle(self, message_id: str, claim_token: str, state: OutboxState,
                     now: datetime,
                     error: str | None = None) -> bool:
        """Finish a claimed message (sent or dropped) and wipe its body."""
        values: dict[str, Any] = {"state": state.value, "claimed_until": None, "claim_token": None,
                                  "payload_ciphertext": None, "last_error": error}
        if state == SENT:
            values["sent_at"] = now
        return await self._unit.write(
            update(outbox).where(outbox.c.id == message_id, outbox.c.claim_token == claim_token,
                                 outbox.c.state == PENDING)
            .values(**values)) == 1

    async def mark_sent(self, message_id: str, sent_at: datetime) -> bool:
        """A provider accepted the message: SENT, whoever holds the claim now.

        The one settle that does not need the claim: the message is out, so the row must
        stop being due. The claim may be gone by the time this succeeds (the database
        was away for longer than the lease and the row was claimed again): another
        claimant's later settle or retry then matches nothing, and the row is not sent a
        third time. False: it was no longer PENDING (already settled, e.g. a COMMIT that
        succeeded although its answer was lost).
        """
        return await self._unit.write(
            update(outbox).where(outbox.c.id == message_id, outbox.c.state == PENDING)
            .values(state=SENT.value, sent_at=sent_at, claimed_until=None, claim_token=None,
                    payload_ciphertext=None, last_error=None)) == 1

    async def retry_later(self, message_id: str, claim_token: str, when: datetime,
                          error: str) -> bool:
        return await self._unit.write(
            update(outbox).where(outbox.c.id == message_id, outbox.c.claim_token == claim_token,
                                 outbox.c.state == PENDING)
            .values(next_attempt_at=when, claimed_until=None, claim_token=None,
                    last_error=error[:200])) == 1

    async def backlog(self) -> tuple[int, datetime | None]:
        """How many messages are pending and when the oldest was queued (metrics; one
        aggregate over the ``ix_outbox_due`` index)."""
        row = (await self._unit.execute(
            select(func.count(), func.min(outbox.c.created_at)).where(
                outbox.c.state == PENDING))).one()
        count, oldest = row[0], row[1]
        return int(count or 0), oldest

    async def pending_for(self, user_id: str) -> int:
        value = (await self._unit.execute(select(func.count()).select_from(outbox).where(
            and_(outbox.c.user_id == user_id, outbox.c.state == PENDING)))).scalar()
        return int(value or 0)


def _message(row: Row[Any], token: str) -> OutboxMessage:
    return OutboxMessage(
        message_id=row.id, kind=MessageKind(row.kind), channel=Channel(row.channel),
        destination=row.destination, payload_ciphertext=row.payload_ciphertext,
        payload_key_id=row.payload_key_id, attempts=row.attempts, not_after=row.not_after,
        challenge_id=row.challenge_id,
        challenge_open=row.challenge_id is None or row.challenge_state == ChallengeState.OPEN.value,
        claim_token=token)
