"""Remembered browsers ("trusted devices"): "remember this browser" on a login, a 2FA
session without a code when the browser comes back, the user's list, and forgetting.

A browser is remembered by a Verify of a PURPOSE_LOGIN challenge with ``remember_device``,
approved by a real factor (an authenticator app, email, phone or passkey; a recovery code
never: service/policy.py, REMEMBER_DEVICE). It gets a device token: 256 random bits,
returned once; only its HMAC is stored, keyed through the Keyring as session tokens are,
and looked up by that HMAC under every key of the ring. The device is bound to the user
and to the application it was remembered on.

RecognizeDevice opens a session on a live device of that user without a code. The
session records the device (``Session.device_id``): CheckSession reports it as
``trusted_device`` (no amr, not AAL2), and to the proof model it is only "a remembered
browser's session", weaker than a session from a code, never fresh: adding a factor,
changing the phone or anything else the table guards still asks for a code.

A device ends ``MFA_TRUSTED_DEVICE_DAYS`` after it was remembered, or
``MFA_TRUSTED_DEVICE_IDLE_DAYS`` after it was last recognised, and is forgotten - with the
sessions it opened - by :func:`forget`, the one place that takes trust away, reached by:

- every change to the user's factors: Notifier.notify (service/notices.py), the step every
  such change takes, calls ``ForgetOnFactorChange``;
- RevokeSession(user_id), log out everywhere (SessionService.revoke_user);
- ForgetDevice, one browser (``TrustedDevices.forget_one``);
- remembering an eleventh browser: the least recently used goes;
- an administrator's reset (service/admin.py, store/maintenance.py: the same UPDATE
  beside the rest of the reset).

Unknown tokens are guesses: each counts as a failed verification against the user's
lockout (service/limits.py: 5 lock for a minute, doubling) and against the client
address (``DeviceRules.misses_per_address`` an hour, IPv6 by /64). A token of a device of
the user that ended (forgotten, expired, another application) is not a guess: the
browser simply kept it; it is answered "not recognised" without counting.
"""

from __future__ import annotations

import hashlib
import ipaddress
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

from mfa.v1.error_reason_pb2 import ErrorReason

from mfa_service.clock import Clock
from mfa_service.crypto import Keyring, new_token
from mfa_service.domain import (
    Application,
    AuditContext,
    Challenge,
    Factor,
    ForgetScope,
    Method,
    NewDevice,
    NewSession,
    Purpose,
    TrustedDevice,
)
from mfa_service.errors import DeviceNotFound, FailedPrecondition, ResourceExhausted
from mfa_service.service import audit, policy
from mfa_service.service.policy import Change, Evidence
from mfa_service.store.database import Database, Transaction
from mfa_service.store.security import LockoutState

if TYPE_CHECKING:  # both import this module (a hook each)
    from mfa_service.service.lockout import Lockout
    from mfa_service.service.sessions import SessionService


class NotRecognized(StrEnum):
    """Why RecognizeDevice said no (audit detail "reason")."""

    UNKNOWN = "unknown"  # no device of this user has the token: a guess, counted
    NOT_LIVE = "not_live"  # the user's device that ended, or of another application


@dataclass(frozen=True)
class DeviceRules:
    """The limits of remembered browsers (settings.py bounds the configurable ones)."""

    lifetime: timedelta = timedelta(days=30)  # MFA_TRUSTED_DEVICE_DAYS, at most 90
    idle: timedelta = timedelta(days=14)  # MFA_TRUSTED_DEVICE_IDLE_DAYS
    # Live remembered browsers per user: remembering one more forgets the least recently
    # used (nobody uses ten browsers; an endless list only hides a stranger's).
    max_per_user: int = 10
    # Unknown device tokens from one client address (an IPv6 /64) per window, whichever
    # users they name (MFA_TRUSTED_DEVICE_MISSES_PER_IP).
    misses_per_address: int = 20
    miss_window: timedelta = timedelta(hours=1)


def _token_message(token: str) -> bytes:
    return b"mfa-service/v1/device/" + token.encode()


def _proof_of(factor: Factor) -> Evidence:
    """What the approved login proved, for the proof model."""
    return (Evidence.RECOVERY_CODE if factor.method is Method.RECOVERY_CODE
            else Evidence.PROOF_WITH_ACTIVE)


