"""Remembered browsers (trusted devices) and the per-IP count of unknown device tokens.

As for sessions, the browser's token is looked up by its HMAC under every key of the ring
(never compared in Python), recognition is one conditional UPDATE that also slides the
idle deadline (so a forgotten or expired device is never touched), and forgetting is one
conditional UPDATE whose RETURNING says what ended. Callers hold the user's lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import LargeBinary, String, and_, bindparam, case, exists, select, update
from sqlalchemy.engine import Row

from mfa_service.domain import Application, FactorStatus, Method, TrustedDevice
from mfa_service.store.engine import count_device_miss, lock_keys
from mfa_service.store.models import UTCDateTime, device_misses, factors, trusted_devices
from mfa_service.store.unit import Unit

_NOW = bindparam("now", type_=UTCDateTime())
_HASHES = bindparam("hashes", expanding=True, type_=LargeBinary())
# Not named after columns: an UPDATE reserves those names for its SET values.
_USER = bindparam("b_user_id", type_=String())
_LIVE = and_(trusted_devices.c.revoked_at.is_(None), trusted_devices.c.expires_at > _NOW,
             trusted_devices.c.idle_expires_at > _NOW)
# Recognised only while the factor whose code remembered it is ACTIVE: every factor change
# forgets the user's devices anyway (service/devices.py), this keeps it so should one be
# missed.
_FACTOR_ACTIVE = exists().where(factors.c.id == trusted_devices.c.factor_id,
                                factors.c.status == FactorStatus.ACTIVE.value)
_IDLE_UNTIL = bindparam("idle_until", type_=UTCDateTime())
_RECOGNIZE = update(trusted_devices).where(
    trusted_devices.c.token_hash.in_(_HASHES), trusted_devices.c.user_id == _USER,
    trusted_devices.c.application == bindparam("b_application", type_=String()),
    _LIVE, _FACTOR_ACTIVE,
).values(last_used_at=_NOW, idle_expires_at=case(
    (trusted_devices.c.expires_at < _IDLE_UNTIL, trusted_devices.c.expires_at),
    else_=_IDLE_UNTIL)).returning(*trusted_devices.c)
_KNOWN = select(trusted_devices.c.id).where(
    trusted_devices.c.token_hash.in_(_HASHES), trusted_devices.c.user_id == _USER).limit(1)
_LIST = select(trusted_devices).where(trusted_devices.c.user_id == _USER, _LIVE,
                                      _FACTOR_ACTIVE).order_by(
    trusted_devices.c.last_used_at.desc(), trusted_devices.c.id)


def _device(row: Row[Any]) -> TrustedDevice:
    return TrustedDevice(
        device_id=row.id, user_id=row.user_id, label=row.label,
        application=Application(row.application), factor_id=row.factor_id,
        method=Method(row.method), created_at=row.created_at, last_used_at=row.last_used_at,
        expires_at=row.expires_at, idle_expires_at=row.idle_expires_at)


class DeviceWrites:
    """Device writes that wait for COMMIT (``tx.later.devices``)."""

    def __init__(self, unit: Unit) -> None:
        self._unit = unit

    def add(self, d: TrustedDevice, token_hash: bytes, token_key_id: str, caller: str) -> None:
        """Insert the remembered browser before COMMIT (its token is returned once
        committed)."""
        self._unit.insert_later(trusted_devices, {
            "id": d.device_id, "user_id": d.user_id, "token_hash": token_hash,
            "token_key_id": token_key_id, "label": d.label,
            "application": d.application.value, "factor_id": d.factor_id,
            "method": d.method.value, "caller": caller, "created_at": d.created_at,
            "last_used_at": d.last_used_at, "expires_at": d.expires_at,
            "idle_expires_at": d.idle_expires_at, "revoked_at": None})


class DeviceRepository:
    def __init__(self, unit: Unit) -> None:
        self._unit = unit

    async def recognize(self, token_hashes: Sequence[bytes], user_id: str,
                        application: Application, now: datetime,
                        idle_until: datetime) -> TrustedDevice | None:
        """The live device of ``user_id`` on ``application`` with one of the hashes, its
        idle deadline slid to ``idle_until`` (never past its absolute end), or None.

        One statement: liveness, the binding to the user and the application, and the
        slide are decided by the database; a device forgotten meanwhile matches nothing.
        """
        row = (await self._unit.execute(_RECOGNIZE, {
            "hashes": list(token_hashes), "b_user_id": user_id,
            "b_application": application.value, "now": now,
            "idle_until": idle_until})).first()
        return _device(row) if row else None

    async def known(self, token_hashes: Sequence[bytes], user_id: str) -> bool:
        """Whether the token is one of ``user_id``'s devices, live or not (a browser that
        still holds the token of a device that ended is not guessing)."""
        row = (await self._unit.execute(_KNOWN, {"hashes": list(token_hashes),
                                                 "b_user_id": user_id})).first()
        return row is not None

    async def list_live(self, user_id: str, now: datetime) -> list[TrustedDevice]:
        """The user's devices that would be recognised now, most recently used first."""
        rows = await self._unit.execute(_LIST, {"b_user_id": user_id, "now": now})
        return [_device(r) for r in rows]

    async def revoke(self, user_id: str, now: datetime, *, device_id: str | None = None,
                     keep_newest: int | None = None) -> list[TrustedDevice]:
        """Forget the user's live devices (only ``device_id``; or all but the
        ``keep_newest`` most recently used); the ones that ended."""
        live = and_(trusted_devices.c.user_id == user_id,
                    trusted_devices.c.revoked_at.is_(None),
                    trusted_devices.c.expires_at > now,
                    trusted_devices.c.idle_expires_at > now)
        condition: Any = live
        if device_id is not None:
            condition = and_(live, trusted_devices.c.id == device_id)
        if keep_newest is not None:
            beyond = (select(trusted_devices.c.id).where(live)
                      .order_by(trusted_devices.c.last_used_at.desc(),
                                trusted_devices.c.id.desc())
                      .offset(keep_newest).scalar_subquery())
            condition = and_(live, trusted_devices.c.id.in_(beyond))
        # It reads and writes only trusted_devices, which no deferred write changes before
        # it (remembering adds its new device after this): the deferred writes can wait
        # (a login that remembers its browser stays at 5 statements).
        result = await self._unit.execute(
            update(trusted_devices).where(condition).values(revoked_at=now)
            .returning(*trusted_devices.c), sees_deferred=False)
        return [_device(r) for r in result]

    async def lock_address(self, ip_key: bytes) -> None:
        """Hold the address's lock until the transaction ends: its misses are counted one
        request after another, whichever users they name (PostgreSQL: an advisory lock;
        SQLite's BEGIN IMMEDIATE already serialises writers)."""
        await self._unit.flush()
        await lock_keys(self._unit, (ip_key,))

    async def misses(self, ip_key: bytes, window_since: datetime,
                     ) -> tuple[int, datetime] | None:
        """(misses, start of the window) of the address's current window, or None."""
        row = (await self._unit.execute(
            select(device_misses.c.misses, device_misses.c.window_started_at).where(
                device_misses.c.ip_key == ip_key,
                device_misses.c.window_started_at > window_since))).first()
        return (int(row.misses), row.window_started_at) if row else None

    async def count_miss(self, ip_key: bytes, now: datetime, window_since: datetime) -> None:
        """One more unknown token from the address (a new window once the old one ended)."""
        await self._unit.execute(count_device_miss(self._unit.dialect, ip_key, now,
                                                   window_since))
