"""Narrow repositories, one per aggregate, all sharing the caller's transaction (a Unit).

Single use and limits are enforced by the statements themselves (conditional UPDATEs
whose row count is the answer), or by the per-user lock every writing RPC takes first
(store/security.py), never by an unlocked read followed by a write in Python.

Hot-path statements are built once, here at import, with bound parameters: SQLAlchemy then
finds their compiled form in its cache without rebuilding the expression and its cache key
on every call. Writes nobody reads back in the transaction are deferred (store/unit.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    LargeBinary,
    String,
    and_,
    bindparam,
    case,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Row

from mfa_service.domain import (
    DEFAULT_TOTP,
    Application,
    AuditEvent,
    AuditEventType,
    AuditOutcome,
    Challenge,
    ChallengeState,
    Channel,
    Factor,
    FactorRecord,
    FactorStatus,
    Method,
    Purpose,
    Session,
    TotpAlgorithm,
    TotpParameters,
)
from mfa_service.store import hot
from mfa_service.store.engine import lock_keys, notify_revoked, take_budget_unit
from mfa_service.store.models import (
    UTCDateTime,
    audit_events,
    challenges,
    factors,
    recovery_codes,
    sessions,
)
from mfa_service.store.security import LockoutRepository, LockoutState, lockout_state_of
from mfa_service.store.unit import Unit

# Typed once: a bare bindparam would not run the column type's conversion (aware UTC
# datetimes are stored naive-UTC, store/models.py: UTCDateTime).
_NOW = bindparam("now", type_=UTCDateTime())
_OPEN = ChallengeState.OPEN.value
_ACTIVE = FactorStatus.ACTIVE.value
_PENDING = FactorStatus.PENDING.value
_DISABLED = FactorStatus.DISABLED.value


def _factor(row: Row[Any], prefix: str = "") -> FactorRecord:
    return _factor_of(row._mapping, prefix)


def _factor_of(m: Any, prefix: str = "") -> FactorRecord:
    return FactorRecord(
        factor=Factor(
            factor_id=m[prefix + "id"], user_id=m[prefix + "user_id"],
            method=Method(m[prefix + "method"]), status=FactorStatus(m[prefix + "status"]),
            masked_destination=m[prefix + "masked_destination"],
            created_at=m[prefix + "created_at"], confirmed_at=m[prefix + "confirmed_at"],
            last_used_at=m[prefix + "last_used_at"], disabled_at=m[prefix + "disabled_at"],
            established_at=m[prefix + "established_at"]),
        label=m[prefix + "label"], destination=m[prefix + "destination"],
        secret_ciphertext=m[prefix + "secret_ciphertext"],
        secret_key_id=m[prefix + "secret_key_id"], last_totp_step=m[prefix + "last_totp_step"],
        locale=m[prefix + "locale"], replaces_factor_id=m[prefix + "replaces_factor_id"],
        enrolled_session_id=m[prefix + "enrolled_session_id"],
        totp=_totp_of(m[prefix + "totp_algorithm"], m[prefix + "totp_digits"],
                      m[prefix + "totp_period"]))


def _totp_of(algorithm: str | None, digits: int | None, period: int | None) -> TotpParameters:
    """NULL columns are RFC 6238's defaults (store/models.py)."""
    if algorithm is None and digits is None and period is None:
        return DEFAULT_TOTP  # every enrolled factor: no new object per read
    return TotpParameters(
        algorithm=TotpAlgorithm(algorithm) if algorithm else DEFAULT_TOTP.algorithm,
        digits=digits or DEFAULT_TOTP.digits, period=period or DEFAULT_TOTP.period)


def totp_columns(totp: TotpParameters) -> dict[str, Any]:
    """The factor's TOTP columns: NULL for the defaults (store/models.py)."""
    if totp == DEFAULT_TOTP:
        return {"totp_algorithm": None, "totp_digits": None, "totp_period": None}
    return {"totp_algorithm": totp.algorithm.value, "totp_digits": totp.digits,
            "totp_period": totp.period}


def _factor_row(record: FactorRecord) -> dict[str, Any]:
    f = record.factor
    return {
        "id": f.factor_id, "user_id": f.user_id, "method": f.method.value,
        "status": f.status.value, "label": record.label,
        "masked_destination": f.masked_destination, "destination": record.destination,
        "secret_ciphertext": record.secret_ciphertext, "secret_key_id": record.secret_key_id,
        "last_totp_step": record.last_totp_step, "created_at": f.created_at,
        "confirmed_at": f.confirmed_at, "last_used_at": f.last_used_at,
        "disabled_at": None, "locale": record.locale,
        "replaces_factor_id": record.replaces_factor_id,
        "established_at": f.established_at,
        "enrolled_session_id": record.enrolled_session_id, **totp_columns(record.totp)}


