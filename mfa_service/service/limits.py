"""Per-user lockout: pure rules over the counter the store keeps (and locks).

SPEC.md: after 5 consecutive failed verifications (all factors, all callers) the user
waits 1 minute, doubling with every further 5 failures up to 15 minutes; a success or
12 quiet hours reset the count.

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

from dataclasses import dataclass
from datetime import datetime, timedelta

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
