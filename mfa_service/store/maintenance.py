"""Operator statements: which keys the stored values depend on, re-encryption, user reset.

Plain Core through the caller's unit (store/unit.py); the service layer (mfa_service.service.admin)
owns the transactions. Nothing here runs on a request path, so it is kept apart from the
request repositories. As there, every write that could race a running server is a
conditional UPDATE whose row count is the answer, never a read followed by a blind write.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.sql.elements import ColumnElement

from mfa_service.domain import ChallengeState, FactorStatus
from mfa_service.store.engine import notify_every_user, notify_revoked
from mfa_service.store.models import (
    challenges,
    factors,
    outbox,
    recovery_codes,
    sessions,
    trusted_devices,
    user_lockouts,
)
from mfa_service.store.outbox import PENDING
from mfa_service.store.security import LockoutRepository, LockoutState
from mfa_service.store.unit import Unit

# What a key can be needed for, in the order `keys status` prints them. The first two are
# AES-GCM ciphertexts (re-encryptable); the others are HMACs of values we never store.
FACTOR_SECRETS = "factor_secrets"
OUTBOX_PAYLOADS = "outbox_payloads"
LIVE_SESSIONS = "live_sessions"
RECOVERY_CODES = "recovery_codes"
OPEN_CHALLENGES = "open_challenges"
TRUSTED_DEVICES = "trusted_devices"  # remembered browsers' tokens
KEY_USES = (FACTOR_SECRETS, OUTBOX_PAYLOADS, LIVE_SESSIONS, RECOVERY_CODES, OPEN_CHALLENGES,
            TRUSTED_DEVICES)


@dataclass(frozen=True)
class StoredCiphertext:
    """One encrypted value as listed for re-encryption: enough to rebuild its AAD and to
    recognise, at UPDATE time, whether the row still holds exactly this ciphertext."""

    row_id: str
    user_id: str
    key_id: str
    blob: bytes
    kind: str = ""  # factors: the method (each method binds its secret with its own AAD)


# -- key usage ---------------------------------------------------------------------------
async def _count_by_key(unit: Unit, key_column: Any,
                        *where: ColumnElement[bool]) -> dict[str, int]:
    rows = await unit.execute(
        select(key_column, func.count()).where(key_column.is_not(None), *where)
        .group_by(key_column))
    return {str(key_id): int(n) for key_id, n in rows}


async def key_usage(unit: Unit, now: datetime) -> dict[str, dict[str, int]]:
    """For each use in KEY_USES: key id -> number of rows that still need that key.

    Only values that can still be used count: a wiped ciphertext, a used recovery code or
    an expired session needs no key any more. "Live" and "open" mirror the conditions
    the request path applies (SessionRepository.touch_live, ChallengeRepository
    .settle_attempt), so a value counted here is one a request could still present.
    """
    return {
        FACTOR_SECRETS: await _count_by_key(
            unit, factors.c.secret_key_id, factors.c.secret_ciphertext.is_not(None)),
        OUTBOX_PAYLOADS: await _count_by_key(
            unit, outbox.c.payload_key_id, outbox.c.state == PENDING,
            outbox.c.payload_ciphertext.is_not(None)),
        LIVE_SESSIONS: await _count_by_key(
            unit, sessions.c.token_key_id, sessions.c.revoked_at.is_(None),
            sessions.c.expires_at > now, sessions.c.idle_expires_at > now),
        RECOVERY_CODES: await _count_by_key(
            unit, recovery_codes.c.key_id, recovery_codes.c.used_at.is_(None)),
        OPEN_CHALLENGES: await _count_by_key(
            unit, challenges.c.code_key_id, challenges.c.state == ChallengeState.OPEN.value,
            challenges.c.code_hash.is_not(None), challenges.c.expires_at > now),
        # As DeviceRepository.recognize sees live (a key removed while browsers still
        # hold tokens under it would make each of them count as a guess).
        TRUSTED_DEVICES: await _count_by_key(
            unit, trusted_devices.c.token_key_id, trusted_devices.c.revoked_at.is_(None),
            trusted_devices.c.expires_at > now, trusted_devices.c.idle_expires_at > now),
    }


# -- re-encryption -----------------------------------------------------------------------
async def factor_secrets_to_rekey(unit: Unit, primary_id: str, *,
                                  after: str | None, limit: int) -> list[StoredCiphertext]:
    """Up to ``limit`` factor secrets not under ``primary_id``, by id, ids after ``after``.

    Keyset pagination: a row that fails (or is skipped) is not listed again in the same
    run, so the run ends even while some rows cannot be re-encrypted.
    """
    query = (select(factors.c.id, factors.c.user_id, factors.c.secret_key_id,
                    factors.c.secret_ciphertext, factors.c.method)
             .where(factors.c.secret_ciphertext.is_not(None),
                    factors.c.secret_key_id != primary_id)
             .order_by(factors.c.id).limit(limit))
    if after is not None:
        query = query.where(factors.c.id > after)
    return [StoredCiphertext(r.id, r.user_id, r.secret_key_id, r.secret_ciphertext, r.method)
            for r in await unit.execute(query)]


async def rekey_factor_secret(unit: Unit, old: StoredCiphertext, key_id: str,
                              blob: bytes) -> bool:
    """Store the re-encrypted secret only if the row still holds ``old``; False if not.

    A factor disabled meanwhile has its secret wiped (crypto-shredding): matching on the
    old key id *and* ciphertext means that wipe is never undone by a stale copy.
    """
    count = await unit.write(
        update(factors).where(factors.c.id == old.row_id,
                              factors.c.secret_key_id == old.key_id,
                              factors.c.secret_ciphertext == old.blob)
        .values(secret_key_id=key_id, secret_ciphertext=blob))
    return count == 1


async def outbox_payloads_to_rekey(unit: Unit, primary_id: str, *,
                                   after: str | None, limit: int) -> list[StoredCiphertext]:
    """Up to ``limit`` pending outbox bodies not under ``primary_id`` (keyset by id)."""
    query = (select(outbox.c.id, outbox.c.user_id, outbox.c.payload_key_id,
                    outbox.c.payload_ciphertext)
             .where(outbox.c.state == PENDING, outbox.c.payload_ciphertext.is_not(None),
                    outbox.c.payload_key_id != primary_id)
             .order_by(outbox.c.id).limit(limit))
    if after is not None:
        query = query.where(outbox.c.id > after)
    return [StoredCiphertext(r.id, r.user_id, r.payload_key_id, r.payload_ciphertext)
            for r in await unit.execute(query)]


async def rekey_outbox_payload(unit: Unit, old: StoredCiphertext, key_id: str,
                               blob: bytes) -> bool:
    """Store the re-encrypted body only if the row is still pending with ``old``.

    Settling a message wipes ``payload_ciphertext`` but leaves ``payload_key_id`` as it
    was (OutboxRepository.settle), so the key id alone would not notice a message sent
    meanwhile: the state and the ciphertext are part of the condition too.
    """
    count = await unit.write(
        update(outbox).where(outbox.c.id == old.row_id, outbox.c.state == PENDING,
                             outbox.c.payload_key_id == old.key_id,
                             outbox.c.payload_ciphertext == old.blob)
        .values(payload_key_id=key_id, payload_ciphertext=blob))
    return count == 1


# -- the support desk's reset of one user ------------------------------------------------
async def clear_lockout(unit: Unit, user_id: str) -> bool:
    """Clear the user's lockout counter, in place; True if it held anything (a failure, a
    lock, the hard limit).

    Run first in the reset, through the per-user lock every Verify takes before anything
    else (LockoutRepository.lock): a concurrent Verify waits for the reset instead of
    deadlocking with it, and, as after every lock, finds the counter's lock_version one
    more, so it knows the reset committed while it waited (store/hot.py). The row stays.
    """
    state = await LockoutRepository(unit).lock(user_id)
    if state == LockoutState(0, None, None, False):
        return False
    await unit.execute(update(user_lockouts).where(user_lockouts.c.user_id == user_id).values(
        consecutive_failures=0, last_failure_at=None, locked_until=None,
        admin_reset_required=False))
    return True


async def disable_user_factors(unit: Unit, user_id: str, now: datetime) -> int:
    """Disable every factor of the user that is not disabled yet, wiping its secret."""
    count = await unit.write(
        update(factors).where(factors.c.user_id == user_id,
                              factors.c.status != FactorStatus.DISABLED.value)
        .values(status=FactorStatus.DISABLED.value, disabled_at=now,
                secret_ciphertext=None, secret_key_id=None))
    return count


async def retire_recovery_codes(unit: Unit, user_id: str, now: datetime) -> int:
    """Mark the user's unused recovery codes used, so none of them opens a session."""
    count = await unit.write(
        update(recovery_codes).where(recovery_codes.c.user_id == user_id,
                                     recovery_codes.c.used_at.is_(None))
        .values(used_at=now))
    return count


