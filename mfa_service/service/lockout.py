"""The per-user lockout, in one place: the rules (LockoutPolicy: pure, over the counter the
store keeps and locks in store/security.py) and what a use case does with them (Lockout:
refuse a locked-out user, count a failure, clear the count after a success).

The lockout (docs/SECURITY.md, "Guessing"): after 5 consecutive failed verifications
(all factors, all callers) the user waits 1 minute, doubling with every further 5
failures up to 15 minutes; a success or 12 quiet hours reset the count.

At 100 consecutive failures (NIST SP 800-63B 5.2.2: at most 100 consecutive failed
attempts on one account) the user's codes, apps and passkeys are refused until the user
passes with a **recovery code** or an administrator resets them. Why not a permanent,
admin-only lock as before: anyone who can open challenges for a user (the portal right
after the password step) could reach it in about four hours of wrong codes and lock the
user out for good - lockout as a weapon. The trade-off against NIST: the limit of 100
holds for every factor whose codes are guessable (6-8 digits); past it only a recovery
code (a look-up secret of >= 50 bits, NIST 5.1.2) is still accepted, and its guesses stay
throttled by the 15-minute waits (about 20 an hour), so 2^50 codes are out of reach. The
temporary waits keep applying to everyone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from mfa.v1.error_reason_pb2 import ErrorReason

from mfa_service.domain import Application, AuditContext, NoticeKind
from mfa_service.errors import FailedPrecondition, ResourceExhausted
from mfa_service.service import audit
from mfa_service.service.notices import Notifier
from mfa_service.store.database import Transaction
from mfa_service.store.security import LockoutState


@dataclass(frozen=True)
class LockoutPolicy:
    threshold: int = 5
    first_wait: timedelta = timedelta(minutes=1)
    max_wait: timedelta = timedelta(minutes=15)
    reset_after: timedelta = timedelta(hours=12)
    hard_limit: int = 100

    def refusal(self, state: LockoutState | None, now: datetime, *,
                recovery: bool = False) -> float | None:
        """Seconds the user must still wait (0: only a recovery code or an administrator
        helps), or None. ``recovery``: the attempt uses a recovery code."""
        if state is None:
            return None
        if state.admin_reset_required and not recovery:
            return 0.0
        if state.locked_until is not None and state.locked_until > now:
            return (state.locked_until - now).total_seconds()
        return None

    def after_failure(self, state: LockoutState, now: datetime) -> tuple[LockoutState, bool]:
        """The counter after one more failure, and whether this failure locked the user."""
        failures = state.consecutive_failures
        if state.last_failure_at is not None and now - state.last_failure_at >= self.reset_after:
            failures = 0
        failures += 1
        hard = state.admin_reset_required or failures >= self.hard_limit
        locked_until = state.locked_until
        locked = failures % self.threshold == 0
        if locked:
            rounds = failures // self.threshold
            wait = min(self.first_wait * 2 ** (rounds - 1), self.max_wait)
            locked_until = now + wait
        return LockoutState(failures, now, locked_until, hard), locked or (
            hard and not state.admin_reset_required)

    @staticmethod
    def after_success() -> LockoutState:
        return LockoutState(0, None, None, False)


@dataclass(frozen=True)
class Lockout:
    """The lockout as the use cases apply it."""

    notifier: Notifier
    policy: LockoutPolicy = field(default_factory=LockoutPolicy)

    def refuse_if_locked(self, state: LockoutState | None, now: datetime, *,
                         passes_hard_limit: bool = False) -> None:
        """Refuse a locked-out user (``passes_hard_limit``: the attempt uses a method
        that still passes the hard limit, a recovery code)."""
        wait = self.policy.refusal(state, now, recovery=passes_hard_limit)
        if wait is None:
            return
        if wait == 0:
            raise FailedPrecondition(
                "too many failed verifications: pass with a recovery code, or an "
                "administrator must unlock this user",
                reason=ErrorReason.ERROR_REASON_ADMIN_RESET_REQUIRED)
        raise ResourceExhausted("too many failed verifications; wait before trying again",
                                retry_after_seconds=wait,
                                reason=ErrorReason.ERROR_REASON_USER_LOCKED_OUT)

    def clear(self, tx: Transaction, user_id: str, state: LockoutState) -> None:
        """A success resets the count (no write when it is already clear)."""
        if state != self.policy.after_success():
            tx.later.lockouts.save(user_id, self.policy.after_success())

    async def count_failure(self, tx: Transaction, state: LockoutState, *, user_id: str,
                            application: Application | None, factor_id: str | None,
                            who: AuditContext, now: datetime,
                            account_email: str | None = None) -> None:
        """Count a failure against the user (a wrong code, an unknown device token); at a
        lock, audit it and tell the user."""
        new_state, locked = self.policy.after_failure(state, now)
        tx.later.lockouts.save(user_id, new_state)
        if not locked:
            return
        detail: dict[str, str | int] = {"failures": new_state.consecutive_failures}
        if new_state.locked_until is not None:
            detail["locked_until"] = new_state.locked_until.isoformat()
        if new_state.admin_reset_required:
            detail["admin_reset_required"] = 1
        audit.record(tx, now, audit.Event.LOCKOUT, audit.Outcome.OK, who, user_id=user_id,
                     factor_id=factor_id, application=application, detail=detail)
        await self.notifier.notify(tx, now, user_id, NoticeKind.ACCOUNT_LOCKED, who=who,
                                   account_email=account_email)
