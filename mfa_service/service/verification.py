"""Verify: check a code (or a passkey's response) against a challenge, then carry out the
challenge's purpose.

One transaction, the steps of service/attempts.py (load, ready, attempt) with the proof
model asked between ready and attempt, then the purpose (the table ``_PURPOSES``): LOGIN
opens a session, CONFIRM_ENROLLMENT activates the factor, DISABLE disables the factor
itself (disabling.py's Removal), CHANGE_PHONE and REGENERATE_RECOVERY_CODES only approve
(the proof the next call consumes).

On PostgreSQL a TOTP login is two statements: the lock with the read, and the deferred
writes (the attempt, the TOTP step, the session, audit rows) sent as one before COMMIT.
A LOGIN challenge this process opened is first tried without the lock, BEGIN or COMMIT:
the read, then the writes as one statement that stands only if nothing of the user's
changed meanwhile (service/optimism.py, store/unit.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime

from mfa.v1.error_reason_pb2 import ErrorReason

from mfa_service.clock import Clock
from mfa_service.domain import (
    AuditContext,
    FactorRecord,
    FactorStatus,
    Method,
    NoticeKind,
    Proof,
    Purpose,
    VerifyResult,
)
from mfa_service.errors import FailedPrecondition
from mfa_service.service import audit, disabling, policy
from mfa_service.service.attempts import (
    Closed,
    Failed,
    Passed,
    Steps,
    VerifyOutcome,
    again_if_guard_lost,
    audit_verify,
)
from mfa_service.service.devices import TrustedDevices
from mfa_service.service.disabling import Removal
from mfa_service.service.notices import Notifier
from mfa_service.service.optimism import Hints
from mfa_service.service.policy import Change, Evidence
from mfa_service.service.recovery import Recovery
from mfa_service.service.rules import SEVERAL_ACTIVE, Rules, already_enrolled, login_evidence
from mfa_service.service.sessions import SessionService
from mfa_service.store.database import Database, Transaction

__all__ = ["Verification", "VerifyOutcome"]


@dataclass(frozen=True)
class _Approved:
    """What a purpose handler gets: the passed proof and the call's context."""

    tx: Transaction
    passed: Passed
    who: AuditContext
    now: datetime
    account_email: str | None = None  # notices go here too (the account's own address)
    open_session: bool = False  # confirming a first factor: also log in
    remember_as: str | None = None  # a login: also remember the browser under this label


Handler = Callable[["Verification", _Approved], Awaitable[VerifyOutcome]]


