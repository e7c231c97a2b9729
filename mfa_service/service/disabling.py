"""Disable: switch off a factor, proven on a PURPOSE_DISABLE challenge for it, or on an
established set of recovery codes (the proof model, service/policy.py).

One transaction, the steps of service/attempts.py: load (under the user's lock); the
target, which must be the user's and not the recovery codes themselves; ready; the proof
model; the attempt; then ``Removal.remove``, which Verify also uses when a
PURPOSE_DISABLE challenge is verified on the factor itself.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from mfa.v1.error_reason_pb2 import ErrorReason

from mfa_service.clock import Clock
from mfa_service.domain import (
    AuditContext,
    Challenge,
    FactorRecord,
    FactorStatus,
    Method,
    NoticeKind,
    Proof,
    Purpose,
    VerifyResult,
)
from mfa_service.errors import FailedPrecondition
from mfa_service.service import audit, policy
from mfa_service.service.attempts import (
    Closed,
    Failed,
    Steps,
    VerifyOutcome,
    again_if_guard_lost,
    audit_verify,
)
from mfa_service.service.notices import Notifier
from mfa_service.service.policy import Change
from mfa_service.service.recovery import Recovery
from mfa_service.service.rules import Rules, owned_factor, proof_evidence
from mfa_service.service.sessions import SessionService
from mfa_service.store.database import Database, Transaction


class Removal:
    """Removing an ACTIVE factor once the proof passed: the factor, its sessions, a
    notice (also to the address removed), and the recovery codes with the last one."""

    def __init__(self, sessions: SessionService, notifier: Notifier,
                 recovery: Recovery) -> None:
        self._sessions = sessions
        self._notifier = notifier
        self._recovery = recovery

    async def remove(self, tx: Transaction, challenge: Challenge, prover: FactorRecord,
                     target: FactorRecord, remaining: int, who: AuditContext, now: datetime,
                     account_email: str | None) -> VerifyOutcome:
        factor = target.factor
        audit_verify(tx, now, who, challenge, VerifyResult.APPROVED, prover.factor.method)
        if not await tx.factors.disable(factor.factor_id, now):
            raise FailedPrecondition("the factor is disabled",
                                     reason=ErrorReason.ERROR_REASON_FACTOR_DISABLED)
        audit.record(tx, now, audit.Event.DISABLE, audit.Outcome.OK, who,
                     user_id=factor.user_id, factor_id=factor.factor_id,
                     application=challenge.application,
                     detail={"method": factor.method.value, "proof": challenge.factor_id})
        await self._sessions.end_for_factor(tx, factor, who, now)
        # Tell the user, including at the address just removed.
        await self._notifier.notify(tx, now, factor.user_id, NoticeKind.FACTOR_REMOVED,
                                    who=who, also=target, masked_detail=factor.masked_destination,
                                    account_email=account_email)
        await self._recovery.retire_if_last(tx, factor.user_id, who, now)
        disabled = replace(factor, status=FactorStatus.DISABLED, disabled_at=now)
        return VerifyOutcome(VerifyResult.APPROVED, remaining, factor=disabled)


def ask_policy(prover: FactorRecord, target: FactorRecord, now: datetime) -> None:
    """DISABLE: a proof with the target itself, or an *established* recovery code (a new
    factor or new codes never remove what the user had)."""
    factor = prover.factor
    shown = (policy.Evidence.PROOF_WITH_TARGET if factor.factor_id == target.factor.factor_id
             else proof_evidence(factor, now))
    policy.require(Change.DISABLE_FACTOR, {shown}, established_at=factor.established_at)


class Disabling:
    def __init__(self, db: Database, clock: Clock, rules: Rules, steps: Steps,
                 removal: Removal) -> None:
        self._db = db
        self._clock = clock
        self._rules = rules
        self._steps = steps
        self._removal = removal

    async def disable(self, user_id: str, factor_id: str, challenge_id: str,
                      proof: Proof | str, who: AuditContext, *,
                      account_email: str | None = None) -> VerifyOutcome:
        """Disable ``factor_id``, proven on a PURPOSE_DISABLE challenge of ``user_id``.
        ``account_email``: the notice also goes there."""
        shown = Proof(code=proof) if isinstance(proof, str) else proof
        return await again_if_guard_lost(lambda _optimistic: self._disable(
            user_id, factor_id, challenge_id, shown, who, account_email))

    async def _disable(self, user_id: str, factor_id: str, challenge_id: str, proof: Proof,
                       who: AuditContext, account_email: str | None) -> VerifyOutcome:
        now = self._clock.now()
        steps = self._steps
        async with self._db.transaction() as tx:
            loaded = await steps.load(tx, challenge_id, expect_user=user_id)
            target = await self._target(tx, loaded.challenge, user_id, factor_id, now)
            ready = steps.ready(loaded, proof, who, now)
            if isinstance(ready, Closed):
                audit_verify(tx, now, who, loaded.challenge, ready.outcome.result,
                             loaded.record.factor.method)
                return ready.outcome
            ask_policy(ready.record, target, now)  # before the attempt: a refusal costs none
            passed = await steps.attempt(tx, ready, who, now, account_email)
            if isinstance(passed, Failed):
                return passed.outcome
            return await self._removal.remove(tx, passed.challenge, passed.record, target,
                                              passed.remaining, who, now, account_email)

    async def _target(self, tx: Transaction, challenge: Challenge, user_id: str,
                      factor_id: str, now: datetime) -> FactorRecord:
        """The factor a Disable call may switch off with this challenge: the user's, on a
        PURPOSE_DISABLE challenge, never the recovery codes on their own. Whether the
        challenge's factor may prove it is the proof model's to say (ask_policy)."""
        target = await owned_factor(tx, self._rules, user_id, factor_id, now)
        if challenge.purpose is not Purpose.DISABLE:
            raise FailedPrecondition("the challenge was not opened to disable a factor",
                                     reason=ErrorReason.ERROR_REASON_CHALLENGE_MISMATCH)
        if target.factor.method is Method.RECOVERY_CODE:
            raise FailedPrecondition(
                "recovery codes are removed with the user's last factor, not on their own",
                reason=ErrorReason.ERROR_REASON_FACTOR_STATUS_FORBIDS)
        return target
