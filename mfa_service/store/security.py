"""Per-user lockout counters and recovery codes: the two user-level security aggregates."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Integer,
    String,
    bindparam,
    func,
    literal,
    literal_column,
    select,
    update,
)
from sqlalchemy.engine import Row

from mfa_service.store import hot
from mfa_service.store.engine import upsert_lock
from mfa_service.store.models import UTCDateTime, challenges, recovery_codes, user_lockouts
from mfa_service.store.unit import USER_LOCK, Unit, standing_for_the_lock


@dataclass(frozen=True)
class LockoutState:
    consecutive_failures: int
    last_failure_at: datetime | None
    locked_until: datetime | None
    admin_reset_required: bool


# The rows the lock upserts (a WHERE on each: SQLite needs one before ON CONFLICT).
_NEW_COUNTER = (literal(0, Integer()).label("consecutive_failures"),
                literal(False, Boolean()).label("admin_reset_required"))
_LOCK_USER_SOURCE = select(bindparam("user_id", type_=String()).label("user_id"),
                           *_NEW_COUNTER).where(literal_column("1") == 1)
_LOCK_CHALLENGE_USER_SOURCE = select(challenges.c.user_id, *_NEW_COUNTER).where(
    challenges.c.id == bindparam("challenge_id"))
_BUILT: dict[tuple[str, str], Any] = {}
_SAVE = update(user_lockouts).where(user_lockouts.c.user_id == bindparam("uid")).values(
    consecutive_failures=bindparam("failures", type_=Integer()),
    last_failure_at=bindparam("last_failure_at", type_=UTCDateTime()),
    locked_until=bindparam("locked_until", type_=UTCDateTime()),
    admin_reset_required=bindparam("admin", type_=Boolean()))
# The same write in an optimistic unit (store/unit.py): only if lock_version is still the
# one read, which it moves on, as the lock would have (the unit's USER_LOCK guard).
_SAVE_IF_VERSION = standing_for_the_lock(_SAVE)


def _statement(unit: Unit, name: str, source: Any) -> Any:
    """The lock statement for this dialect, built once."""
    key = (unit.dialect, name)
    if key not in _BUILT:
        _BUILT[key] = upsert_lock(unit.dialect, source)
    return _BUILT[key]


def _state(row: Row[Any]) -> LockoutState:
    return lockout_state_of(row._mapping)


def lockout_state_of(m: Any, prefix: str = "") -> LockoutState:
    """A lockout row (its columns named with ``prefix``) as a LockoutState."""
    return LockoutState(m[f"{prefix}consecutive_failures"], m[f"{prefix}last_failure_at"],
                        m[f"{prefix}locked_until"], bool(m[f"{prefix}admin_reset_required"]))


class LockoutRepository:
    def __init__(self, unit: Unit) -> None:
        self._unit = unit

    async def lock(self, user_id: str) -> LockoutState:
        """The user's counter, its row locked until the transaction ends: the per-user lock.

        Every call that changes a user's second factor (Enroll, Challenge, Verify,
        Disable, RegenerateRecoveryCodes) takes this lock *first*, so a user's requests
        run one after another: concurrent guesses are counted one by one, parallel
        enrolments cannot all see "4 codes sent", and no two of them take row locks in
        opposite orders (the Challenge/Verify deadlock). Lock order everywhere: user,
        then destination, then factor and challenge rows.

        One statement: an upsert that creates the row on first use and locks it
        (PostgreSQL's ON CONFLICT DO UPDATE takes the row lock; on SQLite BEGIN
        IMMEDIATE already holds the write lock).
        """
        if self._unit.postgres:  # the hot statement (store/hot.py)
            record = await self._unit.fetchrow(hot.LOCK_USER, user_id)
            return lockout_state_of(hot.aware(record))
        statement = _statement(self._unit, "lock_user", _LOCK_USER_SOURCE)
        row = (await self._unit.execute(statement, {"user_id": user_id})).one()
        return _state(row)

    async def lock_for_challenge(self, challenge_id: str) -> tuple[str, LockoutState] | None:
        """Lock the user who owns ``challenge_id`` (see ``lock``) without knowing them
        yet: one statement instead of a read followed by the lock. None: no such
        challenge. Everything read after this is current for that user. SQLite's path;
        PostgreSQL locks and reads in one statement
        (``ChallengeRepository.locked_with_factor``)."""
        statement = _statement(self._unit, "lock_challenge_user", _LOCK_CHALLENGE_USER_SOURCE)
        row = (await self._unit.execute(statement, {"challenge_id": challenge_id})).first()
        return (row.user_id, _state(row)) if row else None



class LockoutWrites:
    """The lockout counter's write, which waits for COMMIT (``tx.later.lockouts``)."""

    def __init__(self, unit: Unit) -> None:
        self._unit = unit

    def save(self, user_id: str, state: LockoutState) -> None:
        """Write the counter before COMMIT (the row is locked by this transaction, or,
        in an optimistic unit, the write stands for the lock: USER_LOCK)."""
        params = {
            "uid": user_id, "failures": state.consecutive_failures,
            "last_failure_at": state.last_failure_at, "locked_until": state.locked_until,
            "admin": state.admin_reset_required}
        seen = self._unit.version_read(user_id)
        if seen is None:
            self._unit.defer(_SAVE, params)
        else:
            self._unit.defer(_SAVE_IF_VERSION, {**params, "cas_seen": seen, "cas_uid": user_id},
                             guard=USER_LOCK)


class RecoveryCodeWrites:
    """New recovery codes, inserted at COMMIT (``tx.later.recovery``)."""

    def __init__(self, unit: Unit) -> None:
        self._unit = unit

    def add(self, user_id: str, hashes: Sequence[tuple[str, bytes]], now: datetime) -> None:
        """Store new codes (key id, HMAC); retire the old ones first
        (``RecoveryCodeRepository.retire``, immediate)."""
        for key_id, digest in hashes:
            self._unit.insert_later(recovery_codes, {
                "id": str(uuid.uuid4()), "user_id": user_id, "code_hash": digest,
                "key_id": key_id, "created_at": now, "used_at": None})


class RecoveryCodeRepository:
    def __init__(self, unit: Unit) -> None:
        self._unit = unit

    async def retire(self, user_id: str, now: datetime) -> int:
        return await self._unit.write(
            update(recovery_codes).where(recovery_codes.c.user_id == user_id,
                                         recovery_codes.c.used_at.is_(None))
            .values(used_at=now))

    async def consume(self, user_id: str, candidates: Sequence[bytes], now: datetime) -> bool:
        """Use one of the user's unused codes whose hash is in ``candidates``, once.

        A conditional UPDATE: two requests racing with the same code both match the row,
        but only the first still sees ``used_at IS NULL`` after the row lock.
        """
        return await self._unit.write(
            update(recovery_codes).where(recovery_codes.c.user_id == user_id,
                                         recovery_codes.c.code_hash.in_(list(candidates)),
                                         recovery_codes.c.used_at.is_(None))
            .values(used_at=now)) == 1

    async def remaining(self, user_id: str) -> int:
        value = (await self._unit.execute(
            select(func.count()).select_from(recovery_codes).where(
                recovery_codes.c.user_id == user_id,
                recovery_codes.c.used_at.is_(None)))).scalar()
        return int(value or 0)
