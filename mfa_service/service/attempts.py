"""The steps Verify and Disable share, each a small function returning a value:

1. ``load``: lock the user who owns the challenge (one statement that also finds them)
   and read the challenge with its factor (current: the user's writes are serialised);
2. ``ready`` (pure): the caller's rights, the proof in the field the method reads, then
   the refusals: the factor's status for the purpose and the lockout. A challenge that
   takes no attempt (used, exhausted, expired) comes back as ``Closed``;
3. ``attempt``: the factor method checks the proof and finishes its own atomic step
   (the TOTP step accepted, the recovery code consumed, the passkey counter moved); one
   conditional UPDATE, deferred to COMMIT as a guard, counts the attempt and closes the
   challenge (APPROVED, or EXHAUSTED at the last attempt). A failure is audited and
   counted against the user's lockout (service/lockout.py) and comes back as ``Failed``;
   a success clears the lockout and runs the method's follow-up (a used recovery code is
   audited and notified).

The use cases (verification.py, disabling.py) ask the proof model between 2 and 3, so
evidence the table refuses costs no attempt, and carry out the purpose after 3.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TypeVar

from mfa_service.domain import (
    AuditContext,
    Challenge,
    ChallengeState,
    Factor,
    FactorRecord,
    Method,
    NewDevice,
    NewSession,
    Proof,
    ProofField,
    VerifyResult,
)
from mfa_service.errors import ChallengeNotFound, GuardLost, InvalidArgument
from mfa_service.factors.base import FactorMethod, Refusal
from mfa_service.factors.registry import FactorRegistry
from mfa_service.service import audit
from mfa_service.service.lockout import Lockout
from mfa_service.service.rules import Rules, require_status
from mfa_service.store.database import Transaction
from mfa_service.store.security import LockoutState


@dataclass(frozen=True)
class VerifyOutcome:
    result: VerifyResult
    attempts_remaining: int
    session: NewSession | None = None  # a LOGIN's (or a first factor's, asked for)
    factor: Factor | None = None  # the factor after the change
    recovery_codes: tuple[str, ...] = ()
    device: NewDevice | None = None  # remember_device: the browser remembered


@dataclass(frozen=True)
class Loaded:
    """The challenge and its factor, read under the user's lock."""

    challenge: Challenge
    record: FactorRecord
    lockout: LockoutState


@dataclass(frozen=True)
class Ready:
    """A challenge that will take this attempt: the method and the parsed proof."""

    challenge: Challenge
    record: FactorRecord
    lockout: LockoutState
    method: FactorMethod
    code: str


@dataclass(frozen=True)
class Closed:
    """A challenge that takes no attempt, and what Verify answers for it."""

    outcome: VerifyOutcome


@dataclass(frozen=True)
class Passed:
    """The proof passed; the challenge is APPROVED."""

    challenge: Challenge
    record: FactorRecord  # with the display name the check learnt (a passkey's)
    remaining: int


@dataclass(frozen=True)
class Failed:
    """The proof failed (counted): what Verify answers."""

    outcome: VerifyOutcome


T = TypeVar("T")

_OTHER_FIELD = {ProofField.CODE: ProofField.WEBAUTHN_RESPONSE,
                ProofField.WEBAUTHN_RESPONSE: ProofField.CODE}


def proof_for(method: FactorMethod, proof: Proof) -> str:
    """The proof in the field the challenged factor's method reads; the other field set
    is a caller's mistake (INVALID_ARGUMENT, no attempt counted), not a wrong guess."""
    wanted = method.proof_field
    other = _OTHER_FIELD[wanted]
    if proof.field_for(other):
        raise InvalidArgument.single(
            other.value, f"this challenge is answered with {wanted.value}, not {other.value}")
    return proof.field_for(wanted)


def closed_outcome(challenge: Challenge) -> VerifyOutcome:
    """Why a challenge takes no attempt: used, exhausted or expired (in that order)."""
    if challenge.state in (ChallengeState.APPROVED, ChallengeState.SUPERSEDED):
        return VerifyOutcome(VerifyResult.ALREADY_USED, 0)
    if (challenge.state is ChallengeState.EXHAUSTED
            or challenge.attempts >= challenge.max_attempts):
        return VerifyOutcome(VerifyResult.MAX_ATTEMPTS_REACHED, 0)
    return VerifyOutcome(VerifyResult.EXPIRED, challenge.max_attempts - challenge.attempts)


def audit_verify(tx: Transaction, now: datetime, who: AuditContext, challenge: Challenge,
                 result: VerifyResult, method: Method, session_id: str | None = None,
                 refused: Refusal | None = None) -> None:
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


