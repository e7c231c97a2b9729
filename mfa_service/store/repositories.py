"""Narrow repositories, one per aggregate, all sharing the caller's transaction.

Single use and limits are enforced by the statements themselves (conditional UPDATEs
whose row count is the answer), never by a read followed by a write in Python.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, case, func, insert, or_, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mfa_service.domain import (
    Application,
    AuditEvent,
    Challenge,
    ChallengeState,
    Channel,
    Factor,
    FactorRecord,
    FactorStatus,
    Method,
    Purpose,
    Session,
)
from mfa_service.store.engine import lock_key
from mfa_service.store.models import audit_events, challenges, factors, sessions


def _factor(row: Row[Any]) -> FactorRecord:
    return FactorRecord(
        factor=Factor(
            factor_id=row.id, user_id=row.user_id, method=Method(row.method),
            status=FactorStatus(row.status), masked_destination=row.masked_destination,
            created_at=row.created_at, confirmed_at=row.confirmed_at,
            last_used_at=row.last_used_at, disabled_at=row.disabled_at),
        label=row.label, destination=row.destination, secret_ciphertext=row.secret_ciphertext,
        secret_key_id=row.secret_key_id, last_totp_step=row.last_totp_step, locale=row.locale,
        replaces_factor_id=row.replaces_factor_id)


class FactorRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(self, record: FactorRecord) -> None:
        f = record.factor
        await self._conn.execute(insert(factors).values(
            id=f.factor_id, user_id=f.user_id, method=f.method.value, status=f.status.value,
            label=record.label, masked_destination=f.masked_destination,
            destination=record.destination, secret_ciphertext=record.secret_ciphertext,
            secret_key_id=record.secret_key_id, last_totp_step=record.last_totp_step,
            created_at=f.created_at, locale=record.locale,
            replaces_factor_id=record.replaces_factor_id))

    async def get(self, factor_id: str) -> FactorRecord | None:
        """The factor (a plain read: writers serialise on the per-user lock first)."""
        row = (await self._conn.execute(select(factors).where(factors.c.id == factor_id))).first()
        return _factor(row) if row else None

    async def list_for_user(self, user_id: str) -> list[FactorRecord]:
        # Oldest first; the recovery-code factor last (it is not one the user "added").
        rows = await self._conn.execute(
            select(factors).where(factors.c.user_id == user_id)
            .order_by(factors.c.method == Method.RECOVERY_CODE.value, factors.c.created_at,
                      factors.c.id))
        return [_factor(r) for r in rows]

    async def count_for_user(self, user_id: str, statuses: Sequence[FactorStatus]) -> int:
        value = await self._conn.scalar(
            select(func.count()).select_from(factors).where(
                factors.c.user_id == user_id, factors.c.status.in_([s.value for s in statuses])))
        return int(value or 0)

    async def has_active(self, user_id: str) -> bool:
        """Whether the user has any ACTIVE factor (then adding one needs a step-up)."""
        row = (await self._conn.execute(select(factors.c.id).where(
            factors.c.user_id == user_id,
            factors.c.status == FactorStatus.ACTIVE.value).limit(1))).first()
        return row is not None

    async def active_reachable(self, user_id: str) -> list[FactorRecord]:
        """The user's ACTIVE factors that can receive a message (email and phone)."""
        rows = await self._conn.execute(select(factors).where(
            factors.c.user_id == user_id, factors.c.status == FactorStatus.ACTIVE.value,
            factors.c.method.in_([Method.EMAIL.value, Method.PHONE.value]))
            .order_by(factors.c.created_at, factors.c.id))
        return [_factor(r) for r in rows]

    async def active_of_method(self, user_id: str, method: Method) -> FactorRecord | None:
        row = (await self._conn.execute(select(factors).where(
            factors.c.user_id == user_id, factors.c.method == method.value,
            factors.c.status == FactorStatus.ACTIVE.value))).first()
        return _factor(row) if row else None

    async def supersede_pending(self, user_id: str, method: Method, now: datetime) -> int:
        """Disable the user's unconfirmed factors of ``method``: a newer enrolment replaces them."""
        result = await self._conn.execute(
            update(factors).where(
                factors.c.user_id == user_id, factors.c.method == method.value,
                factors.c.status == FactorStatus.PENDING.value)
            .values(status=FactorStatus.DISABLED.value, disabled_at=now,
                    secret_ciphertext=None, secret_key_id=None))
        return result.rowcount

    async def supersede_other_pending(self, user_id: str, keep_factor_id: str,
                                      now: datetime) -> list[str]:
        """Disable the user's PENDING factors other than ``keep_factor_id``; their ids."""
        result = await self._conn.execute(
            update(factors).where(
                factors.c.user_id == user_id, factors.c.id != keep_factor_id,
                factors.c.status == FactorStatus.PENDING.value)
            .values(status=FactorStatus.DISABLED.value, disabled_at=now,
                    secret_ciphertext=None, secret_key_id=None)
            .returning(factors.c.id))
        return [r.id for r in result]

    async def activate(self, factor_id: str, now: datetime) -> bool:
        """PENDING -> ACTIVE; False when the factor was no longer PENDING."""
        result = await self._conn.execute(
            update(factors).where(factors.c.id == factor_id,
                                  factors.c.status == FactorStatus.PENDING.value)
            .values(status=FactorStatus.ACTIVE.value, confirmed_at=now, last_used_at=now))
        return result.rowcount == 1

    async def disable(self, factor_id: str, now: datetime) -> bool:
        """-> DISABLED, wiping the secret (crypto-shredding); False if already disabled."""
        result = await self._conn.execute(
            update(factors).where(factors.c.id == factor_id,
                                  factors.c.status != FactorStatus.DISABLED.value)
            .values(status=FactorStatus.DISABLED.value, disabled_at=now,
                    secret_ciphertext=None, secret_key_id=None))
        return result.rowcount == 1

    async def accept_totp_step(self, factor_id: str, step: int, now: datetime) -> bool:
        """Record ``step`` as used; False when it is not newer than the last one (a replay).

        One conditional UPDATE: under concurrency the second writer waits for the row lock
        (PostgreSQL) or the write lock (SQLite), then re-evaluates the WHERE and matches
        nothing, so the same code cannot be accepted twice (RFC 6238 section 5.2).
        """
        result = await self._conn.execute(
            update(factors).where(
                factors.c.id == factor_id,
                or_(factors.c.last_totp_step.is_(None), factors.c.last_totp_step < step))
            .values(last_totp_step=step, last_used_at=now))
        return result.rowcount == 1

    async def touch_active(self, factor_id: str, now: datetime) -> bool:
        """Mark an ACTIVE factor used; False if it stopped being ACTIVE meanwhile (a
        concurrent Disable won the row lock first)."""
        result = await self._conn.execute(
            update(factors).where(factors.c.id == factor_id,
                                  factors.c.status == FactorStatus.ACTIVE.value)
            .values(last_used_at=now))
        return result.rowcount == 1


