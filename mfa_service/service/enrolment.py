"""Enroll: start binding a factor to a user. The factor stays PENDING until a code from it
is verified on the returned PURPOSE_CONFIRM_ENROLLMENT challenge (verification.py).

Rules, in the order they are checked (one transaction, under the user's lock):
the lockout; the proof model (service/policy.py: the first factor needs the password
step, another factor a fresh session, a phone change a fresh session and a proof on the
old number); at most N live factors; one ACTIVE factor per method; the send quota; then
a newer enrolment supersedes an unconfirmed one of the same method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from mfa.v1.error_reason_pb2 import ErrorReason

from mfa_service.clock import Clock
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
from mfa_service.factors.registry import FactorRegistry
from mfa_service.service import audit, policy
from mfa_service.service.challenges import ChallengeOpener, NewChallenge
from mfa_service.service.limits import PhoneSendRefused, SendLimits
from mfa_service.service.lockout import Lockout
from mfa_service.service.policy import Change, Evidence
from mfa_service.service.rules import SEVERAL_ACTIVE, Rules, already_enrolled, new_id
from mfa_service.service.sessions import SessionService
from mfa_service.store.database import Database, Transaction
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
    qr_svg: bool = True  # authenticator app: which QR images to draw
    qr_png: bool = True


@dataclass(frozen=True)
class EnrollResult:
    factor: Factor
    challenge: Challenge
    code_length: int
    provisioning: Provisioning | None
    browser_options: str | None = None  # passkeys: WebAuthn creation options JSON


class Enrolment:
    def __init__(self, db: Database, clock: Clock, registry: FactorRegistry, rules: Rules,
                 lockout: Lockout, sends: SendLimits, opener: ChallengeOpener,
                 sessions: SessionService, new_id: Callable[[], str] = new_id) -> None:
        self._db = db
        self._clock = clock
        self._registry = registry
        self._rules = rules
        self._lockout = lockout
        self._sends = sends
        self._opener = opener
        self._sessions = sessions
        self._new_id = new_id

    async def enroll(self, cmd: EnrollCommand, who: AuditContext) -> EnrollResult:
        who.authorize(cmd.application)
        try:
            return await self._enroll(cmd, who)
        except PhoneSendRefused as refusal:
            await self._sends.record_refusal(refusal, who, user_id=cmd.user_id,
                                             factor_id=None, application=cmd.application)
            raise

    async def _enroll(self, cmd: EnrollCommand, who: AuditContext) -> EnrollResult:
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
            phone_number=cmd.phone_number, channel=channel, account_name=cmd.account_name,
            qr_svg=cmd.qr_svg, qr_png=cmd.qr_png))
        now = self._clock.now()
        factor = Factor(factor_id=factor_id, user_id=cmd.user_id, method=cmd.method,
                        status=FactorStatus.PENDING,
                        masked_destination=material.masked_destination, created_at=now)
        async with self._db.transaction() as tx:
            # The per-user lock first (store/security.py: lock order), then the same
            # refusals as Challenge: no codes while locked out.
            self._lockout.refuse_if_locked(await tx.lockouts.lock(cmd.user_id), now)
            existing = await tx.factors.summary(cmd.user_id, cmd.method)
            enrolled_by = await self._ask_policy(tx, cmd, existing, now)
            if existing.live >= self._rules.max_factors_per_user:
                raise FailedPrecondition("the user has too many factors; disable one first",
                                         reason=ErrorReason.ERROR_REASON_TOO_MANY_FACTORS)
            replaces = self._replaced_factor(cmd, existing)
            permit = None
            if method.sends_code:
                assert material.destination is not None
                permit = await self._sends.check(tx, now, user_id=cmd.user_id,
                                                 method=cmd.method, factor_id=None,
                                                 destination=material.destination)
            # A newer enrolment replaces an unconfirmed one (a QR code scanned earlier and
            # never confirmed must not become usable later).
            await tx.factors.supersede_pending(cmd.user_id, cmd.method, now)
            record = FactorRecord(
                factor=factor, label=material.label, destination=material.destination,
                secret_ciphertext=material.secret_ciphertext,
                secret_key_id=material.secret_key_id, last_totp_step=None,
                locale=cmd.locale or self._rules.default_locale, replaces_factor_id=replaces,
                enrolled_session_id=enrolled_by)
            tx.later.factors.add(record)
            challenge = self._opener.open(tx, NewChallenge(
                record, method, Purpose.CONFIRM_ENROLLMENT, cmd.application, channel, who,
                now, permit=permit))
            options = await method.browser_options(tx, record, challenge)
            audit.record(tx, now, audit.Event.ENROLL, audit.Outcome.OK, who,
                         user_id=cmd.user_id, factor_id=factor_id,
                         challenge_id=challenge.challenge_id, application=cmd.application,
                         detail={"method": cmd.method.value,
                                 **({"replaces": replaces} if replaces else {})})
        return EnrollResult(factor=factor, challenge=challenge, code_length=method.code_length,
                            provisioning=material.provisioning, browser_options=options)

    async def _ask_policy(self, tx: Transaction, cmd: EnrollCommand, existing: UserFactors,
                          now: datetime) -> str | None:
        """Gather the evidence this call presents and ask the proof model (policy.py);
        the id of the session that vouched for the enrolment (confirming it later needs
        that session still live), None for a first factor.

        The first factor needs the password step only: no factor exists to ask. Once
        the user has any ACTIVE factor, adding one (every method) needs a fresh 2FA
        session of this user, or whoever holds the password adds an app and walks
        around "disabling needs the enabled method" and "a new phone needs the old
        number". A phone change needs that and a fresh, unused PURPOSE_CHANGE_PHONE
        approval on the old number (OWASP "changing factors": the old factor consents),
        consumed here; a refusal rolls the consumption back with the transaction.
        """
        if not existing.any_active:
            policy.require(Change.ADD_FIRST_FACTOR, {Evidence.PASSWORD_STEP})
            return None
        shown, session = await self._sessions.evidence(tx, cmd.session_token, cmd.user_id,
                                                       now, self._rules.recent_session)
        presented = {Evidence.PASSWORD_STEP, *shown}
        active = existing.active_of_method
        if cmd.method is Method.PHONE and active is not None:
            if cmd.change_proof_challenge_id is not None:
                proven = await tx.challenges.consume_proof(
                    cmd.change_proof_challenge_id, cmd.user_id, Purpose.CHANGE_PHONE,
                    now - self._rules.change_proof_max_age, now)
                if proven == active.factor.factor_id:
                    presented.add(Evidence.PROOF_WITH_OLD_PHONE)
            policy.require(Change.CHANGE_PHONE, presented)
        else:
            policy.require(Change.ADD_FACTOR, presented)
        assert session is not None  # every row above needs a fresh session
        return session.session_id

    @staticmethod
    def _replaced_factor(cmd: EnrollCommand, existing: UserFactors) -> str | None:
        """The ACTIVE factor this enrolment will replace (a phone change, proven in
        _ask_policy), or None. One ACTIVE factor per method: a second one is refused."""
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
        return active.factor.factor_id
