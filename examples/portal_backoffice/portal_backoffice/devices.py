"""Remembered browsers: where the portal keeps a browser's device token.

mfa-service returns the token once, when a login with "Remember this browser" ticked is
approved (``VerifyResponse.device_token``), and turns it into a 2FA session without a code
on a later login (``RecognizeDevice``). The portal keeps it in a cookie of its own, on the
browser itself, not in the server-side login record (login.py):

- it is a credential of the *browser*, not of a login: it must outlive logging out (the
  login record is deleted then) and the 12-hour login;
- kept on the server, it would still need a long-lived id in a cookie to find it again:
  a bearer value of exactly the same power, plus a store to keep for 30 days. Nothing
  would be gained;
- alone it is worth little: the portal presents it only after that user's password step,
  and mfa-service recognises it only for that user on the portal, while the user has
  changed no factor, for 30 days at most (14 without use), until the user forgets it.

So the cookie is HttpOnly (no script reads it: an injected script cannot carry it off),
SameSite=Lax (another site cannot make the browser send it with a POST), Secure when the
portal is served over https, and lives exactly as long as the device (its Max-Age is the
device's absolute end). It holds the device id (so the list can say "This browser") and
the token. Its name carries a hash of the username: two people sharing one browser each
present only their own token (another user's would count as a guess against them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import Response

PREFIX = "demo_device_"


def cookie_name(user: str) -> str:
    return PREFIX + hashlib.sha256(user.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Remembered:
    """What this browser holds for one user."""

    device_id: str
    token: str


class DeviceCookies:
    def __init__(self, *, secure: bool) -> None:
        self.secure = secure

    def read(self, request: Request, user: str) -> Remembered | None:
        raw = request.cookies.get(cookie_name(user), "")
        device_id, dot, token = raw.partition(".")
        # A UUID and a base64url token: anything else is not ours (never sent on).
        if not dot or len(device_id) != 36 or not 40 <= len(token) <= 256:
            return None
        return Remembered(device_id, token)

    def keep(self, response: Response, user: str, device_id: str, token: str,
             expires_at: datetime | None) -> None:
        """Remember this browser for ``user`` until the device's absolute end."""
        seconds = int((expires_at - datetime.now(UTC)).total_seconds()) if expires_at else 0
        if seconds <= 0:
            return
        response.set_cookie(cookie_name(user), f"{device_id}.{token}", max_age=seconds,
                            path="/", httponly=True, samesite="lax", secure=self.secure)

    def drop(self, response: Response, user: str) -> None:
        response.delete_cookie(cookie_name(user), path="/", httponly=True, samesite="lax",
                               secure=self.secure)
