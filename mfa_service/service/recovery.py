"""Recovery codes: issued with the user's first active factor, regenerated with a proof
on an established factor (service/policy.py), retired with the last real factor. Using
one is a verification like any other (factors/recovery.py consumes the code;
verification.py does the purpose).

The recovery-code factor row stands for the current code set: its ``established_at``
says from when the set may disable another factor (at once for the codes issued with
the first factor, MFA_NEW_CREDENTIAL_HOLD after a regeneration)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from mfa.v1.error_reason_pb2 import ErrorReason

from mfa_service.clock import Clock
from mfa_service.crypto import Keyring
from mfa_service.domain import (
    Application,
    AuditContext,
    Challenge,
    Factor,
    FactorRecord,
    FactorStatus,
    Method,
    NoticeKind,
    Purpose,
)
from mfa_service.errors import FailedPrecondition
from mfa_service.factors.recovery import generate_codes, hash_codes
from mfa_service.service import audit, policy
from mfa_service.service.notices import Notifier
from mfa_service.service.policy import Change, Evidence
from mfa_service.service.rules import Rules, new_id, proof_evidence
from mfa_service.service.sessions import SessionService
from mfa_service.store.database import Database, Transaction


class Recovery:
    def __init__(self, db: Database, clock: Clock, keyring: Keyring, rules: Rules,
                 notifier: Notifier, sessions: SessionService,
                 new_id: Callable[[], str] = new_id) -> None:
        self._db = db
        self._clock = clock
        self._keyring = keyring
        self._rules = rules
        self._notifier = notifier
        self._sessions = sessions
        self._new_id = new_id

    async def issue_first(self, tx: Transaction, user_id: str, who: AuditContext,
                          now: datetime) -> list[str]:
        """Recovery codes come with the user's first active factor, once."""
        if await tx.factors.active_of_method(user_id, Method.RECOVERY_CODE) is not None:
            return []
        factor_id = self._new_id()
        tx.later.factors.add(FactorRecord(
            factor=Factor(factor_id=factor_id, user_id=user_id, method=Method.RECOVERY_CODE,
                          status=FactorStatus.ACTIVE, masked_destination="recovery codes",
                          created_at=now, confirmed_at=now, last_used_at=now,
                          # Issued with the first factor: established at once.
                          established_at=self._rules.established_at(now, first=True)),
            label="recovery codes", destination=None, secret_ciphertext=None,
            secret_key_id=None, last_totp_step=None))
        codes = generate_codes()
        await tx.recovery.retire(user_id, now)
        tx.later.recovery.add(user_id, hash_codes(self._keyring, user_id, codes), now)
        audit.record(tx, now, audit.Event.RECOVERY_CODES_ISSUED, audit.Outcome.OK, who,
                     user_id=user_id, factor_id=factor_id, detail={"count": len(codes)})
        return codes

    async def code_used(self, tx: Transaction, challenge: Challenge, record: FactorRecord,
                        who: AuditContext, now: datetime, account_email: str | None) -> None:
        """A recovery code passed (factors/recovery.py consumed it): audit it, and tell
        the user how many are left (a use they did not make is a stolen code)."""
        user_id = record.factor.user_id
        tx.later.factors.touch(record.factor.factor_id, now)
        left = await tx.recovery.remaining(user_id)
        audit.record(tx, now, audit.Event.RECOVERY_CODE_USED, audit.Outcome.OK, who,
                     user_id=user_id, factor_id=record.factor.factor_id,
                     application=challenge.application,
                     detail={"purpose": challenge.purpose.value, "remaining": left})
        await self._notifier.notify(tx, now, user_id, NoticeKind.RECOVERY_CODES_USED,
                                    who=who, masked_detail=f"{left} left",
                                    account_email=account_email)

    async def retire_if_last(self, tx: Transaction, user_id: str, who: AuditContext,
                             now: datetime) -> None:
        """With no real factor left, 2FA is off: recovery codes must not log anyone in."""
        records = await tx.factors.list_for_user(user_id)
        active = [r for r in records if r.factor.status is FactorStatus.ACTIVE]
        recovery = next((r for r in active if r.factor.method is Method.RECOVERY_CODE), None)
        if recovery is None or any(r.factor.method is not Method.RECOVERY_CODE
                                   for r in active):
            return
        await tx.factors.disable(recovery.factor.factor_id, now)
        retired = await tx.recovery.retire(user_id, now)
        audit.record(tx, now, audit.Event.DISABLE, audit.Outcome.OK, who, user_id=user_id,
                     factor_id=recovery.factor.factor_id,
                     detail={"method": Method.RECOVERY_CODE.value,
                             "reason": audit.Reason.LAST_FACTOR_DISABLED.value,
                             "codes_retired": retired})
        await self._sessions.end_for_factor(tx, recovery.factor, who, now)

    async def regenerate(self, user_id: str, proof_challenge_id: str,
                         application: Application, who: AuditContext, *,
                         account_email: str | None = None) -> list[str]:
        """New codes (the old ones die), proven by an approved
        PURPOSE_REGENERATE_RECOVERY_CODES challenge on an established ACTIVE factor,
        consumed here. A session alone is never enough: a stolen fresh session would
        mint codes that then disable the user's factors. The new set is itself new for
        MFA_NEW_CREDENTIAL_HOLD: it logs in, but disables nothing until then."""
        who.authorize(application)
        now = self._clock.now()
        async with self._db.transaction() as tx:
            await tx.lockouts.lock(user_id)  # the per-user lock, first
            presented = {Evidence.PASSWORD_STEP}
            established_at = None
            proven = (await tx.challenges.consume_proof(
                proof_challenge_id, user_id, Purpose.REGENERATE_RECOVERY_CODES,
                now - self._rules.change_proof_max_age, now) if proof_challenge_id else None)
            if proven is not None:
                record = await tx.factors.get(proven)
                if (record is not None and record.factor.status is FactorStatus.ACTIVE
                        and record.factor.method is not Method.RECOVERY_CODE):
                    presented.add(proof_evidence(record.factor, now))
                    established_at = record.factor.established_at
            policy.require(Change.REGENERATE_RECOVERY_CODES, presented,
                           established_at=established_at)
            recovery = await tx.factors.active_of_method(user_id, Method.RECOVERY_CODE)
            if recovery is None:
                raise FailedPrecondition("the user has no active factor, so no recovery codes",
                                         reason=ErrorReason.ERROR_REASON_FACTOR_STATUS_FORBIDS)
            codes = generate_codes()
            await tx.recovery.retire(user_id, now)
            tx.later.recovery.add(user_id, hash_codes(self._keyring, user_id, codes), now)
            await tx.factors.set_established(recovery.factor.factor_id,
                                             self._rules.established_at(now, first=False))
            audit.record(tx, now, audit.Event.RECOVERY_CODES_ISSUED, audit.Outcome.OK, who,
                         user_id=user_id, factor_id=recovery.factor.factor_id,
                         application=application,
                         detail={"count": len(codes), "regenerated": 1,
                                 "proof": proven or ""})
            await self._notifier.notify(tx, now, user_id, NoticeKind.RECOVERY_CODES_REGENERATED,
                                        who=who, account_email=account_email)
        return codes