_STEP = bindparam("step", type_=BigInteger())
_ACCEPT_TOTP_STEP = update(factors).where(
    factors.c.id == bindparam("factor_id"),
    or_(factors.c.last_totp_step.is_(None), factors.c.last_totp_step < _STEP),
).values(last_totp_step=_STEP, last_used_at=_NOW)
_TOUCH = update(factors).where(
    factors.c.id == bindparam("factor_id"), factors.c.status == _ACTIVE,
).values(last_used_at=_NOW)
# A passkey login: the new sign counter lives inside the encrypted credential, so the
# touch of the row carries the re-encrypted secret (one deferred UPDATE per row).
_TOUCH_WITH_SECRET = update(factors).where(
    factors.c.id == bindparam("factor_id"), factors.c.status == _ACTIVE,
    # Compare and swap: only from the credential (and so the counter) that was read.
    factors.c.secret_ciphertext == bindparam("previous", type_=LargeBinary()),
).values(last_used_at=_NOW, secret_key_id=bindparam("key_id", type_=String()),
         secret_ciphertext=bindparam("ciphertext", type_=LargeBinary()))
_GET_FACTOR = select(factors).where(factors.c.id == bindparam("factor_id"))
_FACTORS_OF_USER = select(factors).where(factors.c.user_id == bindparam("user_id")).order_by(
    # Oldest first; the recovery-code factor last (it is not one the user "added").
    factors.c.method == Method.RECOVERY_CODE.value, factors.c.created_at, factors.c.id)


_CODES_LEFT = select(func.count()).select_from(recovery_codes).where(
    recovery_codes.c.user_id == bindparam("user_id"),
    recovery_codes.c.used_at.is_(None)).scalar_subquery()
_FACTORS_WITH_CODES_LEFT = select(factors, _CODES_LEFT.label("codes_left")).where(
    factors.c.user_id == bindparam("user_id")).order_by(
    factors.c.method == Method.RECOVERY_CODE.value, factors.c.created_at, factors.c.id)


@dataclass(frozen=True)
class UserFactors:
    """What Enroll needs to know of a user's factors, read in one statement."""

    live: int  # PENDING + ACTIVE
    any_active: bool
    active_of_method: FactorRecord | None


