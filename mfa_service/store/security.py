"""Per-user lockout counters and recovery codes: the two user-level security aggregates."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from mfa_service.store.engine import lock_user_statement
from mfa_service.store.models import recovery_codes, user_lockouts


@dataclass(frozen=True)
class LockoutState:
    consecutive_failures: int
    last_failure_at: datetime | None
    locked_until: datetime | None
    admin_reset_required: bool


class LockoutRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def lock(self, user_id: str) -> LockoutState:
        """The user's counter, its row locked until the transaction ends: the per-user lock.

        Every call that changes a user's second factor (Enroll, Challenge, Verify,
        Disable) takes this lock *first*, so a user's requests run one after another:
        concurrent guesses are counted one by one, parallel enrolments cannot all see
        "4 codes sent", and no two of them take row locks in opposite orders (the
        Challenge/Verify deadlock). Lock order everywhere: user, then factor, then
        challenge.

        One statement: an upsert that creates the row on first use and locks it
        (PostgreSQL's ON CONFLICT DO UPDATE takes the row lock; on SQLite BEGIN
        IMMEDIATE already holds the write lock).
        """
        row = (await self._conn.execute(lock_user_statement(self._conn, user_id))).one()
        return LockoutState(row.consecutive_failures, row.last_failure_at, row.locked_until,
                            bool(row.admin_reset_required))

    async def peek(self, user_id: str) -> LockoutState | None:
        row = (await self._conn.execute(
            select(user_lockouts).where(user_lockouts.c.user_id == user_id))).first()
        if row is None:
            return None
        return LockoutState(row.consecutive_failures, row.last_failure_at, row.locked_until,
                            bool(row.admin_reset_required))

    async def save(self, user_id: str, state: LockoutState) -> None:
        await self._conn.execute(
            update(user_lockouts).where(user_lockouts.c.user_id == user_id).values(
                consecutive_failures=state.consecutive_failures,
                last_failure_at=state.last_failure_at, locked_until=state.locked_until,
                admin_reset_required=state.admin_reset_required))


class RecoveryCodeRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def replace(self, user_id: str, hashes: Sequence[tuple[str, bytes]],
                      now: datetime) -> None:
        """Retire the user's unused codes and store new ones (key id, HMAC)."""
        await self.retire(user_id, now)
        await self._conn.execute(insert(recovery_codes), [
            {"id": str(uuid.uuid4()), "user_id": user_id, "code_hash": digest,
             "key_id": key_id, "created_at": now} for key_id, digest in hashes])

    async def retire(self, user_id: str, now: datetime) -> int:
        result = await self._conn.execute(
            update(recovery_codes).where(recovery_codes.c.user_id == user_id,
                                         recovery_codes.c.used_at.is_(None))
            .values(used_at=now))
        return result.rowcount

    async def consume(self, user_id: str, candidates: Sequence[bytes], now: datetime) -> bool:
        """Use one of the user's unused codes whose hash is in ``candidates``, once.

        A conditional UPDATE: two requests racing with the same code both match the row,
        but only the first still sees ``used_at IS NULL`` after the row lock.
        """
        result = await self._conn.execute(
            update(recovery_codes).where(recovery_codes.c.user_id == user_id,
                                         recovery_codes.c.code_hash.in_(list(candidates)),
                                         recovery_codes.c.used_at.is_(None))
            .values(used_at=now))
        return result.rowcount == 1

    async def remaining(self, user_id: str) -> int:
        value = await self._conn.scalar(select(func.count()).select_from(recovery_codes).where(
            recovery_codes.c.user_id == user_id, recovery_codes.c.used_at.is_(None)))
        return int(value or 0)
