"""Challenge: open a challenge on a factor for a purpose, sending a fresh code for email and
phone (nothing is sent for the authenticator app or recovery codes).

One transaction: the user's lock; the factor; (a retried request_id answers the first
challenge); the lockout and the send quota; then, deferred to COMMIT, the old open challenge
superseded, the new one inserted with its outbox message and audit row. On PostgreSQL an app
challenge is three statements: lock, factor, and the deferred writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from mfa.v1.error_reason_pb2 import ErrorReason

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
from mfa_service.errors import FailedPrecondition, InvalidArgument, StoreConflict
from mfa_service.factors.base import FactorMethod
from mfa_service.factors.codes import hash_code
from mfa_service.service import audit, policy
from mfa_service.service.context import (
    Context,
    owned_factor,
    proof_evidence,
    require_status,
)
from mfa_service.service.limits import PhoneSendRefused, SendPermit
from mfa_service.service.policy import Change, Evidence
from mfa_service.store.database import Transaction


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


def open_challenge(ctx: Context, tx: Transaction, method: FactorMethod, record: FactorRecord,
                   purpose: Purpose, application: Application, channel: Channel,
                   request_id: str | None, who: AuditContext, now: datetime,
                   permit: SendPermit | None = None) -> Challenge:
    """Replace the factor's open challenge for ``purpose`` with a new one; for a sent code,
    queue the message in the same transaction (nothing is lost, nothing is sent for a
    challenge that did not commit). Every write here waits for COMMIT."""
    factor = record.factor
    challenge_id = ctx.new_id()
    code = method.new_code()
    code_key_id, code_hash = (hash_code(ctx.keyring, challenge_id, code)
                              if code is not None else (None, None))
    rules = ctx.rules
    ttl = rules.code_ttl
    if method.max_challenge_ttl is not None:
        ttl = min(ttl, method.max_challenge_ttl)
    challenge = Challenge(
        challenge_id=challenge_id, user_id=factor.user_id, factor_id=factor.factor_id,
        purpose=purpose, application=application, channel=channel,
        state=ChallengeState.OPEN, attempts=0, max_attempts=rules.max_attempts,
        created_at=now, expires_at=now + ttl, code_hash=code_hash,
        code_key_id=code_key_id, request_id=request_id,
        destination_key=permit.destination_key if code is not None and permit else None)
    tx.later.challenges.supersede_open(factor.factor_id, purpose)
    sent = permit if code is not None else None
    tx.later.challenges.add(challenge, who.caller,
                      phone_prefix_key=sent.phone_prefix_key if sent else None,
                      phone_region=sent.phone_region if sent else None)
    if code is not None:
        assert record.destination is not None
        subject, text = code_message(
            channel, code=code, purpose=purpose, product=rules.product,
            valid_minutes=max(1, int(rules.code_ttl.total_seconds()) // 60),
            locale=record.locale)
        enqueue(tx, ctx.keyring, Outgoing(
            kind=MessageKind.CODE, channel=channel, destination=record.destination,
            user_id=factor.user_id, subject=subject, text=text,
            not_after=challenge.expires_at, factor_id=factor.factor_id,
            challenge_id=challenge_id), now)
    audit.record(tx, now, audit.Event.CHALLENGE, audit.Outcome.OK, who, user_id=factor.user_id,
                 factor_id=factor.factor_id, challenge_id=challenge_id, application=application,
                 detail={"purpose": purpose.value, "channel": channel.value})
    return challenge


class Challenges:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    async def challenge(self, cmd: ChallengeCommand, who: AuditContext) -> ChallengeResult:
        who.authorize(cmd.application)
        try:
            try:
                return await self._challenge(cmd, who)
            except StoreConflict:
                # Two retries with the same request_id raced on the unique index: the
                # loser runs again and finds the winner's challenge.
                if cmd.request_id is None:
                    raise
                return await self._challenge(cmd, who)
        except PhoneSendRefused as refusal:
            await self._ctx.record_send_refusal(refusal, who, user_id=cmd.user_id,
                                                factor_id=cmd.factor_id,
                                                application=cmd.application)
            raise

    async def _challenge(self, cmd: ChallengeCommand, who: AuditContext) -> ChallengeResult:
        ctx = self._ctx
        now = ctx.clock.now()
        async with ctx.db.transaction() as tx:
            lockout = await tx.lockouts.lock(cmd.user_id)  # the per-user lock, first
            record = await owned_factor(ctx, tx, cmd.user_id, cmd.factor_id, now)
            method = ctx.registry.get(record.factor.method)
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
            ctx.refuse_if_locked(lockout, now,
                                 recovery=record.factor.method is Method.RECOVERY_CODE)
            permit = None
            if method.sends_code:
                assert record.destination is not None
                permit = await ctx.check_sends(tx, now, user_id=cmd.user_id,
                                               method=record.factor.method,
                                               factor_id=record.factor.factor_id,
                                               destination=record.destination)
            challenge = open_challenge(ctx, tx, method, record, cmd.purpose, cmd.application,
                                       channel, cmd.request_id, who, now, permit)
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
        ctx, factor = self._ctx, record.factor
        if cmd.purpose is Purpose.CONFIRM_ENROLLMENT and factor.status is FactorStatus.PENDING:
            if not (await tx.factors.summary(cmd.user_id, factor.method)).any_active:
                policy.require(Change.RENEW_FIRST_PENDING, {Evidence.PASSWORD_STEP})
                return
            shown, _ = await ctx.sessions.evidence(tx, cmd.session_token, cmd.user_id, now,
                                                   ctx.rules.recent_session)
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
        return sent_at + self._ctx.rules.resend_cooldown if method.sends_code else sent_at