class FactorRepository:
    """Reads and immediate writes of factors (their deferred writes: ``FactorWrites``)."""

    def __init__(self, unit: Unit) -> None:
        self._unit = unit

    async def get(self, factor_id: str) -> FactorRecord | None:
        """The factor (a plain read: writers serialise on the per-user lock first)."""
        if self._unit.postgres:  # the hot statement (store/hot.py)
            record = await self._unit.fetchrow(hot.GET_FACTOR, factor_id)
            return _factor_of(hot.aware(record)) if record is not None else None
        row = (await self._unit.execute(_GET_FACTOR, {"factor_id": factor_id})).first()
        return _factor(row) if row else None

    async def locked_with(self, user_id: str, factor_id: str,
                          ) -> tuple[LockoutState, FactorRecord | None]:
        """Take the per-user lock (``LockoutRepository.lock``, before anything else), then
        read the factor as it is under that lock. On PostgreSQL one round trip
        (hot.LOCK_USER_WITH_FACTOR), plus a second read only when another transaction of
        the user committed while this one waited for the lock (or the user's counter row
        is new)."""
        if not self._unit.postgres:
            return await LockoutRepository(self._unit).lock(user_id), await self.get(factor_id)
        if self._unit.optimistic:  # no lock: the writes check lock_version (store/unit.py)
            m = hot.aware(await self._unit.fetchrow(hot.USER_WITH_FACTOR, user_id, factor_id))
            self._unit.read_version(user_id, m["l_lock_version"])
            return (lockout_state_of(m, "l_"),
                    _factor_of(m, "f_") if m["f_id"] is not None else None)
        m = hot.aware(await self._unit.fetchrow(hot.LOCK_USER_WITH_FACTOR, user_id, factor_id))
        lockout = lockout_state_of(m, "l_")
        seen = m["seen_version"]
        if seen is None or m["l_lock_version"] != seen + 1:
            return lockout, await self.get(factor_id)  # current: the lock is held
        return lockout, _factor_of(m, "f_") if m["f_id"] is not None else None

    async def list_for_user(self, user_id: str) -> list[FactorRecord]:
        rows = await self._unit.execute(_FACTORS_OF_USER, {"user_id": user_id})
        return [_factor(r) for r in rows]

    async def list_with_codes_left(self, user_id: str) -> tuple[list[FactorRecord], int]:
        """The user's factors and their unused recovery codes, in one statement (one
        snapshot: the count cannot disagree with the list)."""
        rows = list(await self._unit.execute(_FACTORS_WITH_CODES_LEFT, {"user_id": user_id}))
        return [_factor(r) for r in rows], int(rows[0].codes_left) if rows else 0

    async def summary(self, user_id: str, method: Method) -> UserFactors:
        """Live count, whether any is ACTIVE, and the ACTIVE one of ``method``."""
        records = await self.list_for_user(user_id)
        live = [r for r in records if r.factor.status is not FactorStatus.DISABLED]
        active = [r for r in live if r.factor.status is FactorStatus.ACTIVE]
        return UserFactors(
            live=len(live), any_active=bool(active),
            active_of_method=next((r for r in active if r.factor.method is method), None))

    async def active_of_method(self, user_id: str, method: Method) -> FactorRecord | None:
        row = (await self._unit.execute(select(factors).where(
            factors.c.user_id == user_id, factors.c.method == method.value,
            factors.c.status == _ACTIVE))).first()
        return _factor(row) if row else None

    async def supersede_pending(self, user_id: str, method: Method, now: datetime) -> int:
        """Disable the user's unconfirmed factors of ``method``: a newer enrolment replaces
        them. Immediate, not deferred: the new PENDING factor's unique index needs the old
        one gone first."""
        return await self._unit.write(
            update(factors).where(
                factors.c.user_id == user_id, factors.c.method == method.value,
                factors.c.status == _PENDING)
            .values(status=_DISABLED, disabled_at=now, secret_ciphertext=None,
                    secret_key_id=None))

    async def supersede_other_pending(self, user_id: str, keep_factor_id: str,
                                      now: datetime) -> list[str]:
        """Disable the user's PENDING factors other than ``keep_factor_id``; their ids."""
        result = await self._unit.execute(
            update(factors).where(
                factors.c.user_id == user_id, factors.c.id != keep_factor_id,
                factors.c.status == _PENDING)
            .values(status=_DISABLED, disabled_at=now, secret_ciphertext=None,
                    secret_key_id=None)
            .returning(factors.c.id))
        return [r.id for r in result]

    async def activate(self, factor_id: str, now: datetime,
                       established_at: datetime) -> bool:
        """PENDING -> ACTIVE, established from ``established_at`` (service/policy.py);
        False when the factor was no longer PENDING."""
        return await self._unit.write(
            update(factors).where(factors.c.id == factor_id, factors.c.status == _PENDING)
            .values(status=_ACTIVE, confirmed_at=now, last_used_at=now,
                    established_at=established_at)) == 1

    async def set_established(self, factor_id: str, established_at: datetime) -> None:
        """The recovery-code factor: from when its (new) code set counts as established."""
        await self._unit.write(update(factors).where(factors.c.id == factor_id)
                               .values(established_at=established_at))

    async def disable(self, factor_id: str, now: datetime) -> bool:
        """-> DISABLED, wiping the secret (crypto-shredding); False if already disabled."""
        return await self._unit.write(
            update(factors).where(factors.c.id == factor_id, factors.c.status != _DISABLED)
            .values(status=_DISABLED, disabled_at=now, secret_ciphertext=None,
                    secret_key_id=None)) == 1

    async def store_credential(self, factor_id: str, key_id: str, ciphertext: bytes, *,
                               masked_destination: str | None = None) -> None:
        """Store a PENDING/ACTIVE factor's encrypted secret now (a passkey's credential at
        registration, with its name; the activation that follows reads nothing back)."""
        values: dict[str, Any] = {"secret_key_id": key_id, "secret_ciphertext": ciphertext}
        if masked_destination is not None:
            values["masked_destination"] = masked_destination
        await self._unit.write(
            update(factors).where(factors.c.id == factor_id, factors.c.status != _DISABLED)
            .values(**values))