async def again_if_guard_lost(run: Callable[[bool], Awaitable[T]], *,
                              optimistic: bool = False) -> T:
    """Run a verification (``run(optimistic)``); once more if a guarded write lost its
    race (store/unit.py).

    The per-user lock makes that impossible in normal operation; should anything write a
    factor without it, the loser's transaction rolled back whole (its attempt too) and
    the second run decides on the winner's state: a replayed TOTP step is then a wrong
    code, counted as one. A second loss is ABORTED (retryable).

    ``optimistic``: try without the lock first (service/optimism.py). That try loses
    when another call of the user's came between its read and its write, or stops when
    it needs the lock (NeedsLock); either way nothing of it was written, and the runs
    above follow, under the lock."""
    if optimistic:
        try:
            return await run(True)
        except GuardLost:
            pass
    try:
        return await run(False)
    except GuardLost:
        return await run(False)


# What follows a passed proof with a method: (tx, challenge, record, who, now, account_email).
FollowUp = Callable[[Transaction, Challenge, FactorRecord, AuditContext, datetime, str | None],
                    Awaitable[None]]


class Steps:
    def __init__(self, registry: FactorRegistry, rules: Rules, lockout: Lockout,
                 follow_ups: Mapping[Method, FollowUp]) -> None:
        self._registry = registry
        self._rules = rules
        self._lockout = lockout
        self._follow_ups = follow_ups

    @staticmethod
    async def load(tx: Transaction, challenge_id: str, *,
                   expect_user: str | None) -> Loaded:
        """The per-user lock before anything else (one order everywhere: no deadlock
        with Challenge), then the challenge and its factor. ``expect_user``: another
        user's challenge is "not found", never a hint."""
        found = await tx.challenges.locked_with_factor(challenge_id)
        if found is None or (expect_user is not None and found[0].user_id != expect_user):
            raise ChallengeNotFound()
        return Loaded(*found)

    def ready(self, loaded: Loaded, proof: Proof, who: AuditContext,
              now: datetime) -> Ready | Closed:
        """Whether ``loaded`` takes this attempt (no I/O): raises for the caller's rights,
        a malformed proof, a factor status the purpose forbids and the lockout."""
        challenge, record = loaded.challenge, loaded.record
        who.authorize(challenge.application)
        method = self._registry.get(record.factor.method)
        code = method.parse_code(proof_for(method, proof))  # malformed: not a guess
        # A PENDING factor past MFA_PENDING_TTL is gone: its challenge is expired.
        usable = (challenge.state is ChallengeState.OPEN and challenge.expires_at > now
                  and challenge.attempts < challenge.max_attempts
                  and not self._rules.gone(record.factor, now))
        if usable:
            require_status(record.factor, challenge.purpose)
        self._lockout.refuse_if_locked(loaded.lockout, now,
                                       passes_hard_limit=method.passes_hard_lockout)
        if not usable:
            return Closed(closed_outcome(challenge))
        return Ready(challenge, record, loaded.lockout, method, code)

    async def attempt(self, tx: Transaction, ready: Ready, who: AuditContext, now: datetime,
                      account_email: str | None) -> Passed | Failed:
        """Check the proof and count the attempt. The user's lock makes the read current,
        so the method's check (and its atomic step) and the attempt cannot interleave
        with another verification of this user."""
        challenge, record = ready.challenge, ready.record
        verdict = await ready.method.check(tx, record, challenge, ready.code, now)
        if verdict.alarm is not None:
            audit.record(tx, now, audit.Event.ALARM, audit.Outcome.FAILED, who,
                         user_id=challenge.user_id, factor_id=challenge.factor_id,
                         challenge_id=challenge.challenge_id,
                         application=challenge.application,
                         detail={"alarm": verdict.alarm.value, **verdict.detail})
        if verdict.display_name is not None:
            record = replace(record, factor=replace(
                record.factor, masked_destination=verdict.display_name))
        # Deferred and guarded (store/unit.py): ``ready`` checked the challenge takes this
        # attempt on a read made under the user's lock; the guard holds the database to
        # it, one round trip fewer than counting it at once.
        settled = tx.later.challenges.settle_attempt(challenge, verdict.ok, now)
        remaining = settled.max_attempts - settled.attempts
        if not verdict.ok:
            result = (VerifyResult.MAX_ATTEMPTS_REACHED if remaining == 0
                      else VerifyResult.INVALID_CODE)
            audit_verify(tx, now, who, settled, result, record.factor.method,
                         refused=verdict.reason)
            await self._lockout.count_failure(
                tx, ready.lockout, user_id=settled.user_id, application=settled.application,
                factor_id=settled.factor_id, who=who, now=now, account_email=account_email)
            return Failed(VerifyOutcome(result, remaining))
        self._lockout.clear(tx, settled.user_id, ready.lockout)
        follow_up = self._follow_ups.get(record.factor.method)
        if follow_up is not None:
            await follow_up(tx, settled, record, who, now, account_email)
        return Passed(settled, record, remaining)
