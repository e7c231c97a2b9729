"""Challenge: open a challenge on a factor for a purpose, sending a fresh code for email and
phone (nothing is sent for the authenticator app or recovery codes).

One transaction: the user's lock; the factor; (a retried request_id answers the first
challenge); the lockout and the send quota; then, deferred to COMMIT, the old open challenge
superseded, the new one inserted with its outbox message and audit row. On PostgreSQL an app
challenge is three statements: lock, factor, and the deferred writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from mfa.v1.error_reason_pb2 import ErrorReason

from mfa_service.clock import Clock
from mfa_service.crypto import Keyring
from mfa_service.delivery.outbox import enqueue
from mfa_service.delivery.templates import code_message
from mfa_service.domain import (
    Application,
    AuditContext,
    Challenge,
    ChallengeState,
    Channel,
    Factor,
    FactorRecord,
    FactorStatus,
    MessageKind,
    Method,
    Outgoing,
    Purpose,
)
from mfa_service.errors import (
    FailedPrecondition,
    GuardLost,
    InvalidArgument,
    NeedsLock,
    StoreConflict,
)
from mfa_service.factors.base import FactorMethod
from mfa_service.factors.codes import hash_code
from mfa_service.factors.registry import FactorRegistry
from mfa_service.service import audit, policy
from mfa_service.service.limits import PhoneSendRefused, SendLimits, SendPermit
from mfa_service.service.lockout import Lockout
from mfa_service.service.optimism import Hints
from mfa_service.service.policy import Change, Evidence
from mfa_service.service.rules import Rules, new_id, owned, proof_evidence, require_status
from mfa_service.service.sessions import SessionService
from mfa_service.store.database import Database, Transaction


@dataclass(frozen=True)
class ChallengeCommand:
    user_id: str
    factor_id: str
    purpose: Purpose
    application: Application
    channel: Channel | None = None
    request_id: str | None = None
    session_token: str = ""  # CONFIRM_ENROLLMENT once the user has an ACTIVE factor


@dataclass(frozen=True)
class ChallengeResult:
    challenge: Challenge
    factor: Factor
    code_length: int
    resend_available_at: datetime
    browser_options: str | None = None  # passkeys: WebAuthn request options JSON


@dataclass(frozen=True)
class NewChallenge:
    """What a new challenge is opened with: the factor and its method, for what, where to,
    by whom and when; ``permit``: what the send quota counted a sent code under."""

    record: FactorRecord
    method: FactorMethod
    purpose: Purpose
    application: Application
    channel: Channel
    who: AuditContext
    now: datetime
    request_id: str | None = None
    permit: SendPermit | None = None


class ChallengeOpener:
    """Opens challenges: for Challenge, and for Enroll (the confirmation challenge)."""

    def __init__(self, keyring: Keyring, rules: Rules,
                 new_id: Callable[[], str] = new_id, hints: Hints | None = None) -> None:
        self._keyring = keyring
        self._rules = rules
        self._new_id = new_id
        self.hints = hints or Hints()

    def open(self, tx: Transaction, new: NewChallenge) -> Challenge:
        """Replace the factor's open challenge for the purpose with a new one; for a sent
        code, queue the message in the same transaction (nothing is lost, nothing is sent
        for a challenge that did not commit). Every write here waits for COMMIT."""
        factor, method, now, rules = new.record.factor, new.method, new.now, self._rules
        challenge_id = self._new_id()
        code = method.new_code()
        code_key_id, code_hash = (hash_code(self._keyring, challenge_id, code)
                                  if code is not None else (None, None))
        ttl = rules.code_ttl
        if method.max_challenge_ttl is not None:
            ttl = min(ttl, method.max_challenge_ttl)
        sent = new.permit if code is not None else None
        challenge = Challenge(
            challenge_id=challenge_id, user_id=factor.user_id, factor_id=factor.factor_id,
            purpose=new.purpose, application=new.application, channel=new.channel,
            state=ChallengeState.OPEN, attempts=0, max_attempts=rules.max_attempts,
            created_at=now, expires_at=now + ttl, code_hash=code_hash,
            code_key_id=code_key_id, request_id=new.request_id,
            destination_key=sent.destination_key if sent else None)
        self.hints.opened(challenge_id, factor.factor_id, login=new.purpose is Purpose.LOGIN,
                          quiet=method.login_writes_deferred, sends_code=method.sends_code)
        tx.later.challenges.supersede_open(factor.factor_id, new.purpose)
        tx.later.challenges.add(challenge, new.who.caller,
                                phone_prefix_key=sent.phone_prefix_key if sent else None,
                                phone_region=sent.phone_region if sent else None)
        if code is not None:
            destination = new.record.destination
            assert destination is not None
            subject, text = code_message(
                new.channel, code=code, purpose=new.purpose, product=rules.product,
                valid_minutes=max(1, int(rules.code_ttl.total_seconds()) // 60),
                locale=new.record.locale)
            enqueue(tx, self._keyring, Outgoing(
                kind=MessageKind.CODE, channel=new.channel, destination=destination,
                user_id=factor.user_id, subject=subject, text=text,
                not_after=challenge.expires_at, factor_id=factor.factor_id,
                challenge_id=challenge_id), now)
        audit.record(tx, now, audit.Event.CHALLENGE, audit.Outcome.OK, new.who,
                     user_id=factor.user_id, factor_id=factor.factor_id,
                     challenge_id=challenge_id, application=new.application,
                     detail={"purpose": new.purpose.value, "channel": new.channel.value})
        return challenge


class Challenges:
    def __init__(self, db: Database, clock: Clock, registry: FactorRegistry, rules: Rules,
                 lockout: Lockout, sends: SendLimits, opener: ChallengeOpener,
                 sessions: SessionService) -> None:
        self._db = db
        self._clock = clock
        self._registry = registry
        self._rules = rules
        self._lockout = lockout
        self._sends = sends
        self._opener = opener
        self._sessions = sessions

    async def challenge(self, cmd: ChallengeCommand, who: AuditContext) -> ChallengeResult:
        who.authorize(cmd.application)
        try:
            if (cmd.purpose is Purpose.LOGIN and cmd.request_id is None
                    and self._opener.hints.challenge_may_try(cmd.factor_id)):
                # Without the user's lock first (service/optimism.py).
                try:
                    return await self._challenge(cmd, who, optimistic=True)
                except NeedsLock:
                    self._opener.hints.needed_lock(cmd.factor_id)
                except GuardLost:
                    pass  # another call of the user's came between: under the lock now
            try:
                return await self._challenge(cmd, who)
            except StoreConflict:
                # Two retries with the same request_id raced on the unique index: the
                # loser runs again and finds the winner's challenge.
                if cmd.request_id is None:
                    raise
                return await self._challenge(cmd, who)
        except PhoneSendRefused as refusal:
            await self._sends.record_refusal(refusal, who, user_id=cmd.user_id,
                                             factor_id=cmd.factor_id,
                                             application=cmd.application)
            raise

    async def _challenge(self, cmd: ChallengeCommand, who: AuditContext, *,
                         optimistic: bool = False) -> ChallengeResult:
        now = self._clock.now()
        async with self._db.transaction(optimistic=optimistic) as tx:
            # The per-user lock first, and the factor read under it (one round trip).
            lockout, found = await tx.factors.locked_with(cmd.user_id, cmd.factor_id)
            record = owned(self._rules, cmd.user_id, found, now)
            method = self._registry.get(record.factor.method)
            if cmd.purpose is Purpose.CHANGE_PHONE and record.factor.method is not Method.PHONE:
                raise InvalidArgument.single("purpose", "PURPOSE_CHANGE_PHONE needs a phone factor")
            # Before the request_id replay below: a retried id must not hand anyone the
            # options (a passkey's) of a challenge they may not open.
            await self._ask_policy(tx, cmd, record, now)
            channel = method.channel_for(cmd.channel)
            if cmd.request_id is not None:
                existing = await tx.challenges.by_request_id(cmd.factor_id, cmd.request_id)
                if existing is not None:
                    if (existing.purpose, existing.application, existing.channel) != (
                            cmd.purpose, cmd.application, channel):
                        raise FailedPrecondition(
                            "request_id was already used for a different request",
                            reason=ErrorReason.ERROR_REASON_REQUEST_ID_REUSED)
                    # Passkeys: the options derive from the challenge id, so the
                    # retry gets the very same ones.
                    return ChallengeResult(existing, record.factor,
                                           method.code_length_of(record),
                                           self._resend_at(method, existing.created_at),
                                           await method.browser_options(tx, record, existing))
            require_status(record.factor, cmd.purpose)
            # A locked-out user gets no new codes either (no SMS bombing through lockout).
            self._lockout.refuse_if_locked(lockout, now,
                                           passes_hard_limit=method.passes_hard_lockout)
            permit = None
            if method.sends_code:
                assert record.destination is not None
                permit = await self._sends.check(tx, now, user_id=cmd.user_id,
                                                 method=record.factor.method,
                                                 factor_id=record.factor.factor_id,
                                                 destination=record.destination)
            challenge = self._opener.open(tx, NewChallenge(
                record, method, cmd.purpose, cmd.application, channel, who, now,
                cmd.request_id, permit))
            options = await method.browser_options(tx, record, challenge)
        return ChallengeResult(challenge, record.factor, method.code_length_of(record),
                               self._resend_at(method, now), options)

    async def _ask_policy(self, tx: Transaction, cmd: ChallengeCommand,
                          record: FactorRecord, now: datetime) -> None:
        """The proof model for the purposes where opening a challenge is itself a step
        of a change (service/policy.py).

        CONFIRM_ENROLLMENT on a PENDING factor hands out a new code, or new WebAuthn
        creation options with which *any* authenticator can be registered: it needs
        what Enroll needed, a fresh session once the user has an ACTIVE factor (else a
        password alone finishes the victim's cancelled passkey with the attacker's key).
        REGENERATE_RECOVERY_CODES is refused at once on a factor that cannot give the
        proof (recovery codes; a new factor), instead of sending a code for nothing.
        """
        factor = record.factor
        if cmd.purpose is Purpose.CONFIRM_ENROLLMENT and factor.status is FactorStatus.PENDING:
            if not (await tx.factors.summary(cmd.user_id, factor.method)).any_active:
                policy.require(Change.RENEW_FIRST_PENDING, {Evidence.PASSWORD_STEP})
                return
            shown, _ = await self._sessions.evidence(tx, cmd.session_token, cmd.user_id,
                                                     now, self._rules.recent_session)
            policy.require(Change.RENEW_PENDING, {Evidence.PASSWORD_STEP, *shown})
        elif cmd.purpose is Purpose.REGENERATE_RECOVERY_CODES:
            if factor.method is Method.RECOVERY_CODE:
                raise InvalidArgument.single(
                    "purpose", "PURPOSE_REGENERATE_RECOVERY_CODES needs a factor other than "
                               "recovery codes (an authenticator app, email, phone or passkey)")
            if factor.status is FactorStatus.ACTIVE:
                policy.require(Change.REGENERATE_RECOVERY_CODES,
                               {proof_evidence(factor, now)},
                               established_at=factor.established_at)

    def _resend_at(self, method: FactorMethod, sent_at: datetime) -> datetime:
        return sent_at + self._rules.resend_cooldown if method.sends_code else sent_at