class FactorWrites:
    """Factor writes that wait for COMMIT (``tx.later.factors``): nothing in the
    transaction reads them back."""

    def __init__(self, unit: Unit) -> None:
        self._unit = unit
        # factor id -> (TOTP step to record or None, when it was used): one deferred
        # UPDATE per factor however many times the request marks it (see Unit.defer).
        self._used: dict[str, tuple[int | None, datetime]] = {}
        # factor id -> (key id, ciphertext, the ciphertext read) to store with that same
        # UPDATE (passkeys).
        self._secrets: dict[str, tuple[str, bytes, bytes]] = {}

    def _mark_used(self, factor_id: str, step: int | None, now: datetime) -> None:
        previous = self._used.get(factor_id)
        if previous is not None and previous[0] is not None:
            step = previous[0] if step is None else max(step, previous[0])
        self._used[factor_id] = (step, now)
        self._unit.before_flush(self._write_used)

    def _write_used(self) -> None:
        used, self._used = self._used, {}
        secrets, self._secrets = self._secrets, {}
        # Each is a guard (store/unit.py): the row must still be what was read under the
        # user's lock, or the transaction rolls back and the use case runs again.
        for factor_id, (step, now) in used.items():
            secret = secrets.get(factor_id)
            if secret is not None:
                self._unit.defer(_TOUCH_WITH_SECRET, {
                    "factor_id": factor_id, "now": now, "key_id": secret[0],
                    "ciphertext": secret[1], "previous": secret[2]},
                    guard="passkey_counter")
            elif step is None:
                self._unit.defer(_TOUCH, {"factor_id": factor_id, "now": now},
                                 guard="factor_active")
            else:
                self._unit.defer(_ACCEPT_TOTP_STEP,
                                 {"factor_id": factor_id, "step": step, "now": now},
                                 guard="totp_step")

    def add(self, record: FactorRecord) -> None:
        """Insert the factor before COMMIT (nothing reads it back in the transaction)."""
        self._unit.insert_later(factors, _factor_row(record))

    def use_with_secret(self, factor_id: str, key_id: str, ciphertext: bytes,
                        now: datetime, previous: bytes) -> None:
        """Mark an ACTIVE factor used and store its re-encrypted secret in the same deferred
        UPDATE (a passkey's credential with its new sign counter), only if the stored one
        is still ``previous`` (a guard: two assertions racing with one counter cannot
        both win). Like the TOTP step, the caller holds the user's lock and read the
        secret after taking it."""
        self._secrets[factor_id] = (key_id, ciphertext, previous)
        self._mark_used(factor_id, None, now)

    def accept_totp_step(self, factor_id: str, step: int, now: datetime) -> None:
        """Record ``step`` as the factor's last accepted one (RFC 6238 section 5.2).

        The caller holds the user's lock and read the factor after taking it, so its
        ``last_totp_step`` was current and the step is newer: the write waits for COMMIT.
        It is a guard all the same: the WHERE refuses a step that is not newer, and a
        write that matched nothing (something wrote the factor without the user's lock)
        rolls the transaction back (GuardLost) instead of approving a replay.
        """
        self._mark_used(factor_id, step, now)

    def touch(self, factor_id: str, now: datetime) -> None:
        """Mark an ACTIVE factor used (before COMMIT)."""
        self._mark_used(factor_id, None, now)


