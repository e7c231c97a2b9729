"""TwoFactorService's rules, one transaction per call, the same for every factor method.

The method-specific parts (what a destination is, what a code looks like, whether it
matches) come from the factor registry; everything else lives here once: ownership
checks, the factor lifecycle, challenge single use and attempt limits, and sessions.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from mfa_service.clock import Clock
from mfa_service.crypto import Keyring
from mfa_service.delivery.outbox import enqueue
from mfa_service.delivery.templates import code_message
from mfa_service.domain import (
    Application,
    AuditContext,
    AuditEvent,
    Challenge,
    ChallengeState,
    Channel,
    Factor,
    FactorRecord,
    FactorStatus,
    Method,
    NewSession,
    Outgoing,
    Purpose,
    VerifyResult,
)
from mfa_service.errors import (
    ChallengeNotFound,
    FactorNotFound,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    StoreConflict,
)
from mfa_service.factors.base import EnrollInput, FactorMethod, Provisioning
from mfa_service.factors.codes import destination_key, hash_code
from mfa_service.factors.recovery import generate_codes as generate_recovery_codes
from mfa_service.factors.recovery import hash_codes as hash_recovery_codes
from mfa_service.factors.registry import FactorRegistry
from mfa_service.service import audit
from mfa_service.service.limits import LockoutPolicy
from mfa_service.service.notices import Notifier
from mfa_service.service.sessions import SessionService
from mfa_service.store.database import Database, Transaction
from mfa_service.store.security import LockoutState


@dataclass(frozen=True)
class Rules:
    """The limits of SPEC.md, already bounded by Settings."""

    code_ttl: timedelta = timedelta(minutes=5)
    max_attempts: int = 5
    max_factors_per_user: int = 20
    resend_cooldown: timedelta = timedelta(seconds=30)
    max_sends: int = 5
    send_window: timedelta = timedelta(minutes=10)
    max_sends_per_destination: int = 5
    change_proof_max_age: timedelta = timedelta(minutes=10)
    product: str = "Cloud Platform"
    default_locale: str = "en"
    recent_session: timedelta = timedelta(minutes=10)


@dataclass(frozen=True)
class EnrollCommand:
    user_id: str
    method: Method
    application: Application
    email: str = ""
    phone_number: str = ""
    channel: Channel | None = None
    account_name: str = ""
    change_proof_challenge_id: str | None = None
    locale: str = ""
    session_token: str = ""  # step-up proof once the user has an ACTIVE factor


@dataclass(frozen=True)
class EnrollResult:
    factor: Factor
    challenge: Challenge
    code_length: int
    provisioning: Provisioning | None


@dataclass(frozen=True)
class ChallengeCommand:
    user_id: str
    factor_id: str
    purpose: Purpose
    application: Application
    channel: Channel | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class ChallengeResult:
    challenge: Challenge
    factor: Factor
    code_length: int
    resend_available_at: datetime


@dataclass(frozen=True)
class VerifyOutcome:
    result: VerifyResult
    attempts_remaining: int
    session: NewSession | None = None
    factor: Factor | None = None
    recovery_codes: tuple[str, ...] = ()
    enqueued: bool = False  # a message was queued: wake the dispatcher after commit


def _new_id() -> str:
    return str(uuid.uuid4())


# Which factor status each purpose needs before a challenge may be opened or approved.
_NEEDS_STATUS = {
    Purpose.LOGIN: FactorStatus.ACTIVE,
    Purpose.DISABLE: FactorStatus.ACTIVE,
    Purpose.CHANGE_PHONE: FactorStatus.ACTIVE,
    Purpose.CONFIRM_ENROLLMENT: FactorStatus.PENDING,
}


def _require_status(factor: Factor, purpose: Purpose) -> None:
    if factor.status is FactorStatus.DISABLED:
        raise FailedPrecondition("the factor is disabled", reason="ERROR_REASON_FACTOR_DISABLED")
    needed = _NEEDS_STATUS[purpose]
    if factor.status is not needed:
        raise FailedPrecondition(
            f"this purpose needs a {needed.value} factor; the factor is {factor.status.value}",
            reason="ERROR_REASON_FACTOR_STATUS_FORBIDS",
            metadata={"factorStatus": factor.status.value})


def _already_enrolled() -> FailedPrecondition:
    return FailedPrecondition(
        "the user already has an active factor of this method; disable it first",
        reason="ERROR_REASON_ALREADY_ENROLLED")


def _nothing() -> None:
    return None


class TwoFactorService:
    def __init__(self, db: Database, registry: FactorRegistry, keyring: Keyring, clock: Clock,
                 sessions: SessionService, rules: Rules, notifier: Notifier,
                 new_id: Callable[[], str] = _new_id,
                 on_enqueue: Callable[[], None] = _nothing,
                 lockout: LockoutPolicy | None = None) -> None:
        self._db = db
        self._registry = registry
        self._keyring = keyring
        self._clock = clock
        self._sessions = sessions
        self._rules = rules
        self._notifier = notifier
        self._new_id = new_id
        # Wakes the dispatcher once a transaction that queued a message has committed.
        self._on_enqueue = on_enqueue
        self._lockout = lockout or LockoutPolicy()

    # -- Enroll ----------------------------------------------------------------------------
    async def enroll(self, cmd: EnrollCommand, who: AuditContext) -> EnrollResult:
        who.authorize(cmd.application)
        if cmd.method is Method.RECOVERY_CODE:
            raise InvalidArgument.single(
                "method", "recovery codes are issued with the first active factor, not enrolled")
        method = self._registry.get(cmd.method)
        channel = method.channel_for(cmd.channel)
        factor_id = self._new_id()
        # Secret generation, encryption and the QR image happen before the transaction
        # opens, so no database connection waits on CPU work.
        material = method.begin_enrollment(EnrollInput(
            factor_id=factor_id, user_id=cmd.user_id, email=cmd.email,
            phone_number=cmd.phone_number, channel=channel, account_name=cmd.account_name))
        now = self._clock.now()
        factor = Factor(factor_id=factor_id, user_id=cmd.user_id, method=cmd.method,
                        status=FactorStatus.PENDING,
                        masked_destination=material.masked_destination, created_at=now)
        async with self._db.transaction() as tx:
            # The per-user lock first (store/security.py: lock order), then the same
            # refusals as Challenge: no codes while locked out.
            self._refuse_if_locked(await tx.lockouts.lock(cmd.user_id), now)
            await self._require_step_up(tx, cmd, now)
            live = await tx.factors.count_for_user(
                cmd.user_id, [FactorStatus.PENDING, FactorStatus.ACTIVE])
            if live >= self._rules.max_factors_per_user:
                raise FailedPrecondition("the user has too many factors; disable one first",
                                         reason="ERROR_REASON_TOO_MANY_FACTORS")
            replaces = await self._replaced_factor(tx, cmd, now)
            if method.sends_code:
                assert material.destination is not None
                await self._check_send_rate(tx, cmd.user_id, cmd.method, None,
                                            material.destination, now)
            # A newer enrolment replaces an unconfirmed one (a QR code scanned earlier and
            # never confirmed must not become usable later).
            await tx.factors.supersede_pending(cmd.user_id, cmd.method, now)
            record = FactorRecord(
                factor=factor, label=material.label, destination=material.destination,
                secret_ciphertext=material.secret_ciphertext,
                secret_key_id=material.secret_key_id, last_totp_step=None,
                locale=cmd.locale or self._rules.default_locale, replaces_factor_id=replaces)
            await tx.factors.add(record)
            challenge = await self._open_challenge(
                tx, method, record, Purpose.CONFIRM_ENROLLMENT, cmd.application, channel,
                None, who, now)
            await audit.record(tx, now, audit.Event.ENROLL, "ok", who, user_id=cmd.user_id,
                               factor_id=factor_id, challenge_id=challenge.challenge_id,
                               application=cmd.application,
                               detail={"method": cmd.method.value,
                                       **({"replaces": replaces} if replaces else {})})
        if method.sends_code:
            self._on_enqueue()
        return EnrollResult(factor=factor, challenge=challenge, code_length=method.code_length,
                            provisioning=material.provisioning)

    async def _require_step_up(self, tx: Transaction, cmd: EnrollCommand,
                               now: datetime) -> None:
        """Adding a factor needs the factor you have (SPEC, OWASP MFA "changing factors").

        Once the user has any ACTIVE factor, Enroll (every method, a phone change too)
        needs a 2FA session of this same user that passed 2FA in the last 10 minutes.
        Otherwise whoever holds the password step could add an app, log in with it and
        walk around "disabling needs the enabled method" and "changing the phone needs
        the old number". Checked under the per-user lock, in the enrolling transaction.
        """
        if not await tx.factors.has_active(cmd.user_id):
            return  # the first factor needs no session
        await self._sessions.require_recent(tx, cmd.session_token, cmd.user_id, now,
                                            self._rules.recent_session, "adding a factor")

    async def _replaced_factor(self, tx: Transaction, cmd: EnrollCommand,
                               now: datetime) -> str | None:
        """The ACTIVE factor this enrolment will replace (a phone change), or None.

        One ACTIVE factor per method: a second one is refused, except a new phone number
        proven by a fresh, unused PURPOSE_CHANGE_PHONE approval on the old one (OWASP
        "changing factors": the old factor must consent).
        """
        active = await tx.factors.active_of_method(cmd.user_id, cmd.method)
        if active is None:
            if cmd.change_proof_challenge_id is not None:
                raise InvalidArgument.single("change_proof_challenge_id",
                                             "the user has no active phone to change")
            return None
        if cmd.method is not Method.PHONE:
            raise _already_enrolled()
        if cmd.change_proof_challenge_id is None:
            raise FailedPrecondition(
                "a phone is already active: verify a PURPOSE_CHANGE_PHONE challenge on it and "
                "pass its id as change_proof_challenge_id",
                reason="ERROR_REASON_PHONE_CHANGE_PROOF_REQUIRED")
        if not await tx.challenges.consume_change_proof(
                cmd.change_proof_challenge_id, active.factor.factor_id,
                now - self._rules.change_proof_max_age, now):
            raise FailedPrecondition(
                "change_proof_challenge_id must be an approved PURPOSE_CHANGE_PHONE challenge "
                "on the current phone, from the last 10 minutes, not used before",
                reason="ERROR_REASON_PHONE_CHANGE_PROOF_REQUIRED")
        return active.factor.factor_id

    async def _check_send_rate(self, tx: Transaction, user_id: str, method: Method,
                               factor_id: str | None, destination: str,
                               now: datetime) -> None:
        """The send limits of SPEC.md, decided in the transaction that will send.

        - cooldown: 30 s after a code that is still waiting to be used (an OPEN
          challenge), on this factor, or for Enroll on the user's factors of the method
          (a re-enrolment is a resend). After an approval the next code goes at once.
        - per user and method: at most N codes per window, so re-enrolling a new
          address cannot be used to send without limit.
        - per destination: at most N codes per window to one address or number,
          whichever users asked (SMS pumping, toll fraud, flooding one inbox).

        The caller holds the per-user lock; the destination count is taken under a lock
        of its own (two users, one number), so parallel requests cannot all see
        "4 sent" and all send (OWASP, Twilio Verify).
        """
        rules = self._rules
        window_start = now - rules.send_window
        if rules.resend_cooldown.total_seconds() > 0:
            latest = await tx.challenges.latest_open_send(
                now - rules.resend_cooldown, now, factor_id=factor_id,
                user_id=None if factor_id else user_id, method=None if factor_id else method)
            if latest is not None:
                wait = (latest + rules.resend_cooldown - now).total_seconds()
                raise ResourceExhausted(
                    "a code was sent moments ago; wait before asking for a new one",
                    retry_after_seconds=wait, reason="ERROR_REASON_RESEND_COOLDOWN")
        count, earliest = await tx.challenges.sends_since(window_start, user_id=user_id,
                                                          method=method)
        if count >= rules.max_sends and earliest is not None:
            wait = (earliest + rules.send_window - now).total_seconds()
            raise ResourceExhausted(
                "too many codes were sent; wait before asking for a new one",
                retry_after_seconds=wait, reason="ERROR_REASON_SEND_RATE_LIMITED")
        key = destination_key(destination)
        await tx.challenges.lock_destination(key)
        count, earliest = await tx.challenges.sends_to(key, window_start)
        if count >= rules.max_sends_per_destination and earliest is not None:
            wait = (earliest + rules.send_window - now).total_seconds()
            raise ResourceExhausted(
                "too many codes were sent to this destination; wait before asking for a "
                "new one", retry_after_seconds=wait,
                reason="ERROR_REASON_DESTINATION_RATE_LIMITED")

    # -- Challenge -------------------------------------------------------------------------
    async def challenge(self, cmd: ChallengeCommand, who: AuditContext) -> ChallengeResult:
        who.authorize(cmd.application)
        try:
            return await self._challenge(cmd, who)
        except StoreConflict:
            # Two retries with the same request_id raced on the unique index: the loser
            # runs again and finds the winner's challenge.
            if cmd.request_id is None:
                raise
            return await self._challenge(cmd, who)

    async def _challenge(self, cmd: ChallengeCommand, who: AuditContext) -> ChallengeResult:
        now = self._clock.now()
        async with self._db.transaction() as tx:
            lockout = await tx.lockouts.lock(cmd.user_id)  # the per-user lock, first
            record = await self._owned_factor(tx, cmd.user_id, cmd.factor_id)
            method = self._registry.get(record.factor.method)
            if cmd.purpose is Purpose.CHANGE_PHONE and record.factor.method is not Method.PHONE:
                raise InvalidArgument.single("purpose", "PURPOSE_CHANGE_PHONE needs a phone factor")
            channel = method.channel_for(cmd.channel)
            if cmd.request_id is not None:
                existing = await tx.challenges.by_request_id(cmd.factor_id, cmd.request_id)
                if existing is not None:
                    if (existing.purpose, existing.application, existing.channel) != (
                            cmd.purpose, cmd.application, channel):
                        raise FailedPrecondition(
                            "request_id was already used for a different request",
                            reason="ERROR_REASON_REQUEST_ID_REUSED")
                    return ChallengeResult(existing, record.factor, method.code_length,
                                           self._resend_at(method, existing.created_at))
            _require_status(record.factor, cmd.purpose)
            # A locked-out user gets no new codes either (no SMS bombing through lockout).
            self._refuse_if_locked(lockout, now,
                                   recovery=record.factor.method is Method.RECOVERY_CODE)
            if method.sends_code:
                assert record.destination is not None
                await self._check_send_rate(tx, cmd.user_id, record.factor.method,
                                            record.factor.factor_id, record.destination, now)
            challenge = await self._open_challenge(
                tx, method, record, cmd.purpose, cmd.application, channel,
                cmd.request_id, who, now)
        if method.sends_code:
            self._on_enqueue()
        return ChallengeResult(challenge, record.factor, method.code_length,
                               self._resend_at(method, now))

    def _resend_at(self, method: FactorMethod, sent_at: datetime) -> datetime:
        return sent_at + self._rules.resend_cooldown if method.sends_code else sent_at

    async def _open_challenge(self, tx: Transaction, method: FactorMethod,
                              record: FactorRecord, purpose: Purpose, application: Application,
                              channel: Channel, request_id: str | None, who: AuditContext,
                              now: datetime) -> Challenge:
        """Replace the factor's open challenge for ``purpose`` with a new one; for a sent
        code, queue the message in the same transaction (nothing is lost, nothing is sent
        for a challenge that did not commit)."""
        factor = record.factor
        challenge_id = self._new_id()
        code = method.new_code()
        code_key_id, code_hash = (hash_code(self._keyring, challenge_id, code)
                                  if code is not None else (None, None))
        challenge = Challenge(
            challenge_id=challenge_id, user_id=factor.user_id, factor_id=factor.factor_id,
            purpose=purpose, application=application, channel=channel,
            state=ChallengeState.OPEN, attempts=0, max_attempts=self._rules.max_attempts,
            created_at=now, expires_at=now + self._rules.code_ttl, code_hash=code_hash,
            code_key_id=code_key_id, request_id=request_id,
            destination_key=(destination_key(record.destination)
                             if code is not None and record.destination else None))
        await tx.challenges.supersede_open(factor.factor_id, purpose)
        await tx.challenges.add(challenge, who.caller)
        if code is not None:
            assert record.destination is not None
            subject, text = code_message(
                channel, code=code, purpose=purpose, product=self._rules.product,
                valid_minutes=max(1, int(self._rules.code_ttl.total_seconds()) // 60),
                locale=record.locale)
            await enqueue(tx, self._keyring, Outgoing(
                kind="code", channel=channel, destination=record.destination,
                user_id=factor.user_id, subject=subject, text=text,
                not_after=challenge.expires_at, factor_id=factor.factor_id,
                challenge_id=challenge_id), now)
        await audit.record(tx, now, audit.Event.CHALLENGE, "ok", who, user_id=factor.user_id,
                           factor_id=factor.factor_id, challenge_id=challenge_id,
                           application=application,
                           detail={"purpose": purpose.value, "channel": channel.value})
        return challenge

    # -- Verify / Disable ------------------------------------------------------------------
    async def verify(self, challenge_id: str, raw_code: str, who: AuditContext, *,
                     user_id: str | None = None) -> VerifyOutcome:
        """Check a code; ``user_id`` (optional) binds the challenge to the user the caller
        expects: another user's challenge is then "not found"."""
        return await self._verify(challenge_id, raw_code, who, expect=None,
                                  expect_user=user_id)

    async def disable(self, user_id: str, factor_id: str, challenge_id: str, raw_code: str,
                      who: AuditContext) -> VerifyOutcome:
        """Disable ``factor_id``, proven by a code on a PURPOSE_DISABLE challenge for it."""
        return await self._verify(challenge_id, raw_code, who,
                                  expect=(user_id, factor_id, Purpose.DISABLE))

    async def _verify(self, challenge_id: str, raw_code: str, who: AuditContext,
                      expect: tuple[str, str, Purpose] | None,
                      expect_user: str | None = None) -> VerifyOutcome:
        now = self._clock.now()
        enqueued = False
        async with self._db.transaction() as tx:
            challenge = await tx.challenges.get(challenge_id)
            if challenge is None or (expect_user is not None
                                     and challenge.user_id != expect_user):
                raise ChallengeNotFound()
            target: FactorRecord | None = None
            record = await tx.factors.get(challenge.factor_id)
            if record is None:  # pragma: no cover - the foreign key forbids it
                raise ChallengeNotFound()
            if expect is not None:
                target = await self._disable_target(tx, challenge, record, expect)
            elif (challenge.purpose is Purpose.DISABLE
                  and record.factor.method is Method.RECOVERY_CODE):
                # Verify would disable the recovery codes themselves; the caller means
                # Disable(factor_id=<the lost factor>) with this challenge.
                raise FailedPrecondition(
                    "a PURPOSE_DISABLE challenge on recovery codes is used with Disable, "
                    "naming the factor to remove", reason="ERROR_REASON_CHALLENGE_MISMATCH")
            who.authorize(challenge.application)
            method = self._registry.get(record.factor.method)
            code = method.parse_code(raw_code)  # malformed input is not a guess
            if challenge.state is ChallengeState.OPEN and challenge.expires_at > now:
                _require_status(record.factor, challenge.purpose)

            # Serialise this user's verifications on the per-user lock (taken before any
            # row lock of the factor or challenge: one order everywhere, no deadlock with
            # Challenge), then refuse early. Plain reads above take no lock.
            lockout = await tx.lockouts.lock(challenge.user_id)
            self._refuse_if_locked(lockout, now,
                                   recovery=record.factor.method is Method.RECOVERY_CODE)

            counted = await tx.challenges.count_attempt(challenge_id, now)
            if counted is None:
                outcome = await self._closed_outcome(tx, challenge_id, now)
                await self._audit_verify(tx, now, who, challenge, outcome.result)
                return outcome

            match = method.match(record, counted, code, now)
            ok = match.ok
            if ok and match.totp_step is not None:
                # RFC 6238 5.2: the same (or an older) step is a replay, decided atomically.
                ok = await tx.factors.accept_totp_step(record.factor.factor_id,
                                                       match.totp_step, now)
            if ok and match.recovery_candidates is not None:
                ok = await tx.recovery.consume(counted.user_id, match.recovery_candidates, now)
            remaining = counted.max_attempts - counted.attempts
            if not ok:
                result = VerifyResult.INVALID_CODE
                if remaining == 0:
                    await tx.challenges.close(challenge_id, ChallengeState.EXHAUSTED, now)
                    result = VerifyResult.MAX_ATTEMPTS_REACHED
                await self._audit_verify(tx, now, who, counted, result)
                enqueued = await self._count_failure(tx, lockout, counted, who, now)
                outcome = VerifyOutcome(result, remaining)
            elif not await tx.challenges.close(challenge_id, ChallengeState.APPROVED, now):
                return VerifyOutcome(VerifyResult.ALREADY_USED, remaining)  # pragma: no cover
            else:
                if lockout != self._lockout.after_success():  # no write when already clear
                    await tx.lockouts.save(counted.user_id, self._lockout.after_success())
                await self._audit_verify(tx, now, who, counted, VerifyResult.APPROVED)
                outcome = await self._fulfil(tx, counted, record, target or record, remaining,
                                             who, now)
                enqueued = outcome.enqueued
        if enqueued:
            self._on_enqueue()
        return outcome

    async def _disable_target(self, tx: Transaction, challenge: Challenge, record: FactorRecord,
                              expect: tuple[str, str, Purpose]) -> FactorRecord:
        """The factor a Disable call may switch off with this challenge.

        The challenge must be a PURPOSE_DISABLE challenge of the same user, on the factor
        itself or on the user's recovery codes (a lost phone is disabled with a recovery
        code). Another user's challenge is "not found", never a hint.
        """
        user_id, factor_id, purpose = expect
        target = await self._owned_factor(tx, user_id, factor_id)
        if challenge.user_id != user_id:
            raise ChallengeNotFound()
        by_recovery = record.factor.method is Method.RECOVERY_CODE
        if challenge.purpose is not purpose or (challenge.factor_id != factor_id
                                                and not by_recovery):
            raise FailedPrecondition("the challenge was not opened to disable this factor",
                                     reason="ERROR_REASON_CHALLENGE_MISMATCH")
        if target.factor.method is Method.RECOVERY_CODE:
            raise FailedPrecondition(
                "recovery codes are removed with the user's last factor, not on their own",
                reason="ERROR_REASON_FACTOR_STATUS_FORBIDS")
        return target

    def _refuse_if_locked(self, state: LockoutState | None, now: datetime, *,
                          recovery: bool = False) -> None:
        wait = self._lockout.refusal(state, now, recovery=recovery)
        if wait is None:
            return
        if wait == 0:
            raise FailedPrecondition(
                "too many failed verifications: pass with a recovery code, or an "
                "administrator must unlock this user",
                reason="ERROR_REASON_ADMIN_RESET_REQUIRED")
        raise ResourceExhausted("too many failed verifications; wait before trying again",
                                retry_after_seconds=wait, reason="ERROR_REASON_USER_LOCKED_OUT")

    async def _count_failure(self, tx: Transaction, state: LockoutState, challenge: Challenge,
                             who: AuditContext, now: datetime) -> bool:
        """Count a wrong code against the user; returns whether a notice was queued."""
        new_state, locked = self._lockout.after_failure(state, now)
        await tx.lockouts.save(challenge.user_id, new_state)
        if not locked:
            return False
        detail: dict[str, str | int] = {"failures": new_state.consecutive_failures}
        if new_state.locked_until is not None:
            detail["locked_until"] = new_state.locked_until.isoformat()
        if new_state.admin_reset_required:
            detail["admin_reset_required"] = 1
        await audit.record(tx, now, audit.Event.LOCKOUT, "ok", who, user_id=challenge.user_id,
                           factor_id=challenge.factor_id, application=challenge.application,
                           detail=detail)
        return await self._notifier.notify(tx, now, challenge.user_id, "account_locked") > 0

    async def _closed_outcome(self, tx: Transaction, challenge_id: str,
                              now: datetime) -> VerifyOutcome:
        """Why a challenge took no attempt: used, exhausted or expired (in that order)."""
        current = await tx.challenges.get(challenge_id)
        assert current is not None
        if current.state in (ChallengeState.APPROVED, ChallengeState.SUPERSEDED):
            return VerifyOutcome(VerifyResult.ALREADY_USED, 0)
        if current.state is ChallengeState.EXHAUSTED or current.attempts >= current.max_attempts:
            return VerifyOutcome(VerifyResult.MAX_ATTEMPTS_REACHED, 0)
        return VerifyOutcome(VerifyResult.EXPIRED, current.max_attempts - current.attempts)

    async def _fulfil(self, tx: Transaction, challenge: Challenge, record: FactorRecord,
                      target: FactorRecord, remaining: int, who: AuditContext,
                      now: datetime) -> VerifyOutcome:
        """Carry out an approved challenge's purpose, in the same transaction."""
        factor = record.factor
        user_id = factor.user_id
        if challenge.purpose is not Purpose.CONFIRM_ENROLLMENT and not (
                await tx.factors.touch_active(factor.factor_id, now)):
            raise FailedPrecondition("the factor is disabled",
                                     reason="ERROR_REASON_FACTOR_DISABLED")
        enqueued = False
        if factor.method is Method.RECOVERY_CODE:
            left = await tx.recovery.remaining(user_id)
            await audit.record(tx, now, audit.Event.RECOVERY_CODE_USED, "ok", who,
                               user_id=user_id, factor_id=factor.factor_id,
                               application=challenge.application,
                               detail={"purpose": challenge.purpose.value, "remaining": left})
            enqueued = await self._notifier.notify(
                tx, now, user_id, "recovery_codes_used", masked_detail=f"{left} left") > 0
        if challenge.purpose is Purpose.LOGIN:
            session = await self._sessions.open(tx, record, challenge.application, who, now)
            return VerifyOutcome(VerifyResult.APPROVED, remaining, session=session,
                                 enqueued=enqueued)
        if challenge.purpose is Purpose.CONFIRM_ENROLLMENT:
            return await self._confirm(tx, challenge, record, remaining, who, now)
        if challenge.purpose is Purpose.DISABLE:
            return await self._disable(tx, challenge, target, remaining, who, now)
        # PURPOSE_CHANGE_PHONE: the approval itself is the proof Enroll(METHOD_PHONE) asks for.
        return VerifyOutcome(VerifyResult.APPROVED, remaining,
                             factor=replace(factor, last_used_at=now), enqueued=enqueued)

    async def _confirm(self, tx: Transaction, challenge: Challenge, record: FactorRecord,
                       remaining: int, who: AuditContext, now: datetime) -> VerifyOutcome:
        factor = record.factor
        replaced = await self._retire_replaced(tx, record, who, now)
        if await tx.factors.active_of_method(factor.user_id, factor.method) is not None:
            raise _already_enrolled()
        if not await tx.factors.has_active(factor.user_id):
            # The user's first factor: any other PENDING factor was enrolled without a
            # step-up (none was needed then) and must not become a second factor later
            # without one. A racing Enroll before this confirmation cannot sneak in.
            for other in await tx.factors.supersede_other_pending(
                    factor.user_id, factor.factor_id, now):
                await audit.record(tx, now, audit.Event.DISABLE, "ok", who,
                                   user_id=factor.user_id, factor_id=other,
                                   detail={"reason": "superseded by the first factor"})
        if not await tx.factors.activate(factor.factor_id, now):
            raise FailedPrecondition("the factor is no longer pending",
                                     reason="ERROR_REASON_FACTOR_STATUS_FORBIDS")
        await audit.record(tx, now, audit.Event.CONFIRM, "ok", who, user_id=factor.user_id,
                           factor_id=factor.factor_id, application=challenge.application,
                           detail={"method": factor.method.value})
        if replaced is not None:
            await audit.record(tx, now, audit.Event.PHONE_CHANGED, "ok", who,
                               user_id=factor.user_id, factor_id=factor.factor_id,
                               application=challenge.application,
                               detail={"replaced_factor_id": replaced.factor.factor_id})
            await self._notifier.notify(tx, now, factor.user_id, "phone_changed",
                                        also=replaced, masked_detail=factor.masked_destination,
                                        skip=factor.factor_id)
        else:
            await self._notifier.notify(tx, now, factor.user_id, "factor_added",
                                        masked_detail=factor.masked_destination,
                                        skip=factor.factor_id)
        codes = await self._issue_first_recovery_codes(tx, factor.user_id, who, now)
        active = replace(factor, status=FactorStatus.ACTIVE, confirmed_at=now, last_used_at=now)
        return VerifyOutcome(VerifyResult.APPROVED, remaining, factor=active,
                             recovery_codes=tuple(codes), enqueued=True)

    async def _disable(self, tx: Transaction, challenge: Challenge, target: FactorRecord,
                       remaining: int, who: AuditContext, now: datetime) -> VerifyOutcome:
        factor = target.factor
        if not await tx.factors.disable(factor.factor_id, now):
            raise FailedPrecondition("the factor is disabled",
                                     reason="ERROR_REASON_FACTOR_DISABLED")
        await audit.record(tx, now, audit.Event.DISABLE, "ok", who, user_id=factor.user_id,
                           factor_id=factor.factor_id, application=challenge.application,
                           detail={"method": factor.method.value,
                                   "proof": challenge.factor_id})
        await self._sessions.end_for_factor(tx, factor, who, now)
        # Tell the user, including at the address just removed.
        await self._notifier.notify(tx, now, factor.user_id, "factor_removed",
                                    also=target, masked_detail=factor.masked_destination)
        await self._retire_recovery_if_last(tx, factor.user_id, who, now)
        disabled = replace(factor, status=FactorStatus.DISABLED, disabled_at=now)
        return VerifyOutcome(VerifyResult.APPROVED, remaining, factor=disabled, enqueued=True)

    async def _issue_first_recovery_codes(self, tx: Transaction, user_id: str,
                                          who: AuditContext, now: datetime) -> list[str]:
        """Recovery codes come with the user's first active factor, once."""
        if await tx.factors.active_of_method(user_id, Method.RECOVERY_CODE) is not None:
            return []
        factor_id = self._new_id()
        await tx.factors.add(FactorRecord(
            factor=Factor(factor_id=factor_id, user_id=user_id, method=Method.RECOVERY_CODE,
                          status=FactorStatus.PENDING, masked_destination="recovery codes",
                          created_at=now),
            label="recovery codes", destination=None, secret_ciphertext=None,
            secret_key_id=None, last_totp_step=None))
        await tx.factors.activate(factor_id, now)
        codes = generate_recovery_codes()
        await tx.recovery.replace(user_id, hash_recovery_codes(self._keyring, user_id, codes),
                                  now)
        await audit.record(tx, now, audit.Event.RECOVERY_CODES_ISSUED, "ok", who,
                           user_id=user_id, factor_id=factor_id, detail={"count": len(codes)})
        return codes

    async def _retire_recovery_if_last(self, tx: Transaction, user_id: str, who: AuditContext,
                                       now: datetime) -> None:
        """With no real factor left, 2FA is off: recovery codes must not log anyone in."""
        recovery = await tx.factors.active_of_method(user_id, Method.RECOVERY_CODE)
        if recovery is None:
            return
        others = [r for r in await tx.factors.list_for_user(user_id)
                  if r.factor.status is FactorStatus.ACTIVE
                  and r.factor.method is not Method.RECOVERY_CODE]
        if others:
            return
        await tx.factors.disable(recovery.factor.factor_id, now)
        retired = await tx.recovery.retire(user_id, now)
        await audit.record(tx, now, audit.Event.DISABLE, "ok", who, user_id=user_id,
                           factor_id=recovery.factor.factor_id,
                           detail={"method": Method.RECOVERY_CODE.value,
                                   "reason": "last factor disabled", "codes_retired": retired})
        await self._sessions.end_for_factor(tx, recovery.factor, who, now)

    # -- RegenerateRecoveryCodes -------------------------------------------------------------
    async def regenerate_recovery_codes(self, user_id: str, session_token: str,
                                        application: Application,
                                        who: AuditContext) -> list[str]:
        """New codes for a user who passed 2FA in the last 10 minutes (old codes die)."""
        who.authorize(application)
        now = self._clock.now()
        async with self._db.transaction() as tx:
            await tx.lockouts.lock(user_id)  # the per-user lock, first
            await self._sessions.require_recent(tx, session_token, user_id, now,
                                                self._rules.recent_session,
                                                "regenerating recovery codes")
            recovery = await tx.factors.active_of_method(user_id, Method.RECOVERY_CODE)
            if recovery is None:
                raise FailedPrecondition("the user has no active factor, so no recovery codes",
                                         reason="ERROR_REASON_FACTOR_STATUS_FORBIDS")
            codes = generate_recovery_codes()
            await tx.recovery.replace(
                user_id, hash_recovery_codes(self._keyring, user_id, codes), now)
            await audit.record(tx, now, audit.Event.RECOVERY_CODES_ISSUED, "ok", who,
                               user_id=user_id, factor_id=recovery.factor.factor_id,
                               application=application,
                               detail={"count": len(codes), "regenerated": 1})
            await self._notifier.notify(tx, now, user_id, "recovery_codes_regenerated")
        self._on_enqueue()
        return codes

    # -- ListAuditEvents ---------------------------------------------------------------------
    async def list_audit_events(self, user_id: str, who: AuditContext, *,
                                start: datetime | None, end: datetime | None,
                                before_id: int | None, limit: int) -> list[AuditEvent]:
        if not who.audit_reader:
            raise PermissionDenied("this caller may not read the audit trail",
                                   reason="ERROR_REASON_CALLER_NOT_ALLOWED")
        async with self._db.transaction(readonly=True) as tx:
            return await tx.audit.page(user_id, start=start, end=end, before_id=before_id,
                                       limit=limit)

    async def _retire_replaced(self, tx: Transaction, record: FactorRecord, who: AuditContext,
                               now: datetime) -> FactorRecord | None:
        """Phone change: disable the old number in the transaction that activates the new
        one, so the user has exactly one active phone at every instant; the sessions the
        old number created end with it."""
        if record.replaces_factor_id is None:
            return None
        old = await tx.factors.get(record.replaces_factor_id)
        if old is None or old.factor.status is not FactorStatus.ACTIVE:
            return None  # disabled meanwhile: nothing to swap, the new one just activates
        await tx.factors.disable(old.factor.factor_id, now)
        await self._sessions.end_for_factor(tx, old.factor, who, now)
        return old

    @staticmethod
    async def _audit_verify(tx: Transaction, now: datetime, who: AuditContext,
                            challenge: Challenge, result: VerifyResult) -> None:
        await audit.record(
            tx, now, audit.Event.VERIFY,
            "ok" if result is VerifyResult.APPROVED else "failed", who,
            user_id=challenge.user_id, factor_id=challenge.factor_id,
            challenge_id=challenge.challenge_id, application=challenge.application,
            detail={"result": result.value, "purpose": challenge.purpose.value})

    # -- ListFactors -----------------------------------------------------------------------
    async def list_factors(self, user_id: str, who: AuditContext) -> tuple[list[Factor], int]:
        who.authorize_any()  # a caller with no application (an audit reader) sees nothing
        async with self._db.transaction(readonly=True) as tx:
            records = await tx.factors.list_for_user(user_id)
            remaining = await tx.recovery.remaining(user_id)
        return [r.factor for r in records], remaining

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    async def _owned_factor(tx: Transaction, user_id: str, factor_id: str) -> FactorRecord:
        record = await tx.factors.get(factor_id)
        # Another user's factor is "not found": no oracle for which ids exist.
        if record is None or record.factor.user_id != user_id:
            raise FactorNotFound()
        return record