def address_key(client_ip: str) -> bytes:
    """The key under which unknown tokens from ``client_ip`` are counted: its IPv6 /64
    (one subscriber gets a whole /64, so a single address would be no limit), or the
    IPv4 address. A hash: the table needs no address in the clear."""
    ip = ipaddress.ip_address(client_ip.split("%", 1)[0])
    network = (ipaddress.ip_network(f"{ip}/64", strict=False) if ip.version == 6
               else ipaddress.ip_network(f"{ip}/32"))
    return hashlib.sha256(b"mfa-service/v1/device-miss/" + str(network).encode()).digest()


async def forget(tx: Transaction, sessions: SessionService, user_id: str,
                 who: AuditContext, now: datetime, scope: ForgetScope, *,
                 device_id: str | None = None,
                 keep_newest: int | None = None) -> tuple[list[TrustedDevice], int]:
    """Forget the user's live remembered browsers (only ``device_id``, or all but the
    ``keep_newest`` most recently used) and end the sessions they opened; audited one row
    per browser. The devices that ended, and how many sessions ended with them.

    The one place trust is taken away (see the module doc for who calls it); the caller
    holds the user's lock."""
    gone = await tx.devices.revoke(user_id, now, device_id=device_id, keep_newest=keep_newest)
    for d in gone:
        audit.record(tx, now, audit.Event.DEVICE_FORGOTTEN, audit.Outcome.OK, who,
                     user_id=user_id, factor_id=d.factor_id, application=d.application,
                     detail={"scope": scope.value, "device_id": d.device_id})
    ended = 0
    if gone:
        ended = await sessions.end_for_devices(tx, user_id, [d.device_id for d in gone],
                                               who, now)
    return gone, ended


class ForgetOnFactorChange:
    """Notifier's ``on_factor_change`` (service/notices.py): a change to the user's factors
    forgets every browser they remembered. Trust was given by the factors the user had;
    after an app was added, a phone changed or recovery codes were used, a browser must
    prove itself with a code again (a thief's remembered browser included)."""

    def __init__(self, sessions: SessionService) -> None:
        self._sessions = sessions

    async def __call__(self, tx: Transaction, now: datetime, user_id: str,
                       who: AuditContext) -> None:
        await forget(tx, self._sessions, user_id, who, now, ForgetScope.FACTOR_CHANGED)


