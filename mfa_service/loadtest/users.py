"""Load users: who they are, when each may be used again, and the users file.

The users file (written by ``loadtest seed``, read with ``--users-file``) has one JSON
object per line::

    {"user_id": "...", "factor_id": "...", "totp_secret": "BASE32",
     "session_token": "..." | null, "last_totp_step": 59123456}

``last_totp_step`` is the newest TOTP step the server accepted for the factor, as far as
this client knows: RFC 6238 section 5.2 makes the server refuse that step and older ones,
so a login must use a newer step. A login run writes the steps it used back, so the next
run does not replay them.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyotp

from mfa_service.factors.totp import PERIOD_SECONDS
from mfa_service.loadtest.config import LoadTestError


@dataclass(eq=False, slots=True)
class User:
    """A user with a confirmed authenticator app."""

    user_id: str
    factor_id: str
    secret: str  # base32, as the authenticator app holds it
    last_step: int  # the newest TOTP step the server accepted for this factor
    token: str = ""  # a live session token, when there is one

    def code(self, step: int) -> str:
        """The app's code for a time step."""
        return pyotp.TOTP(self.secret).generate_otp(step)


def time_step(at: datetime) -> int:
    """RFC 6238 T for ``at`` (30 s steps, T0 = 0), as the service computes it."""
    return int(at.timestamp()) // PERIOD_SECONDS


class LeasePool:
    """Users handed out one at a time, each ready from a key (a time or a TOTP step).

    One operation per user at a time: a second Challenge on the same factor would
    supersede the first one's open challenge, and two logins would race for one step.
    """

    def __init__(self, users: Sequence[User], key: Callable[[User], float]) -> None:
        self._order = itertools.count()
        self._heap = [(key(u), next(self._order), u) for u in users]
        heapq.heapify(self._heap)

    def lease(self, now_key: float, *, or_earliest: bool = False) -> User | None:
        """A user ready at ``now_key``; with ``or_earliest``, else the soonest-ready one."""
        if not self._heap or (self._heap[0][0] > now_key and not or_earliest):
            return None
        return heapq.heappop(self._heap)[2]

    def release(self, user: User, ready_at: float) -> None:
        heapq.heappush(self._heap, (ready_at, next(self._order), user))


# -- the users file -------------------------------------------------------------------------
def user_line(user_id: str, factor_id: str, secret: str, token: str | None,
              last_step: int) -> str:
    """One line of the users file (with its newline)."""
    return json.dumps({"user_id": user_id, "factor_id": factor_id, "totp_secret": secret,
                       "session_token": token, "last_totp_step": last_step},
                      separators=(",", ":")) + "\n"


def _parse(line: str, where: str) -> User:
    try:
        data = json.loads(line)
        return User(user_id=str(data["user_id"]), factor_id=str(data["factor_id"]),
                    secret=str(data["totp_secret"]), last_step=int(data["last_totp_step"]),
                    token=str(data.get("session_token") or ""))
    except (ValueError, KeyError, TypeError) as exc:
        raise LoadTestError(f"{where}: not a users-file line ({exc})") from None


def read_users_file(path: Path, limit: int | None = None) -> list[User]:
    """The first ``limit`` users of the file (all when None)."""
    users: list[User] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if limit is not None and len(users) >= limit:
                    break
                if line.strip():
                    users.append(_parse(line, f"{path}:{number}"))
    except OSError as exc:
        raise LoadTestError(f"cannot read {path}: {exc}") from None
    if not users:
        raise LoadTestError(f"{path} holds no users")
    if limit is not None and len(users) < limit:
        raise LoadTestError(f"{path} holds {len(users)} users, fewer than --users {limit}")
    return users


def write_back_steps(path: Path, users: Iterable[User]) -> int:
    """Rewrite the file with the newer TOTP steps of ``users``; returns lines changed.

    Written to a temporary file beside it and renamed over it, so a crash leaves either
    the old file or the new one.
    """
    newer = {u.user_id: u for u in users}
    changed = 0
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with path.open(encoding="utf-8") as src, tmp.open("w", encoding="utf-8") as dst:
            for number, line in enumerate(src, 1):
                if line.strip():
                    known = _parse(line, f"{path}:{number}")
                    user = newer.get(known.user_id)
                    if user is not None and user.last_step > known.last_step:
                        line = user_line(known.user_id, known.factor_id, known.secret,
                                         known.token or None, user.last_step)
                        changed += 1
                dst.write(line)
        if changed:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return changed