def _aware(value: Any) -> datetime | None:
    """Aggregates (min/max) bypass the column type on SQLite (text) and PostgreSQL (naive)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _challenge(row: Row[Any]) -> Challenge:
    return _challenge_of(row._mapping)


def _challenge_of(m: Any) -> Challenge:
    return Challenge(
        challenge_id=m["id"], user_id=m["user_id"], factor_id=m["factor_id"],
        purpose=Purpose(m["purpose"]), application=Application(m["application"]),
        channel=Channel(m["channel"]), state=ChallengeState(m["state"]),
        attempts=m["attempts"], max_attempts=m["max_attempts"], created_at=m["created_at"],
        expires_at=m["expires_at"], code_hash=m["code_hash"], code_key_id=m["code_key_id"],
        request_id=m["request_id"], approved_at=m["approved_at"],
        consumed_at=m["consumed_at"], destination_key=m["destination_key"])


# A challenge and its factor in one read (factor columns prefixed "f_").
_CHALLENGE_WITH_FACTOR = select(
    challenges, *(c.label(f"f_{c.name}") for c in factors.c)
).select_from(challenges.join(factors, factors.c.id == challenges.c.factor_id)).where(
    challenges.c.id == bindparam("challenge_id"))
_BY_REQUEST_ID = select(challenges).where(challenges.c.factor_id == bindparam("factor_id"),
                                          challenges.c.request_id == bindparam("request_id"))
# (A bound parameter of an UPDATE may not share a name with a column of its table.)
_SUPERSEDE_OPEN = update(challenges).where(
    challenges.c.factor_id == bindparam("b_factor_id"),
    challenges.c.purpose == bindparam("b_purpose", type_=String()),
    challenges.c.state == _OPEN,
).values(state=ChallengeState.SUPERSEDED.value)
_OK = bindparam("ok", type_=Boolean())
# Count one attempt and close the challenge in one conditional UPDATE: APPROVED when the
# proof passed, EXHAUSTED at the last attempt. The attempt is counted and the challenge
# used exactly once whatever runs concurrently (a second writer waits for the row lock,
# re-evaluates the WHERE and matches nothing). Deferred as a guard: no RETURNING, the
# batch counts the row.
_SETTLE_ATTEMPT_LATER = update(challenges).where(
    challenges.c.id == bindparam("challenge_id"), challenges.c.state == _OPEN,
    challenges.c.expires_at > _NOW,
    challenges.c.attempts < challenges.c.max_attempts,
).values(
    attempts=challenges.c.attempts + 1,
    state=case((_OK, ChallengeState.APPROVED.value),
               (challenges.c.attempts + 1 >= challenges.c.max_attempts,
                ChallengeState.EXHAUSTED.value),
               else_=challenges.c.state),
    approved_at=case((_OK, _NOW), else_=challenges.c.approved_at),
)


@dataclass(frozen=True)
class SendCounts:
    """What the send limits need, counted in one statement."""

    latest_open: datetime | None  # newest code still waiting to be used (cooldown)
    user_method: int  # codes to the user's factors of the method in the window
    user_method_earliest: datetime | None
    destination: int  # codes to the destination in the window, any user
    destination_earliest: datetime | None
    # Phone codes only (0/None otherwise), in the area window, any user:
    prefix: int = 0  # to numbers of the range
    prefix_earliest: datetime | None = None
    region: int = 0  # to numbers of the region
    region_earliest: datetime | None = None


class ChallengeWrites:
    """Challenge writes that wait for COMMIT (``tx.later.challenges``)."""

    def __init__(self, unit: Unit) -> None:
        self._unit = unit

    def add(self, c: Challenge, caller: str, *, phone_prefix_key: bytes | None = None,
            phone_region: str | None = None) -> None:
        """Insert the challenge before COMMIT (a phone code's range and region with it)."""
        self._unit.insert_later(challenges, {
            "id": c.challenge_id, "user_id": c.user_id, "factor_id": c.factor_id,
            "purpose": c.purpose.value, "application": c.application.value,
            "channel": c.channel.value, "state": c.state.value, "attempts": c.attempts,
            "max_attempts": c.max_attempts, "code_hash": c.code_hash,
            "code_key_id": c.code_key_id, "request_id": c.request_id, "caller": caller,
            "created_at": c.created_at, "expires_at": c.expires_at, "approved_at": None,
            "consumed_at": None, "destination_key": c.destination_key,
            "phone_prefix_key": phone_prefix_key, "phone_region": phone_region})

    def settle_attempt(self, read: Challenge, ok: bool, now: datetime) -> Challenge:
        """Count one attempt on ``read`` (an OPEN challenge read under the user's lock) and
        close it (``_SETTLE_ATTEMPT_LATER``), before COMMIT; returns the challenge as it
        will be. A guard ("attempt"): should anything have counted an
        attempt or closed it since the read, the UPDATE matches no row and the
        transaction rolls back (GuardLost), so the read need not be trusted blindly."""
        self._unit.defer(_SETTLE_ATTEMPT_LATER,
                         {"challenge_id": read.challenge_id, "ok": ok, "now": now},
                         guard="attempt")
        attempts = read.attempts + 1
        state = (ChallengeState.APPROVED if ok else ChallengeState.EXHAUSTED
                 if attempts >= read.max_attempts else read.state)
        return replace(read, attempts=attempts, state=state,
                       approved_at=now if ok else read.approved_at)

    def supersede_open(self, factor_id: str, purpose: Purpose) -> None:
        """Close the factor's open challenges for ``purpose`` (before COMMIT, before the
        new one is inserted): a new one replaces them, so an old code dies and attempts
        cannot be pooled across challenges."""
        self._unit.defer(_SUPERSEDE_OPEN, {"b_factor_id": factor_id,
                                           "b_purpose": purpose.value})


class ChallengeRepository:
    def __init__(self, unit: Unit) -> None:
        self._unit = unit

    async def get_with_factor(self, challenge_id: str,
                              ) -> tuple[Challenge, FactorRecord] | None:
        """The challenge and the factor it was opened on, in one read."""
        if self._unit.postgres:  # the hot statement (store/hot.py)
            record = await self._unit.fetchrow(hot.CHALLENGE_WITH_FACTOR, challenge_id)
            if record is None:
                return None
            m = hot.aware(record)
            return _challenge_of(m), _factor_of(m, "f_")
        row = (await self._unit.execute(_CHALLENGE_WITH_FACTOR,
                                        {"challenge_id": challenge_id})).first()
        return (_challenge(row), _factor(row, "f_")) if row else None

    async def locked_with_factor(self, challenge_id: str,
                                 ) -> tuple[Challenge, FactorRecord, LockoutState] | None:
        """Take the per-user lock of the challenge's owner (``LockoutRepository.lock``,
        before anything else), then the challenge and its factor as they are under that
        lock, and the user's lockout counter. None: no such challenge.

        On PostgreSQL one round trip (hot.LOCK_CHALLENGE_USER_WITH_FACTOR), plus a second
        read only when another transaction of the user committed while this one waited
        for the lock (or the user's counter row is new): the statement's own read is then
        older than the lock."""
        if not self._unit.postgres:
            locked = await LockoutRepository(self._unit).lock_for_challenge(challenge_id)
            found = await self.get_with_factor(challenge_id) if locked else None
            return (found[0], found[1], locked[1]) if locked and found else None
        if self._unit.optimistic:  # no lock: the writes check lock_version (store/unit.py)
            record = await self._unit.fetchrow(hot.CHALLENGE_USER_WITH_FACTOR, challenge_id)
            if record is None:
                return None
            m = hot.aware(record)
            self._unit.read_version(m["user_id"], m["l_lock_version"])
            return _challenge_of(m), _factor_of(m, "f_"), lockout_state_of(m, "l_")
        record = await self._unit.fetchrow(hot.LOCK_CHALLENGE_USER_WITH_FACTOR, challenge_id)
        if record is None:
            return None
        m = hot.aware(record)
        lockout = lockout_state_of(m, "l_")
        seen = m["seen_version"]
        if seen is None or m["l_lock_version"] != seen + 1:
            found = await self.get_with_factor(challenge_id)  # current: the lock is held
            return (found[0], found[1], lockout) if found else None
        return _challenge_of(m), _factor_of(m, "f_"), lockout

    async def by_request_id(self, factor_id: str, request_id: str) -> Challenge | None:
        row = (await self._unit.execute(
            _BY_REQUEST_ID, {"factor_id": factor_id, "request_id": request_id})).first()
        return _challenge(row) if row else None

    async def lock_destination(self, destination_key: bytes, *area: bytes) -> None:
        """Hold the destination's lock until the transaction ends, so two users' requests
        to one number count their sends one after the other; for a phone number, the
        locks of its range and region too (``area``, in that order), in the same
        statement."""
        await self._unit.flush()
        await lock_keys(self._unit, (destination_key, *area))

    async def send_counts(self, now: datetime, *, cooldown_since: datetime,
                          window_since: datetime, user_id: str, method: Method,
                          factor_id: str | None, destination_key: bytes,
                          area_since: datetime | None = None,
                          prefix_keys: Sequence[bytes] = (),
                          region: str | None = None) -> SendCounts:
        """Everything the send limits count, in one statement (see SendCounts).

        ``prefix_keys``: the range's HMAC under every key of the ring (rows keep the one
        of the primary key when they were written: a rotation does not reset the count).
        """
        of_method = challenges.c.factor_id.in_(select(factors.c.id).where(
            factors.c.user_id == user_id, factors.c.method == method.value))
        sent = challenges.c.code_hash.is_not(None)
        cooldown_scope = (challenges.c.factor_id == factor_id if factor_id is not None
                          else and_(challenges.c.user_id == user_id, of_method))
        latest_open = select(func.max(challenges.c.created_at)).where(
            sent, cooldown_scope, challenges.c.created_at > cooldown_since,
            challenges.c.state == _OPEN, challenges.c.expires_at > now).scalar_subquery()
        per_user = (sent, challenges.c.user_id == user_id, of_method,
                    challenges.c.created_at > window_since)
        per_destination = (challenges.c.destination_key == destination_key,
                           challenges.c.created_at > window_since)
        columns = [
            latest_open,
            select(func.count()).where(*per_user).scalar_subquery(),
            select(func.min(challenges.c.created_at)).where(*per_user).scalar_subquery(),
            select(func.count()).where(*per_destination).scalar_subquery(),
            select(func.min(challenges.c.created_at)).where(*per_destination)
            .scalar_subquery()]
        if region is not None and area_since is not None:
            for scope in ((challenges.c.phone_prefix_key.in_(list(prefix_keys)),
                           challenges.c.created_at > area_since),
                          (challenges.c.phone_region == region,
                           challenges.c.created_at > area_since)):
                columns.append(select(func.count()).where(*scope).scalar_subquery())
                columns.append(select(func.min(challenges.c.created_at)).where(*scope)
                               .scalar_subquery())
        row = tuple((await self._unit.execute(select(*columns))).one())
        counts = SendCounts(_aware(row[0]), int(row[1]), _aware(row[2]), int(row[3]),
                            _aware(row[4]))
        if len(row) > 5:
            counts = replace(counts, prefix=int(row[5]), prefix_earliest=_aware(row[6]),
                             region=int(row[7]), region_earliest=_aware(row[8]))
        return counts

    async def spend_phone_budget(self, day: date, budget: int) -> bool:
        """Take one phone code from ``day``'s budget; False when it is spent.

        One statement, atomic under concurrency: ``INSERT ... ON CONFLICT DO UPDATE SET
        used = used + 1 WHERE used < budget``. On PostgreSQL the day's row is locked by
        the first taker until its transaction ends; the next one waits, then sees the
        committed count (ON CONFLICT always works on the latest row version), so two
        processes cannot both take the last unit. A rolled-back send gives its unit back.
        SQLite: BEGIN IMMEDIATE already serialises writers.
        """
        stmt = take_budget_unit(self._unit.dialect, day, budget)
        return (await self._unit.execute(stmt)).first() is not None

    async def consume_proof(self, challenge_id: str, user_id: str, purpose: Purpose,
                            approved_after: datetime, now: datetime) -> str | None:
        """Use an approved challenge of ``user_id`` for ``purpose`` as proof, once (a
        conditional UPDATE: two calls racing with one proof cannot both get it); the id
        of the factor it was approved on, or None."""
        row = (await self._unit.execute(
            update(challenges).where(
                challenges.c.id == challenge_id,
                challenges.c.user_id == user_id,
                challenges.c.purpose == purpose.value,
                challenges.c.state == ChallengeState.APPROVED.value,
                challenges.c.approved_at >= approved_after,
                challenges.c.consumed_at.is_(None))
            .values(consumed_at=now).returning(challenges.c.factor_id))).first()
        return str(row.factor_id) if row else None


def _session(row: Row[Any]) -> Session:
    return Session(
        session_id=row.id, user_id=row.user_id, factor_id=row.factor_id,
        method=Method(row.method), application=Application(row.application),
        authenticated_at=row.authenticated_at, expires_at=row.expires_at,
        idle_expires_at=row.idle_expires_at,
        channel=Channel(row.channel) if row.channel is not None else None,
        device_id=row.device_id)


_HASHES = bindparam("hashes", expanding=True, type_=LargeBinary())
_LIVE = and_(sessions.c.revoked_at.is_(None), sessions.c.expires_at > _NOW,
             sessions.c.idle_expires_at > _NOW)
# CheckSession's read, per number of keys in the ring (one hash per key). A plain IN of
# fixed size: an expanding IN is rendered again on every call (it showed in the profile).
_FIND_LIVE: dict[int, Any] = {}


def _find_live(n: int) -> Any:
    if n not in _FIND_LIVE:
        _FIND_LIVE[n] = select(sessions).where(sessions.c.token_hash.in_(
            [bindparam(f"h{i}", type_=LargeBinary()) for i in range(n)]), _LIVE)
    return _FIND_LIVE[n]
_LIVE_BY_ID = select(sessions.c.id).where(sessions.c.id == bindparam("session_id"), _LIVE)
_IDLE_UNTIL = bindparam("idle_until", type_=UTCDateTime())
_TOUCH_LIVE = update(sessions).where(sessions.c.token_hash.in_(_HASHES), _LIVE).values(
    idle_expires_at=case((sessions.c.expires_at < _IDLE_UNTIL, sessions.c.expires_at),
                         else_=_IDLE_UNTIL)).returning(*sessions.c)


class SessionWrites:
    """Session writes that wait for COMMIT (``tx.later.sessions``)."""

    def __init__(self, unit: Unit) -> None:
        self._unit = unit

    def add(self, s: Session, token_hash: bytes, token_key_id: str, caller: str) -> None:
        """Insert the session before COMMIT (its token is returned once committed)."""
        self._unit.insert_later(sessions, {
            "id": s.session_id, "token_hash": token_hash, "token_key_id": token_key_id,
            "user_id": s.user_id, "factor_id": s.factor_id, "method": s.method.value,
            "application": s.application.value, "caller": caller,
            "authenticated_at": s.authenticated_at, "expires_at": s.expires_at,
            "idle_expires_at": s.idle_expires_at, "revoked_at": None,
            "channel": s.channel.value if s.channel is not None else None,
            "device_id": s.device_id})


class SessionRepository:
    def __init__(self, unit: Unit) -> None:
        self._unit = unit

    async def find_live(self, token_hashes: Sequence[bytes], now: datetime) -> Session | None:
        """The live session (not revoked, neither deadline passed) with one of the hashes.

        PostgreSQL: the hot statement on the raw asyncpg connection (store/hot.py)."""
        if self._unit.postgres:
            return await hot.SessionReads(self._unit.fetchrow).find_live(token_hashes, now)
        params: dict[str, Any] = {f"h{i}": h for i, h in enumerate(token_hashes)}
        params["now"] = now
        row = (await self._unit.execute(_find_live(len(token_hashes)), params)).first()
        return _session(row) if row else None

    async def live_by_id(self, session_id: str, now: datetime) -> bool:
        row = (await self._unit.execute(_LIVE_BY_ID, {"session_id": session_id, "now": now}
                                        )).first()
        return row is not None

    async def touch_live(self, token_hashes: Sequence[bytes], now: datetime,
                         idle_until: datetime) -> Session | None:
        """The live session with one of ``token_hashes``, its idle deadline slid forward.

        One statement: validity (not revoked, neither deadline passed) and the sliding
        idle timeout are decided by the database, never capped past the absolute expiry.
        PostgreSQL: the hot statement (store/hot.py), atomic on its own in autocommit.
        """
        if self._unit.postgres:
            return await hot.SessionReads(self._unit.fetchrow).touch_live(
                token_hashes, now, idle_until)
        row = (await self._unit.execute(_TOUCH_LIVE, {
            "hashes": list(token_hashes), "now": now, "idle_until": idle_until})).first()
        return _session(row) if row else None

    async def _revoke(self, condition: Any, now: datetime) -> list[Session]:
        result = await self._unit.execute(
            update(sessions).where(condition, sessions.c.revoked_at.is_(None),
                                   sessions.c.expires_at > now,
                                   sessions.c.idle_expires_at > now)
            .values(revoked_at=now).returning(*sessions.c))
        ended = [_session(r) for r in result]
        await notify_revoked(self._unit, {s.user_id for s in ended})
        return ended

    async def revoke_by_hash(self, token_hashes: Sequence[bytes], now: datetime) -> list[Session]:
        return await self._revoke(sessions.c.token_hash.in_(list(token_hashes)), now)

    async def revoke_factor(self, user_id: str, factor_id: str,
                            now: datetime) -> list[Session]:
        """End the live sessions a factor created (it was disabled or replaced)."""
        return await self._revoke(and_(sessions.c.user_id == user_id,  # indexed
                                       sessions.c.factor_id == factor_id), now)

    async def revoke_user(self, user_id: str, now: datetime, *,
                          keep_hashes: Sequence[bytes] = ()) -> list[Session]:
        """End the user's live sessions, but the one whose token hash is in
        ``keep_hashes`` (one per key of the ring)."""
        condition = sessions.c.user_id == user_id
        if keep_hashes:
            condition = and_(condition, sessions.c.token_hash.not_in(list(keep_hashes)))
        return await self._revoke(condition, now)

    async def revoke_devices(self, user_id: str, device_ids: Sequence[str],
                             now: datetime) -> list[Session]:
        """End the live sessions the remembered browsers ``device_ids`` opened."""
        return await self._revoke(and_(sessions.c.user_id == user_id,  # indexed
                                       sessions.c.device_id.in_(list(device_ids))), now)


class AuditWrites:
    """The audit trail's appends, which wait for COMMIT (``tx.later.audit``)."""

    def __init__(self, unit: Unit) -> None:
        self._unit = unit

    def record(self, **values: Any) -> None:
        """Append an event before COMMIT (a request's events go as one multi-row INSERT)."""
        self._unit.insert_later(audit_events, values)


class AuditRepository:
    def __init__(self, unit: Unit) -> None:
        self._unit = unit

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
        rows = await self._unit.execute(query.order_by(audit_events.c.id.desc()).limit(limit))
        return [AuditEvent(
            event_id=r.id, occurred_at=r.occurred_at, event=AuditEventType(r.event),
            outcome=AuditOutcome(r.outcome),
            user_id=r.user_id, factor_id=r.factor_id, challenge_id=r.challenge_id,
            session_id=r.session_id, caller=r.caller, application=r.application,
            client_ip=r.client_ip, user_agent=r.user_agent,
            detail=json.loads(r.detail) if r.detail else {}) for r in rows]
