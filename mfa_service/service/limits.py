"""Per-user lockout: pure rules over the counter the store keeps (and locks).

SPEC.md: after 5 consecutive failed verifications (all factors, all callers) the user
waits 1 minute, doubling with every further 5 failures up to 15 minutes; a success or
12 quiet hours reset the count; at 100 consecutive failures only an administrator can
unlock (NIST SP 800-63B 5.2.2: at most 100 consecutive failed attempts).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from mfa_service.store.security import LockoutState


@dataclass(frozen=True)
class LockoutPolicy:
    threshold: int = 5
    first_wait: timedelta = timedelta(minutes=1)
    max_wait: timedelta = timedelta(minutes=15)
    reset_after: timedelta = timedelta(hours=12)
    hard_limit: int = 100

    def refusal(self, state: LockoutState | None, now: datetime) -> float | None:
        """Seconds the user must still wait (0 when only an admin can help), or None."""
        if state is None:
            return None
        if state.admin_reset_required:
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
        if failures >= self.hard_limit:
            return LockoutState(failures, now, None, True), True
        locked_until = state.locked_until
        locked = failures % self.threshold == 0
        if locked:
            rounds = failures // self.threshold
            wait = min(self.first_wait * 2 ** (rounds - 1), self.max_wait)
            locked_until = now + wait
        return replace(state, consecutive_failures=failures, last_failure_at=now,
                       locked_until=locked_until), locked

    @staticmethod
    def after_success() -> LockoutState:
        return LockoutState(0, None, None, False)
