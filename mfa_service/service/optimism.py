"""Which calls try their transaction without the user's lock first.

A login's Challenge and Verify read and then write, and nothing else: on PostgreSQL they
can run as two statements in autocommit instead of four (BEGIN, the lock with the read,
the writes, COMMIT), the writes going only if the user's ``lock_version`` is still what
the read found (store/unit.py, "optimistic"). A call that turns out to need more (a
code to send, a recovery code to consume, a second read) stops before writing anything
(errors.NeedsLock) and runs again under the lock, having paid one read for nothing. So
the use cases try it only where it is likely to hold, on what this process saw when it
opened the challenge (``ChallengeOpener``):

- Verify of a LOGIN challenge on a method that consumes nothing at once (not recovery
  codes): the challenge's id was opened here;
- Challenge for LOGIN on a factor not known to send codes (an email or phone factor's
  challenge locks its destination and counts its sends).

What is kept here is a hint, never a rule: a wrong guess costs a read, not a right. Kept
per process, bounded (the oldest forgotten first); another worker, or a restart, starts
with none and takes the lock.
"""

from __future__ import annotations

# Enough for the challenges opened in a code's lifetime at thousands of logins a minute.
REMEMBERED = 65_536


class Hints:
    def __init__(self, size: int = REMEMBERED) -> None:
        self._size = size
        self._logins: dict[str, None] = {}
        self._senders: dict[str, None] = {}

    def opened(self, challenge_id: str, factor_id: str, *, login: bool, quiet: bool,
               sends_code: bool) -> None:
        """A challenge was opened: a LOGIN one (``login``) on a method whose check writes
        only what the login's one statement carries (``quiet``), on a factor that sends
        codes or not."""
        if login and quiet:
            self._remember(self._logins, challenge_id)
        if sends_code:
            self._remember(self._senders, factor_id)

    def needed_lock(self, factor_id: str) -> None:
        """A Challenge on this factor found it needed the lock (a send to count, a user
        with no lockout counter yet): its next ones take the lock at once."""
        self._remember(self._senders, factor_id)

    def verify_may_try(self, challenge_id: str) -> bool:
        return challenge_id in self._logins

    def challenge_may_try(self, factor_id: str) -> bool:
        return factor_id not in self._senders

    def _remember(self, kept: dict[str, None], key: str) -> None:
        kept.pop(key, None)
        kept[key] = None
        if len(kept) > self._size:
            del kept[next(iter(kept))]
