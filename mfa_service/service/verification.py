"""Verify and Disable: check a code against a challenge, then carry out its purpose.

The path, one transaction:

1. lock the user who owns the challenge (one statement that also finds them);
2. read the challenge and its factor (current: the user's writes are serialised);
3. refusals: caller rights, the factor's status for the purpose, the lockout;
4. the factor method checks the code and finishes its own atomic step (the TOTP step
   accepted, the recovery code consumed);
5. one conditional UPDATE counts the attempt and closes the challenge (APPROVED, or
   EXHAUSTED at the last attempt);
6. a failure counts against the user's lockout; an approval runs the purpose's handler
   (the table ``_PURPOSES``): LOGIN opens a session, CONFIRM_ENROLLMENT activates the
   factor, DISABLE disables the target, CHANGE_PHONE only approves (the proof Enroll
   consumes).

On PostgreSQL a TOTP login is four statements: the lock, the read, the attempt, and the
deferred writes (TOTP step, session, audit rows) sent as one before COMMIT.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime

from mfa.v1.error_reason_pb2 import ErrorReason

from mfa_service.domain import (
    AuditContext,
    Challenge,
    ChallengeState,
    Factor,
    FactorRecord,
    FactorStatus,
    Method,
    NewDevice,
    NewSession,
    NoticeKind,
    Proof,
    ProofField,
    Purpose,
    VerifyResult,
)
from mfa_service.errors import ChallengeNotFound, FailedPrecondition, GuardLost, InvalidArgument
from mfa_service.factors.base import FactorMethod, Refusal
from mfa_service.service import audit, policy
from mfa_service.service.context import (
    SEVERAL_ACTIVE,
    Context,
    already_enrolled,
    owned_factor,
    proof_evidence,
    require_status,
)
from mfa_service.service.devices import TrustedDevices
from mfa_service.service.policy import Change, Evidence
from mfa_service.service.recovery import Recovery
from mfa_service.store.database import Transaction
from mfa_service.store.security import LockoutState


@dataclass(frozen=True)
class VerifyOutcome:
    result: VerifyResult
    attempts_remaining: int
    session: NewSession | None = None
    factor: Factor | None = None
    recovery_codes: tuple[str, ...] = ()
    device: NewDevice | None = None  # remember_device: the browser remembered


@dataclass(frozen=True)
class _Approved:
    """What a purpose handler gets: the approved challenge, the factor that passed, the
    factor the call acts on (Disable may name another one), and the call's context."""

    tx: Transaction
    challenge: Challenge
    record: FactorRecord
    target: FactorRecord
    remaining: int
    who: AuditContext
    now: datetime
    account_email: str | None = None  # notices go here too (the account's own address)
    open_session: bool = False  # confirming a first factor: also log in
    remember_as: str | None = None  # LOGIN: remember the browser under this label


Handler = Callable[["Verification", _Approved], Awaitable[VerifyOutcome]]

_OTHER_FIELD = {ProofField.CODE: ProofField.WEBAUTHN_RESPONSE,
                ProofField.WEBAUTHN_RESPONSE: ProofField.CODE}


def _as_proof(proof: Proof | str) -> Proof:
    return Proof(code=proof) if isinstance(proof, str) else proof


def _proof_for(method: FactorMethod, proof: Proof) -> str:
    """The proof in the field the challenged factor's method reads; the other field set
    is a caller's mistake (INVALID_ARGUMENT, no attempt counted), not a wrong guess."""
    wanted = method.proof_field
    other = _OTHER_FIELD[wanted]
    if proof.field_for(other):
        raise InvalidArgument.single(
            other.value, f"this challenge is answered with {wanted.value}, not {other.value}")
    return proof.field_for(wanted)


async def _again_if_guard_lost(run: Callable[[], Awaitable[VerifyOutcome]]) -> VerifyOutcome:
    """Run a verification; once more if a guarded write lost its race (store/unit.py).

    The per-user lock makes that impossible in normal operation; should anything write a
    factor without it, the loser's transaction rolled back whole (its attempt too) and
    the second run decides on the winner's state: a replayed TOTP step is then a wrong
    code, counted as one. A second loss is ABORTED (retryable)."""
    try:
        return await run()
    except GuardLost:
        return await run()