def _aware(value: Any) -> datetime | None:
    """Aggregates (min/max) bypass the column type on SQLite (text) and PostgreSQL (naive)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _challenge(row: Row[Any]) -> Challenge:
    return Challenge(
        challenge_id=row.id, user_id=row.user_id, factor_id=row.factor_id,
        purpose=Purpose(row.purpose), application=Application(row.application),
        channel=Channel(row.channel), state=ChallengeState(row.state), attempts=row.attempts,
        max_attempts=row.max_attempts, created_at=row.created_at, expires_at=row.expires_at,
        code_hash=row.code_hash, code_key_id=row.code_key_id, request_id=row.request_id,
        approved_at=row.approved_at, consumed_at=row.consumed_at,
        destination_key=row.destination_key)


class ChallengeRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(self, c: Challenge, caller: str) -> None:
        await self._conn.execute(insert(challenges).values(
            id=c.challenge_id, user_id=c.user_id, factor_id=c.factor_id, purpose=c.purpose.value,
            application=c.application.value, channel=c.channel.value, state=c.state.value,
            attempts=c.attempts, max_attempts=c.max_attempts, code_hash=c.code_hash,
            code_key_id=c.code_key_id, request_id=c.request_id, caller=caller,
            created_at=c.created_at, expires_at=c.expires_at,
            destination_key=c.destination_key))

    async def get(self, challenge_id: str) -> Challenge | None:
        row = (await self._conn.execute(
            select(challenges).where(challenges.c.id == challenge_id))).first()
        return _challenge(row) if row else None

    async def by_request_id(self, factor_id: str, request_id: str) -> Challenge | None:
        row = (await self._conn.execute(select(challenges).where(
            challenges.c.factor_id == factor_id, challenges.c.request_id == request_id))).first()
        return _challenge(row) if row else None

    async def supersede_open(self, factor_id: str, purpose: Purpose) -> int:
        """Close the factor's open challenges for ``purpose``: a new one replaces them, so
        an old code dies and attempts cannot be pooled across challenges."""
        result = await self._conn.execute(
            update(challenges).where(
                challenges.c.factor_id == factor_id, challenges.c.purpose == purpose.value,
                challenges.c.state == ChallengeState.OPEN.value)
            .values(state=ChallengeState.SUPERSEDED.value))
        return result.rowcount

    async def count_attempt(self, challenge_id: str, now: datetime) -> Challenge | None:
        """Count one attempt *before* the code is checked; None if the challenge takes no more.

        The attempt is counted in its own conditional UPDATE so that parallel guesses
        cannot all see "4 attempts so far" and all proceed (ory/kratos does the same).
        """
        result = await self._conn.execute(
            update(challenges).where(
                challenges.c.id == challenge_id,
                challenges.c.state == ChallengeState.OPEN.value,
                challenges.c.expires_at > now,
                challenges.c.attempts < challenges.c.max_attempts)
            .values(attempts=challenges.c.attempts + 1)
            .returning(*challenges.c))
        row = result.first()
        return _challenge(row) if row else None

    async def sends_since(self, since: datetime, *, user_id: str, method: Method,
                          ) -> tuple[int, datetime | None]:
        """(codes sent, earliest) since ``since`` to all of a user's factors of a
        method. A challenge with a code hash is one send."""
        row = (await self._conn.execute(
            select(func.count(), func.min(challenges.c.created_at)).where(
                challenges.c.code_hash.is_not(None), challenges.c.created_at > since,
                challenges.c.user_id == user_id,
                challenges.c.factor_id.in_(select(factors.c.id).where(
                    factors.c.user_id == user_id, factors.c.method == method.value))))).one()
        return int(row[0]), _aware(row[1])

    async def lock_destination(self, destination_key: bytes) -> None:
        """Hold the destination's lock until the transaction ends, so two users' requests
        to one number count their sends one after the other."""
        await lock_key(self._conn, destination_key)

    async def sends_to(self, destination_key: bytes, since: datetime,
                       ) -> tuple[int, datetime | None]:
        """(codes sent, earliest) since ``since`` to one address or number, whichever
        users asked."""
        row = (await self._conn.execute(
            select(func.count(), func.min(challenges.c.created_at)).where(
                challenges.c.destination_key == destination_key,
                challenges.c.created_at > since))).one()
        return int(row[0]), _aware(row[1])

    async def latest_open_send(self, since: datetime, now: datetime, *,
                               factor_id: str | None = None, user_id: str | None = None,
                               method: Method | None = None) -> datetime | None:
        """When the newest code still waiting to be used was sent (after ``since``), for
        one factor or for a user's factors of a method. Only OPEN, unexpired challenges
        count: the resend cooldown is against resends, so after an approval the next
        code goes out at once."""
        query = select(func.max(challenges.c.created_at)).where(
            challenges.c.code_hash.is_not(None), challenges.c.created_at > since,
            challenges.c.state == ChallengeState.OPEN.value, challenges.c.expires_at > now)
        if factor_id is not None:
            query = query.where(challenges.c.factor_id == factor_id)
        if user_id is not None and method is not None:
            query = query.where(challenges.c.user_id == user_id, challenges.c.factor_id.in_(
                select(factors.c.id).where(factors.c.user_id == user_id,
                                           factors.c.method == method.value)))
        return _aware((await self._conn.execute(query)).scalar())

    async def consume_change_proof(self, challenge_id: str, old_factor_id: str,
                                   approved_after: datetime, now: datetime) -> bool:
        """Use an approved PURPOSE_CHANGE_PHONE challenge as proof, once."""
        result = await self._conn.execute(
            update(challenges).where(
                challenges.c.id == challenge_id,
                challenges.c.factor_id == old_factor_id,
                challenges.c.purpose == Purpose.CHANGE_PHONE.value,
                challenges.c.state == ChallengeState.APPROVED.value,
                challenges.c.approved_at >= approved_after,
                challenges.c.consumed_at.is_(None))
            .values(consumed_at=now))
        return result.rowcount == 1

    async def close(self, challenge_id: str, state: ChallengeState, now: datetime) -> bool:
        """OPEN -> ``state``; False when another request closed it first (single use)."""
        values: dict[str, Any] = {"state": state.value}
        if state is ChallengeState.APPROVED:
            values["approved_at"] = now
        result = await self._conn.execute(
            update(challenges).where(challenges.c.id == challenge_id,
                                     challenges.c.state == ChallengeState.OPEN.value)
            .values(**values))
        return result.rowcount == 1


def _session(row: Row[Any]) -> Session:
    return Session(
        session_id=row.id, user_id=row.user_id, factor_id=row.factor_id,
        method=Method(row.method), application=Application(row.application),
        authenticated_at=row.authenticated_at, expires_at=row.expires_at,
        idle_expires_at=row.idle_expires_at)


class SessionRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(self, s: Session, token_hash: bytes, token_key_id: str, caller: str) -> None:
        await self._conn.execute(insert(sessions).values(
            id=s.session_id, token_hash=token_hash, token_key_id=token_key_id,
            user_id=s.user_id, factor_id=s.factor_id, method=s.method.value,
            application=s.application.value, caller=caller,
            authenticated_at=s.authenticated_at, expires_at=s.expires_at,
            idle_expires_at=s.idle_expires_at))

    async def find_live(self, token_hashes: Sequence[bytes], now: datetime) -> Session | None:
        """The live session (not revoked, neither deadline passed) with one of the hashes."""
        row = (await self._conn.execute(select(sessions).where(
            sessions.c.token_hash.in_(list(token_hashes)), sessions.c.revoked_at.is_(None),
            sessions.c.expires_at > now, sessions.c.idle_expires_at > now))).first()
        return _session(row) if row else None

    async def touch_live(self, token_hashes: Sequence[bytes], now: datetime,
                         idle_until: datetime) -> Session | None:
        """The live session with one of ``token_hashes``, its idle deadline slid forward.

        One statement: validity (not revoked, neither deadline passed) and the sliding
        idle timeout are decided by the database, never capped past the absolute expiry.
        """
        result = await self._conn.execute(
            update(sessions).where(
                sessions.c.token_hash.in_(list(token_hashes)),
                sessions.c.revoked_at.is_(None),
                sessions.c.expires_at > now,
                sessions.c.idle_expires_at > now)
            .values(idle_expires_at=case(
                (sessions.c.expires_at < idle_until, sessions.c.expires_at),
                else_=idle_until))
            .returning(*sessions.c))
        row = result.first()
        return _session(row) if row else None

    async def revoke_by_hash(self, token_hashes: Sequence[bytes], now: datetime) -> list[Session]:
        result = await self._conn.execute(
            update(sessions).where(sessions.c.token_hash.in_(list(token_hashes)),
                                   sessions.c.revoked_at.is_(None), sessions.c.expires_at > now,
                                   sessions.c.idle_expires_at > now)
            .values(revoked_at=now).returning(*sessions.c))
        return [_session(r) for r in result]

    async def revoke_factor(self, user_id: str, factor_id: str,
                            now: datetime) -> list[Session]:
        """End the live sessions a factor created (it was disabled or replaced)."""
        result = await self._conn.execute(
            update(sessions).where(sessions.c.user_id == user_id,  # indexed
                                   sessions.c.factor_id == factor_id,
                                   sessions.c.revoked_at.is_(None),
                                   sessions.c.expires_at > now,
                                   sessions.c.idle_expires_at > now)
            .values(revoked_at=now).returning(*sessions.c))
        return [_session(r) for r in result]

    async def revoke_user(self, user_id: str, now: datetime) -> list[Session]:
        result = await self._conn.execute(
            update(sessions).where(sessions.c.user_id == user_id,
                                   sessions.c.revoked_at.is_(None),
                                   and_(sessions.c.expires_at > now,
                                        sessions.c.idle_expires_at > now))
            .values(revoked_at=now).returning(*sessions.c))
        return [_session(r) for r in result]


class AuditRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def record(self, **values: Any) -> None:
        await self._conn.execute(insert(audit_events).values(**values))

    async def page(self, user_id: str, *, start: datetime | None = None,
                   end: datetime | None = None, before_id: int | None = None,
                   limit: int = 100) -> list[AuditEvent]:
        """A user's events, newest first; ``before_id`` continues after a previous page."""
        query = select(audit_events).where(audit_events.c.user_id == user_id)
        if start is not None:
            query = query.where(audit_events.c.occurred_at >= start)
        if end is not None:
            query = query.where(audit_events.c.occurred_at < end)
        if before_id is not None:
            query = query.where(audit_events.c.id < before_id)
        rows = await self._conn.execute(query.order_by(audit_events.c.id.desc()).limit(limit))
        return [AuditEvent(
            event_id=r.id, occurred_at=r.occurred_at, event=r.event, outcome=r.outcome,
            user_id=r.user_id, factor_id=r.factor_id, challenge_id=r.challenge_id,
            session_id=r.session_id, caller=r.caller, application=r.application,
            client_ip=r.client_ip, user_agent=r.user_agent,
            detail=json.loads(r.detail) if r.detail else {}) for r in rows]