class TrustedDevices:
    """RecognizeDevice, ListDevices, ForgetDevice, and Verify's two hooks."""

    def __init__(self, db: Database, clock: Clock, keyring: Keyring,
                 sessions: SessionService, lockout: Lockout, rules: DeviceRules) -> None:
        self._db = db
        self._clock = clock
        self._keyring = keyring
        self._sessions = sessions
        self._lockout = lockout
        self._rules = rules

    # -- Verify's hooks (service/verification.py) -----------------------------------------
    @staticmethod
    def check_remember(challenge: Challenge, factor: Factor) -> None:
        """Before the code is checked (a refusal costs no attempt): may approving this
        challenge remember the browser? A login, proven by a real factor."""
        if challenge.purpose is not Purpose.LOGIN:
            raise FailedPrecondition(
                "remember_device is only for a PURPOSE_LOGIN challenge",
                reason=ErrorReason.ERROR_REASON_REMEMBER_DEVICE_NOT_ALLOWED)
        policy.require(Change.REMEMBER_DEVICE, {_proof_of(factor)})

    async def remember(self, tx: Transaction, factor: Factor, application: Application,
                       label: str, session: NewSession, who: AuditContext,
                       now: datetime) -> NewDevice:
        """Remember the browser of a login just approved (in its transaction): a new
        device token, stored as its HMAC with the login's deferred writes."""
        rules = self._rules
        policy.require(Change.REMEMBER_DEVICE, {_proof_of(factor)})  # as check_remember
        # Room for this one: the least recently used beyond the limit are forgotten.
        await forget(tx, self._sessions, factor.user_id, who, now, ForgetScope.TOO_MANY,
                     keep_newest=rules.max_per_user - 1)
        token = new_token()  # 256 bits, as a session token
        key_id, digest = self._keyring.mac(_token_message(token))
        expires = now + rules.lifetime
        device = TrustedDevice(
            device_id=str(uuid.uuid4()), user_id=factor.user_id, label=label,
            application=application, factor_id=factor.factor_id, method=factor.method,
            created_at=now, last_used_at=now, expires_at=expires,
            idle_expires_at=min(now + rules.idle, expires))
        tx.later.devices.add(device, digest, key_id, who.caller)
        audit.record(tx, now, audit.Event.DEVICE_REMEMBERED, audit.Outcome.OK, who,
                     user_id=device.user_id, factor_id=device.factor_id,
                     session_id=session.session.session_id, application=application,
                     detail={"device_id": device.device_id, "method": factor.method.value})
        return NewDevice(device=device, token=token)

    # -- RecognizeDevice ------------------------------------------------------------------
    async def recognize(self, user_id: str, token: str, application: Application,
                        who: AuditContext) -> tuple[NewSession, TrustedDevice] | None:
        """A session for the browser holding ``token``, if it is a live remembered
        browser of ``user_id`` on ``application``; None (and, for an unknown token, a
        failure counted) otherwise."""
        who.authorize(application)
        rules = self._rules
        now = self._clock.now()
        hashes = self._keyring.mac_all(_token_message(token))
        async with self._db.transaction() as tx:
            # The per-user lock first (the same order as every other writing call).
            lockout = await tx.lockouts.lock(user_id)
            self._lockout.refuse_if_locked(lockout, now)
            address = address_key(who.client_ip) if who.client_ip else None
            if address is not None:
                await self._refuse_if_address_limited(tx, address, now)
            device = await tx.devices.recognize(hashes, user_id, application, now,
                                                now + rules.idle)
            if device is None:
                await self._not_recognized(tx, hashes, user_id, application, lockout,
                                           address, who, now)
                return None
            policy.require(Change.LOG_IN_REMEMBERED, {Evidence.DEVICE_TOKEN})
            session = self._sessions.open_trusted(tx, device, application, who, now)
            audit.record(tx, now, audit.Event.DEVICE_RECOGNIZED, audit.Outcome.OK, who,
                         user_id=user_id, factor_id=device.factor_id,
                         session_id=session.session.session_id, application=application,
                         detail={"device_id": device.device_id})
        return session, device

    async def _refuse_if_address_limited(self, tx: Transaction, address: bytes,
                                         now: datetime) -> None:
        rules = self._rules
        await tx.devices.lock_address(address)
        window = await tx.devices.misses(address, now - rules.miss_window)
        if window is not None and window[0] >= rules.misses_per_address:
            raise ResourceExhausted(
                "too many unknown device tokens came from this address; wait before "
                "trying again",
                retry_after_seconds=(window[1] + rules.miss_window - now).total_seconds(),
                reason=ErrorReason.ERROR_REASON_UNRECOGNIZED_DEVICES_RATE_LIMITED)

    async def _not_recognized(self, tx: Transaction, hashes: list[bytes], user_id: str,
                              application: Application, lockout: LockoutState,
                              address: bytes | None, who: AuditContext,
                              now: datetime) -> None:
        if await tx.devices.known(hashes, user_id):
            audit.record(tx, now, audit.Event.DEVICE_NOT_RECOGNIZED, audit.Outcome.FAILED,
                         who, user_id=user_id, application=application,
                         detail={"reason": NotRecognized.NOT_LIVE.value})
            return
        # A guess (or a token of another user): counted like a wrong code, so the
        # lockout's waits bound it (service/lockout.py), and per address whichever users
        # it names.
        if address is not None:
            await tx.devices.count_miss(address, now, now - self._rules.miss_window)
        audit.record(tx, now, audit.Event.DEVICE_NOT_RECOGNIZED, audit.Outcome.FAILED, who,
                     user_id=user_id, application=application,
                     detail={"reason": NotRecognized.UNKNOWN.value})
        await self._lockout.count_failure(tx, lockout, user_id=user_id,
                                          application=application, factor_id=None,
                                          who=who, now=now)

    # -- ListDevices, ForgetDevice --------------------------------------------------------
    async def list_devices(self, user_id: str, who: AuditContext) -> list[TrustedDevice]:
        """The user's browsers that would be recognised now, most recently used first."""
        who.authorize_any()  # a caller with no application (an audit reader) sees nothing
        now = self._clock.now()
        async with self._db.transaction(readonly=True) as tx:
            return await tx.devices.list_live(user_id, now)

    async def forget_one(self, user_id: str, device_id: str, who: AuditContext) -> int:
        """Forget one of the user's remembered browsers; how many of its sessions ended.
        Another user's, an unknown or an ended one is "not found"."""
        who.authorize_any()
        policy.require(Change.FORGET_DEVICE, {Evidence.CALLER})
        now = self._clock.now()
        async with self._db.transaction() as tx:
            await tx.lockouts.lock(user_id)
            gone, ended = await forget(tx, self._sessions, user_id, who, now,
                                       ForgetScope.FORGOTTEN, device_id=device_id)
            if not gone:
                raise DeviceNotFound()
        return ended