class Verification:
    def __init__(self, db: Database, clock: Clock, rules: Rules, steps: Steps,
                 sessions: SessionService, notifier: Notifier, recovery: Recovery,
                 removal: Removal, devices: TrustedDevices, hints: Hints) -> None:
        self._db = db
        self._hints = hints
        self._clock = clock
        self._rules = rules
        self._steps = steps
        self._sessions = sessions
        self._notifier = notifier
        self._recovery = recovery
        self._removal = removal
        self._devices = devices

    async def verify(self, challenge_id: str, proof: Proof | str, who: AuditContext, *,
                     user_id: str | None = None, account_email: str | None = None,
                     open_session: bool = False,
                     remember_as: str | None = None) -> VerifyOutcome:
        """Check a code (or a passkey's response); ``user_id`` (optional) binds the
        challenge to the user the caller expects: another user's challenge is then "not
        found". ``account_email``: notices about the change also go there.
        ``open_session``: confirming the user's first factor also opens a session.
        ``remember_as``: a login also remembers the browser under this label
        (service/devices.py)."""
        shown = Proof(code=proof) if isinstance(proof, str) else proof
        return await again_if_guard_lost(
            lambda optimistic: self._verify(challenge_id, shown, who, user_id, account_email,
                                            open_session, remember_as, optimistic),
            optimistic=remember_as is None and self._hints.verify_may_try(challenge_id))

    async def _verify(self, challenge_id: str, proof: Proof, who: AuditContext,
                      expect_user: str | None, account_email: str | None,
                      open_session: bool, remember_as: str | None,
                      optimistic: bool) -> VerifyOutcome:
        now = self._clock.now()
        steps = self._steps
        async with self._db.transaction(optimistic=optimistic) as tx:
            loaded = await steps.load(tx, challenge_id, expect_user=expect_user)
            if (loaded.challenge.purpose is Purpose.DISABLE
                    and loaded.record.factor.method is Method.RECOVERY_CODE):
                # Verify would disable the recovery codes themselves; the caller means
                # Disable(factor_id=<the lost factor>) with this challenge.
                raise FailedPrecondition(
                    "a PURPOSE_DISABLE challenge on recovery codes is used with Disable, "
                    "naming the factor to remove",
                    reason=ErrorReason.ERROR_REASON_CHALLENGE_MISMATCH)
            ready = steps.ready(loaded, proof, who, now)
            if isinstance(ready, Closed):
                audit_verify(tx, now, who, loaded.challenge, ready.outcome.result,
                             loaded.record.factor.method)
                return ready.outcome
            await self._ask_policy(tx, ready.challenge.purpose, ready.record, now)
            if remember_as is not None:
                self._devices.check_remember(ready.challenge, ready.record.factor)
            passed = await steps.attempt(tx, ready, who, now, account_email)
            if isinstance(passed, Failed):
                return passed.outcome
            handler = _PURPOSES[passed.challenge.purpose]
            return await handler(self, _Approved(tx, passed, who, now, account_email,
                                                 open_session, remember_as))

    async def _ask_policy(self, tx: Transaction, purpose: Purpose, record: FactorRecord,
                          now: datetime) -> None:
        """The proof model (service/policy.py) for what approving this challenge would
        change, with the evidence it would be once the proof is right.

        CONFIRM_ENROLLMENT: a proof with the PENDING factor itself, and, when Enroll
        needed a session, that session still live (a logout ends what it started).
        LOGIN: a proof with an ACTIVE factor or a recovery code. DISABLE: a proof with the
        factor itself. CHANGE_PHONE and REGENERATE_RECOVERY_CODES only approve a proof:
        the call that consumes it asks the table.
        """
        if purpose is Purpose.CONFIRM_ENROLLMENT:
            shown = {Evidence.PROOF_WITH_TARGET}
            enrolled_by = record.enrolled_session_id
            if enrolled_by is not None and await self._sessions.is_live(tx, enrolled_by, now):
                shown.add(Evidence.ENROLLING_SESSION)
            # Enrolled with no session: enrolled as a first factor (_confirm checks it
            # still is, on the summary it reads anyway).
            policy.require(Change.CONFIRM_FIRST_PENDING if enrolled_by is None
                           else Change.CONFIRM_PENDING, shown)
        elif purpose is Purpose.LOGIN:
            policy.require(Change.LOG_IN, {login_evidence(record.factor)})
        elif purpose is Purpose.DISABLE:
            disabling.ask_policy(record, record, now)

    # -- the purposes ------------------------------------------------------------------------
    async def _login(self, a: _Approved) -> VerifyOutcome:
        record, challenge = a.passed.record, a.passed.challenge
        a.tx.later.factors.touch(record.factor.factor_id, a.now)
        session = self._sessions.open(a.tx, record, challenge.application, a.who, a.now,
                                      channel=challenge.channel)
        audit_verify(a.tx, a.now, a.who, challenge, VerifyResult.APPROVED,
                     record.factor.method, session_id=session.session.session_id)
        device = None
        if a.remember_as is not None:
            device = await self._devices.remember(a.tx, record.factor, challenge.application,
                                                  a.remember_as, session, a.who, a.now)
        return VerifyOutcome(VerifyResult.APPROVED, a.passed.remaining, session=session,
                             device=device)

    async def _confirm(self, a: _Approved) -> VerifyOutcome:
        tx, now, record, challenge = a.tx, a.now, a.passed.record, a.passed.challenge
        factor = record.factor
        audit_verify(tx, now, a.who, challenge, VerifyResult.APPROVED, factor.method)
        replaced = await self._retire_replaced(tx, record, a.who, now)
        summary = await tx.factors.summary(factor.user_id, factor.method)
        if summary.active_of_method is not None and factor.method not in SEVERAL_ACTIVE:
            raise already_enrolled()
        first = not summary.any_active
        if not first and record.enrolled_session_id is None:
            # Enrolled as a first factor, but another one became ACTIVE meanwhile
            # (confirming that one superseded this; defence in depth): no session
            # vouched for adding it as a second factor.
            policy.require(Change.CONFIRM_PENDING, {Evidence.PROOF_WITH_TARGET})
        if first:
            # The user's first factor: any other PENDING factor was enrolled without a
            # step-up (none was needed then) and must not become a second factor later
            # without one.
            for other in await tx.factors.supersede_other_pending(
                    factor.user_id, factor.factor_id, now):
                audit.record(tx, now, audit.Event.DISABLE, audit.Outcome.OK, a.who,
                             user_id=factor.user_id, factor_id=other,
                             detail={"reason": audit.Reason.SUPERSEDED_BY_FIRST.value})
        # The first factor is established at once (no one else's factor existed to
        # protect); a later one only after MFA_NEW_CREDENTIAL_HOLD (service/policy.py).
        established_at = self._rules.established_at(now, first=first)
        if not await tx.factors.activate(factor.factor_id, now, established_at):
            raise FailedPrecondition("the factor is no longer pending",
                                     reason=ErrorReason.ERROR_REASON_FACTOR_STATUS_FORBIDS)
        audit.record(tx, now, audit.Event.CONFIRM, audit.Outcome.OK, a.who,
                     user_id=factor.user_id, factor_id=factor.factor_id,
                     application=challenge.application, detail={"method": factor.method.value})
        if replaced is not None:
            audit.record(tx, now, audit.Event.PHONE_CHANGED, audit.Outcome.OK, a.who,
                         user_id=factor.user_id, factor_id=factor.factor_id,
                         application=challenge.application,
                         detail={"replaced_factor_id": replaced.factor.factor_id})
            await self._notifier.notify(tx, now, factor.user_id, NoticeKind.PHONE_CHANGED,
                                        who=a.who, also=replaced,
                                        masked_detail=factor.masked_destination,
                                        skip=factor.factor_id, account_email=a.account_email)
        else:
            await self._notifier.notify(tx, now, factor.user_id, NoticeKind.FACTOR_ADDED,
                                        who=a.who, masked_detail=factor.masked_destination,
                                        skip=factor.factor_id, account_email=a.account_email)
        codes = await self._recovery.issue_first(tx, factor.user_id, a.who, now)
        active = replace(factor, status=FactorStatus.ACTIVE, confirmed_at=now, last_used_at=now,
                         established_at=established_at)
        session = None
        if a.open_session and first:
            # The code just proved the user's first (now ACTIVE) factor: what a login
            # needs (service/policy.py), so the caller need not ask for a second code.
            policy.require(Change.LOG_IN, {Evidence.PROOF_WITH_ACTIVE})
            session = self._sessions.open(tx, replace(record, factor=active),
                                          challenge.application, a.who, now,
                                          channel=challenge.channel)
        return VerifyOutcome(VerifyResult.APPROVED, a.passed.remaining, session=session,
                             factor=active, recovery_codes=tuple(codes))

    async def _disable(self, a: _Approved) -> VerifyOutcome:
        p = a.passed
        return await self._removal.remove(a.tx, p.challenge, p.record, p.record, p.remaining,
                                          a.who, a.now, a.account_email)

    async def _proof_only(self, a: _Approved) -> VerifyOutcome:
        # The approval itself is the proof a later call consumes once: Enroll(METHOD_PHONE)
        # for a phone change, RegenerateRecoveryCodes for new codes.
        record = a.passed.record
        a.tx.later.factors.touch(record.factor.factor_id, a.now)
        audit_verify(a.tx, a.now, a.who, a.passed.challenge, VerifyResult.APPROVED,
                     record.factor.method)
        return VerifyOutcome(VerifyResult.APPROVED, a.passed.remaining,
                             factor=replace(record.factor, last_used_at=a.now))

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


_PURPOSES: dict[Purpose, Handler] = {
    Purpose.LOGIN: Verification._login,
    Purpose.CONFIRM_ENROLLMENT: Verification._confirm,
    Purpose.DISABLE: Verification._disable,
    Purpose.CHANGE_PHONE: Verification._proof_only,
    Purpose.REGENERATE_RECOVERY_CODES: Verification._proof_only,
}