class Verification:
    def __init__(self, ctx: Context, recovery: Recovery, devices: TrustedDevices) -> None:
        self._ctx = ctx
        self._recovery = recovery
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
        return await _again_if_guard_lost(lambda: self._verify(
            challenge_id, _as_proof(proof), who, disable=None, expect_user=user_id,
            account_email=account_email, open_session=open_session,
            remember_as=remember_as))

    async def disable(self, user_id: str, factor_id: str, challenge_id: str,
                      proof: Proof | str, who: AuditContext, *,
                      account_email: str | None = None) -> VerifyOutcome:
        """Disable ``factor_id``, proven on a PURPOSE_DISABLE challenge for it (or on an
        established set of recovery codes: service/policy.py)."""
        return await _again_if_guard_lost(lambda: self._verify(
            challenge_id, _as_proof(proof), who, disable=(user_id, factor_id),
            expect_user=user_id, account_email=account_email))

    async def _verify(self, challenge_id: str, proof: Proof, who: AuditContext,
                      disable: tuple[str, str] | None,
                      expect_user: str | None,
                      account_email: str | None = None,
                      open_session: bool = False,
                      remember_as: str | None = None) -> VerifyOutcome:
        ctx = self._ctx
        now = ctx.clock.now()
        async with ctx.db.transaction() as tx:
            # The per-user lock before anything else (one order everywhere: no deadlock
            # with Challenge); what is read after it is current for this user.
            locked = await tx.lockouts.lock_for_challenge(challenge_id)
            found = await tx.challenges.get_with_factor(challenge_id) if locked else None
            if locked is None or found is None or (
                    expect_user is not None and found[0].user_id != expect_user):
                raise ChallengeNotFound()
            lockout = locked[1]
            challenge, record = found
            target = record
            if disable is not None:
                target = await self._disable_target(tx, challenge, record, now, *disable)
            elif (challenge.purpose is Purpose.DISABLE
                  and record.factor.method is Method.RECOVERY_CODE):
                # Verify would disable the recovery codes themselves; the caller means
                # Disable(factor_id=<the lost factor>) with this challenge.
                raise FailedPrecondition(
                    "a PURPOSE_DISABLE challenge on recovery codes is used with Disable, "
                    "naming the factor to remove",
                    reason=ErrorReason.ERROR_REASON_CHALLENGE_MISMATCH)
            who.authorize(challenge.application)
            method = ctx.registry.get(record.factor.method)
            code = method.parse_code(_proof_for(method, proof))  # malformed: not a guess
            # A PENDING factor past MFA_PENDING_TTL is gone: its challenge is expired.
            usable = challenge.state is ChallengeState.OPEN and challenge.expires_at > now and (
                challenge.attempts < challenge.max_attempts) and not ctx.gone(record.factor, now)
            if usable:
                require_status(record.factor, challenge.purpose)
            ctx.refuse_if_locked(lockout, now,
                                 recovery=record.factor.method is Method.RECOVERY_CODE)
            if not usable:
                outcome = self._closed_outcome(challenge, now)
                self._audit_verify(tx, now, who, challenge, outcome.result,
                                   record.factor.method)
                return outcome
            # Before the code is checked: evidence the table refuses costs no attempt.
            await self._ask_policy(tx, challenge, record, target, now)
            if remember_as is not None:
                self._devices.check_remember(challenge, record.factor)
            # The user's lock makes the read above current, so the factor's own check
            # (and its atomic step) and the attempt below cannot interleave with another
            # verification of this user.
            verdict = await method.check(tx, record, challenge, code, now)
            ok = verdict.ok
            if verdict.alarm is not None:
                audit.record(tx, now, audit.Event.ALARM, audit.Outcome.FAILED, who,
                             user_id=challenge.user_id, factor_id=challenge.factor_id,
                             challenge_id=challenge_id, application=challenge.application,
                             detail={"alarm": verdict.alarm.value, **verdict.detail})
            if verdict.display_name is not None:
                record = replace(record, factor=replace(
                    record.factor, masked_destination=verdict.display_name))
                target = record if disable is None else target
            settled = await tx.challenges.settle_attempt(challenge_id, ok, now)
            if settled is None:  # pragma: no cover - excluded by the lock and the read
                return self._closed_outcome(challenge, now)
            remaining = settled.max_attempts - settled.attempts
            if not ok:
                result = (VerifyResult.MAX_ATTEMPTS_REACHED if remaining == 0
                          else VerifyResult.INVALID_CODE)
                self._audit_verify(tx, now, who, settled, result, record.factor.method,
                                   refused=verdict.reason)
                await self._count_failure(tx, lockout, settled, who, now, account_email)
                return VerifyOutcome(result, remaining)
            if lockout != ctx.lockout.after_success():  # no write when already clear
                tx.later.lockouts.save(settled.user_id, ctx.lockout.after_success())
            if record.factor.method is Method.RECOVERY_CODE:
                await self._recovery_code_used(tx, settled, record, who, now, account_email)
            handler = _PURPOSES[settled.purpose]
            return await handler(self, _Approved(tx, settled, record, target, remaining,
                                                 who, now, account_email, open_session,
                                                 remember_as))

    async def _ask_policy(self, tx: Transaction, challenge: Challenge, record: FactorRecord,
                          target: FactorRecord, now: datetime) -> None:
        """The proof model (service/policy.py) for what approving this challenge would
        change, with the evidence it would be once the code is right.

        CONFIRM_ENROLLMENT: a proof with the PENDING factor itself, and, when Enroll
        needed a session, that session still live (a logout ends what it started).
        LOGIN: a proof with an ACTIVE factor or a recovery code. DISABLE: a proof with the
        target itself, or an *established* recovery code (a new factor or new codes
        never remove what the user had). CHANGE_PHONE and REGENERATE_RECOVERY_CODES only
        approve a proof: the call that consumes it asks the table.
        """
        ctx, factor, purpose = self._ctx, record.factor, challenge.purpose
        if purpose is Purpose.CONFIRM_ENROLLMENT:
            shown = {Evidence.PROOF_WITH_TARGET}
            enrolled_by = record.enrolled_session_id
            if enrolled_by is not None and await ctx.sessions.is_live(tx, enrolled_by, now):
                shown.add(Evidence.ENROLLING_SESSION)
            # Enrolled with no session: enrolled as a first factor (_confirm checks it
            # still is, on the summary it reads anyway).
            policy.require(Change.CONFIRM_FIRST_PENDING if enrolled_by is None
                           else Change.CONFIRM_PENDING, shown)
        elif purpose is Purpose.LOGIN:
            policy.require(Change.LOG_IN, {Evidence.RECOVERY_CODE
                                           if factor.method is Method.RECOVERY_CODE
                                           else Evidence.PROOF_WITH_ACTIVE})
        elif purpose is Purpose.DISABLE:
            shown_one = (Evidence.PROOF_WITH_TARGET
                         if factor.factor_id == target.factor.factor_id
                         else proof_evidence(factor, now))
            policy.require(Change.DISABLE_FACTOR, {shown_one},
                           established_at=factor.established_at)

    # -- the purposes ------------------------------------------------------------------------
    async def _login(self, a: _Approved) -> VerifyOutcome:
        a.tx.later.factors.touch(a.record.factor.factor_id, a.now)
        session = self._ctx.sessions.open(a.tx, a.record, a.challenge.application, a.who,
                                          a.now, channel=a.challenge.channel)
        self._audit_verify(a.tx, a.now, a.who, a.challenge, VerifyResult.APPROVED,
                           a.record.factor.method, session_id=session.session.session_id)
        device = None
        if a.remember_as is not None:
            device = await self._devices.remember(a.tx, a.record.factor,
                                                  a.challenge.application, a.remember_as,
                                                  session, a.who, a.now)
        return VerifyOutcome(VerifyResult.APPROVED, a.remaining, session=session,
                             device=device)

    async def _confirm(self, a: _Approved) -> VerifyOutcome:
        ctx, tx, now, factor = self._ctx, a.tx, a.now, a.record.factor
        self._audit_verify(tx, now, a.who, a.challenge, VerifyResult.APPROVED,
                           a.record.factor.method)
        replaced = await self._retire_replaced(tx, a.record, a.who, now)
        summary = await tx.factors.summary(factor.user_id, factor.method)
        if summary.active_of_method is not None and factor.method not in SEVERAL_ACTIVE:
            raise already_enrolled()
        first = not summary.any_active
        if not first and a.record.enrolled_session_id is None:
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
                             detail={"reason": "superseded by the first factor"})
        # The first factor is established at once (no one else's factor existed to
        # protect); a later one only after MFA_NEW_CREDENTIAL_HOLD (service/policy.py).
        established_at = ctx.established_at(now, first=first)
        if not await tx.factors.activate(factor.factor_id, now, established_at):
            raise FailedPrecondition("the factor is no longer pending",
                                     reason=ErrorReason.ERROR_REASON_FACTOR_STATUS_FORBIDS)
        audit.record(tx, now, audit.Event.CONFIRM, audit.Outcome.OK, a.who,
                     user_id=factor.user_id, factor_id=factor.factor_id,
                     application=a.challenge.application, detail={"method": factor.method.value})
        if replaced is not None:
            audit.record(tx, now, audit.Event.PHONE_CHANGED, audit.Outcome.OK, a.who,
                         user_id=factor.user_id, factor_id=factor.factor_id,
                         application=a.challenge.application,
                         detail={"replaced_factor_id": replaced.factor.factor_id})
            await ctx.notifier.notify(tx, now, factor.user_id, NoticeKind.PHONE_CHANGED,
                                      who=a.who, also=replaced,
                                      masked_detail=factor.masked_destination,
                                      skip=factor.factor_id, account_email=a.account_email)
        else:
            await ctx.notifier.notify(tx, now, factor.user_id, NoticeKind.FACTOR_ADDED,
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
            session = ctx.sessions.open(tx, replace(a.record, factor=active),
                                        a.challenge.application, a.who, now,
                                        channel=a.challenge.channel)
        return VerifyOutcome(VerifyResult.APPROVED, a.remaining, session=session,
                             factor=active, recovery_codes=tuple(codes))

    async def _disable(self, a: _Approved) -> VerifyOutcome:
        ctx, tx, now, factor = self._ctx, a.tx, a.now, a.target.factor
        self._audit_verify(tx, now, a.who, a.challenge, VerifyResult.APPROVED,
                           a.record.factor.method)
        if not await tx.factors.disable(factor.factor_id, now):
            raise FailedPrecondition("the factor is disabled",
                                     reason=ErrorReason.ERROR_REASON_FACTOR_DISABLED)
        audit.record(tx, now, audit.Event.DISABLE, audit.Outcome.OK, a.who,
                     user_id=factor.user_id, factor_id=factor.factor_id,
                     application=a.challenge.application,
                     detail={"method": factor.method.value, "proof": a.challenge.factor_id})
        await ctx.sessions.end_for_factor(tx, factor, a.who, now)
        # Tell the user, including at the address just removed.
        await ctx.notifier.notify(tx, now, factor.user_id, NoticeKind.FACTOR_REMOVED,
                                  who=a.who, also=a.target, masked_detail=factor.masked_destination,
                                  account_email=a.account_email)
        await self._recovery.retire_if_last(tx, factor.user_id, a.who, now)
        disabled = replace(factor, status=FactorStatus.DISABLED, disabled_at=now)
        return VerifyOutcome(VerifyResult.APPROVED, a.remaining, factor=disabled)

    async def _proof_only(self, a: _Approved) -> VerifyOutcome:
        # The approval itself is the proof a later call consumes once: Enroll(METHOD_PHONE)
        # for a phone change, RegenerateRecoveryCodes for new codes.
        a.tx.later.factors.touch(a.record.factor.factor_id, a.now)
        self._audit_verify(a.tx, a.now, a.who, a.challenge, VerifyResult.APPROVED,
                           a.record.factor.method)
        return VerifyOutcome(VerifyResult.APPROVED, a.remaining,
                             factor=replace(a.record.factor, last_used_at=a.now))

    # -- helpers -----------------------------------------------------------------------------
    async def _disable_target(self, tx: Transaction, challenge: Challenge,
                              record: FactorRecord, now: datetime, user_id: str,
                              factor_id: str) -> FactorRecord:
        """The factor a Disable call may switch off with this challenge.

        The challenge must be a PURPOSE_DISABLE challenge of the same user. Whether its
        factor may prove this (the factor itself, or an established set of recovery
        codes) is the proof model's to say (_ask_policy). Another user's challenge is
        "not found", never a hint.
        """
        target = await owned_factor(self._ctx, tx, user_id, factor_id, now)
        if challenge.purpose is not Purpose.DISABLE:
            raise FailedPrecondition("the challenge was not opened to disable a factor",
                                     reason=ErrorReason.ERROR_REASON_CHALLENGE_MISMATCH)
        if target.factor.method is Method.RECOVERY_CODE:
            raise FailedPrecondition(
                "recovery codes are removed with the user's last factor, not on their own",
                reason=ErrorReason.ERROR_REASON_FACTOR_STATUS_FORBIDS)
        return target

    async def _count_failure(self, tx: Transaction, state: LockoutState, challenge: Challenge,
                             who: AuditContext, now: datetime,
                             account_email: str | None) -> None:
        """Count a wrong code against the user; at a lock, audit it and tell the user."""
        ctx = self._ctx
        new_state, locked = ctx.lockout.after_failure(state, now)
        tx.later.lockouts.save(challenge.user_id, new_state)
        if not locked:
            return
        detail: dict[str, str | int] = {"failures": new_state.consecutive_failures}
        if new_state.locked_until is not None:
            detail["locked_until"] = new_state.locked_until.isoformat()
        if new_state.admin_reset_required:
            detail["admin_reset_required"] = 1
        audit.record(tx, now, audit.Event.LOCKOUT, audit.Outcome.OK, who,
                     user_id=challenge.user_id, factor_id=challenge.factor_id,
                     application=challenge.application, detail=detail)
        await ctx.notifier.notify(tx, now, challenge.user_id, NoticeKind.ACCOUNT_LOCKED,
                                  who=who, account_email=account_email)

    async def _recovery_code_used(self, tx: Transaction, challenge: Challenge,
                                  record: FactorRecord, who: AuditContext,
                                  now: datetime, account_email: str | None) -> None:
        user_id = record.factor.user_id
        tx.later.factors.touch(record.factor.factor_id, now)
        left = await tx.recovery.remaining(user_id)
        audit.record(tx, now, audit.Event.RECOVERY_CODE_USED, audit.Outcome.OK, who,
                     user_id=user_id, factor_id=record.factor.factor_id,
                     application=challenge.application,
                     detail={"purpose": challenge.purpose.value, "remaining": left})
        await self._ctx.notifier.notify(tx, now, user_id, NoticeKind.RECOVERY_CODES_USED,
                                        who=who, masked_detail=f"{left} left",
                                        account_email=account_email)

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
        await self._ctx.sessions.end_for_factor(tx, old.factor, who, now)
        return old

    @staticmethod
    def _closed_outcome(challenge: Challenge, now: datetime) -> VerifyOutcome:
        """Why a challenge takes no attempt: used, exhausted or expired (in that order)."""
        if challenge.state in (ChallengeState.APPROVED, ChallengeState.SUPERSEDED):
            return VerifyOutcome(VerifyResult.ALREADY_USED, 0)
        if (challenge.state is ChallengeState.EXHAUSTED
                or challenge.attempts >= challenge.max_attempts):
            return VerifyOutcome(VerifyResult.MAX_ATTEMPTS_REACHED, 0)
        return VerifyOutcome(VerifyResult.EXPIRED, challenge.max_attempts - challenge.attempts)

    @staticmethod
    def _audit_verify(tx: Transaction, now: datetime, who: AuditContext, challenge: Challenge,
                      result: VerifyResult, method: Method,
                      session_id: str | None = None, refused: Refusal | None = None) -> None:
        audit.record(
            tx, now, audit.Event.VERIFY,
            audit.Outcome.OK if result is VerifyResult.APPROVED else audit.Outcome.FAILED, who,
            user_id=challenge.user_id, factor_id=challenge.factor_id,
            challenge_id=challenge.challenge_id, session_id=session_id,
            application=challenge.application,
            detail={"result": result.value, "purpose": challenge.purpose.value,
                    "method": method.value,
                    # Which check refused it (a passkey: origin/RP ID/UV/signature in one
                    # word, never the proof), for the security team.
                    **({"refused": refused.value} if refused else {})})


_PURPOSES: dict[Purpose, Handler] = {
    Purpose.LOGIN: Verification._login,
    Purpose.CONFIRM_ENROLLMENT: Verification._confirm,
    Purpose.DISABLE: Verification._disable,
    Purpose.CHANGE_PHONE: Verification._proof_only,
    Purpose.REGENERATE_RECOVERY_CODES: Verification._proof_only,
}