async def revoke_user_sessions(unit: Unit, user_id: str, now: datetime) -> int:
    """Revoke the user's live sessions (the request path's definition of live), and tell
    the running servers' session caches (NOTIFY, on commit)."""
    count = await unit.write(
        update(sessions).where(sessions.c.user_id == user_id, sessions.c.revoked_at.is_(None),
                               sessions.c.expires_at > now, sessions.c.idle_expires_at > now)
        .values(revoked_at=now))
    if count:
        await notify_revoked(unit, {user_id})
    return count


async def forget_user_devices(unit: Unit, user_id: str, now: datetime) -> int:
    """Forget the user's live remembered browsers (service/devices.py: the same
    condition); the sessions they opened end with the user's other sessions here."""
    return await unit.write(
        update(trusted_devices).where(trusted_devices.c.user_id == user_id,
                                      trusted_devices.c.revoked_at.is_(None),
                                      trusted_devices.c.expires_at > now,
                                      trusted_devices.c.idle_expires_at > now)
        .values(revoked_at=now))


async def end_every_session(unit: Unit, now: datetime) -> tuple[int, int]:
    """End every live session and forget every live remembered browser, of every user;
    (sessions, browsers). Every server's session cache empties (NOTIFY, on commit)."""
    sessions_ended = await unit.write(
        update(sessions).where(sessions.c.revoked_at.is_(None), sessions.c.expires_at > now,
                               sessions.c.idle_expires_at > now)
        .values(revoked_at=now))
    devices_forgotten = await unit.write(
        update(trusted_devices).where(trusted_devices.c.revoked_at.is_(None),
                                      trusted_devices.c.expires_at > now,
                                      trusted_devices.c.idle_expires_at > now)
        .values(revoked_at=now))
    await notify_every_user(unit)
    return sessions_ended, devices_forgotten


async def close_open_challenges(unit: Unit, user_id: str) -> int:
    """Close the user's open challenges. The dispatcher drops a code message whose
    challenge is no longer open, so codes still queued for sending die with them."""
    count = await unit.write(
        update(challenges).where(challenges.c.user_id == user_id,
                                 challenges.c.state == ChallengeState.OPEN.value)
        .values(state=ChallengeState.SUPERSEDED.value))
    return count

