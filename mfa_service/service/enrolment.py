"""Enroll: start binding a factor to a user. The factor stays PENDING until a code from it
is verified on the returned PURPOSE_CONFIRM_ENROLLMENT challenge (verification.py).

Rules, in the order they are checked (one transaction, under the user's lock):
the lockout; adding a factor needs the factor you have (step-up); at most N live factors;
one ACTIVE factor per method, except a phone change proven on the old number; the send
quota; then a newer enrolment supersedes an unconfirmed one of the same method.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from mfa.v1.error_reason_pb2 import ErrorReason

from mfa_service.domain import (
    Application,
    AuditContext,
    Challenge,
    Channel,
    Factor,
    FactorRecord,
    FactorStatus,
    Method,
    Purpose,
)
from mfa_service.errors import FailedPrecondition, InvalidArgument
from mfa_service.factors.base import EnrollInput, Provisioning
from mfa_service.service import audit
from mfa_service.service.challenges import open_challenge
from mfa_service.service.context import SEVERAL_ACTIVE, Context, already_enrolled
from mfa_service.service.limits import PhoneSendRefused
from mfa_service.store.database import Transaction
from mfa_service.store.repositories import UserFactors


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
    browser_options: str | None = None  # passkeys: WebAuthn creation options JSON


class Enrolment:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    async def enroll(self, cmd: EnrollCommand, who: AuditContext) -> EnrollResult:
        who.authorize(cmd.application)
        try:
            return await self._enroll(cmd, who)
        except PhoneSendRefused as refusal:
            await self._ctx.record_send_refusal(refusal, who, user_id=cmd.user_id,
                                                factor_id=None, application=cmd.application)
            raise

    async def _enroll(self, cmd: EnrollCommand, who: AuditContext) -> EnrollResult:
        ctx = self._ctx
        if cmd.method is Method.RECOVERY_CODE:
            raise InvalidArgument.single(
                "method", "recovery codes are issued with the first active factor, not enrolled")
        method = ctx.registry.get(cmd.method)
        channel = method.channel_for(cmd.channel)
        factor_id = ctx.new_id()
        # Secret generation, encryption and the QR image happen before the transaction
        # opens, so no database connection waits on CPU work.
        material = method.begin_enrollment(EnrollInput(
            factor_id=factor_id, user_id=cmd.user_id, email=cmd.email,
            phone_number=cmd.phone_number, channel=channel, account_name=cmd.account_name))
        now = ctx.clock.now()
        factor = Factor(factor_id=factor_id, user_id=cmd.user_id, method=cmd.method,
                        status=FactorStatus.PENDING,
                        masked_destination=material.masked_destination, created_at=now)
        async with ctx.db.transaction() as tx:
            # The per-user lock first (store/security.py: lock order), then the same
            # refusals as Challenge: no codes while locked out.
            ctx.refuse_if_locked(await tx.lockouts.lock(cmd.user_id), now)
            existing = await tx.factors.summary(cmd.user_id, cmd.method)
            if existing.any_active:
                await self._require_step_up(tx, cmd, now)
            if existing.live >= ctx.rules.max_factors_per_user:
                raise FailedPrecondition("the user has too many factors; disable one first",
                                         reason=ErrorReason.ERROR_REASON_TOO_MANY_FACTORS)
            replaces = await self._replaced_factor(tx, cmd, existing, now)
            permit = None
            if method.sends_code:
                assert material.destination is not None
                permit = await ctx.check_sends(tx, now, user_id=cmd.user_id,
                                               method=cmd.method, factor_id=None,
                                               destination=material.destination)
            # A newer enrolment replaces an unconfirmed one (a QR code scanned earlier and
            # never confirmed must not become usable later).
            await tx.factors.supersede_pending(cmd.user_id, cmd.method, now)
            record = FactorRecord(
                factor=factor, label=material.label, destination=material.destination,
                secret_ciphertext=material.secret_ciphertext,
                secret_key_id=material.secret_key_id, last_totp_step=None,
                locale=cmd.locale or ctx.rules.default_locale, replaces_factor_id=replaces)
            tx.factors.add(record)
            challenge = open_challenge(ctx, tx, method, record, Purpose.CONFIRM_ENROLLMENT,
                                       cmd.application, channel, None, who, now, permit)
            options = await method.browser_options(tx, record, challenge)
            audit.record(tx, now, audit.Event.ENROLL, audit.Outcome.OK, who,
                         user_id=cmd.user_id, factor_id=factor_id,
                         challenge_id=challenge.challenge_id, application=cmd.application,
                         detail={"method": cmd.method.value,
                                 **({"replaces": replaces} if replaces else {})})
        return EnrollResult(factor=factor, challenge=challenge, code_length=method.code_length,
                            provisioning=material.provisioning, browser_options=options)

    async def _require_step_up(self, tx: Transaction, cmd: EnrollCommand,
                               now: datetime) -> None:
        """Adding a factor needs the factor you have (SPEC, OWASP MFA "changing factors").

        Once the user has any ACTIVE factor, Enroll (every method, a phone change too)
        needs a 2FA session of this same user that passed 2FA in the last 10 minutes.
        Otherwise whoever holds the password step could add an app, log in with it and
        walk around "disabling needs the enabled method" and "changing the phone needs
        the old number". Checked under the per-user lock, in the enrolling transaction.
        The sibling path, a PENDING factor enrolled before the first one was confirmed,
        is closed in verification.py (confirming the first factor supersedes it).
        """
        ctx = self._ctx
        await ctx.sessions.require_recent(tx, cmd.session_token, cmd.user_id, now,
                                          ctx.rules.recent_session, "adding a factor")

    async def _replaced_factor(self, tx: Transaction, cmd: EnrollCommand,
                               existing: UserFactors, now: datetime) -> str | None:
        """The ACTIVE factor this enrolment will replace (a phone change), or None.

        One ACTIVE factor per method: a second one is refused, except a new phone number
        proven by a fresh, unused PURPOSE_CHANGE_PHONE approval on the old one (OWASP
        "changing factors": the old factor must consent).
        """
        active = existing.active_of_method
        if cmd.method in SEVERAL_ACTIVE:
            active = None  # one passkey per device: adding one replaces nothing
        if active is None:
            if cmd.change_proof_challenge_id is not None:
                raise InvalidArgument.single("change_proof_challenge_id",
                                             "the user has no active phone to change")
            return None
        if cmd.method is not Method.PHONE:
            raise already_enrolled()
        proof_required = ErrorReason.ERROR_REASON_PHONE_CHANGE_PROOF_REQUIRED
        if cmd.change_proof_challenge_id is None:
            raise FailedPrecondition(
                "a phone is already active: verify a PURPOSE_CHANGE_PHONE challenge on it and "
                "pass its id as change_proof_challenge_id", reason=proof_required)
        if not await tx.challenges.consume_change_proof(
                cmd.change_proof_challenge_id, active.factor.factor_id,
                now - self._ctx.rules.change_proof_max_age, now):
            raise FailedPrecondition(
                "change_proof_challenge_id must be an approved PURPOSE_CHANGE_PHONE challenge "
                "on the current phone, from the last 10 minutes, not used before",
                reason=proof_required)
        return active.factor.factor_id
