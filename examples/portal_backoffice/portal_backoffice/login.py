"""The central login cookie that the portal and the backoffice share.

Cookies belong to a host, not to a port, so the cookie the portal sets on
``localhost:8080`` reaches the backoffice on ``localhost:8081`` too (in production both
apps would sit under one parent domain and set ``Domain=``). It is signed with a secret both
apps know (itsdangerous, HMAC-SHA256 over the payload plus a timestamp), HttpOnly (scripts
cannot read the 2FA session token) and SameSite=Lax (other sites cannot make the browser
send it with a POST).

It carries who passed the password step, when, and the mfa-service 2FA session token once
2FA is passed. The token alone proves nothing to either app: each request asks
mfa-service (CheckSession), so a logout on one app ends the session for both.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

COOKIE = "demo_login"
# The password step's lifetime; the 2FA session's own limits are mfa-service's (12 h / 30 min).
MAX_AGE = 12 * 3600


@dataclass(frozen=True)
class Login:
    user: str
    password_at: float
    token: str = ""  # the 2FA session token (Session.session_token), once 2FA is passed


class LoginCookie:
    def __init__(self, secret: str, *, secure: bool = False) -> None:
        self._serializer = URLSafeTimedSerializer(
            secret, salt="portal-backoffice-login",
            signer_kwargs={"digest_method": hashlib.sha256})
        # Secure cookies are not sent over http://localhost by every browser; production
        # (https) sets it.
        self._secure = secure

    def read(self, request: Request) -> Login | None:
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data: dict[str, Any] = self._serializer.loads(raw, max_age=MAX_AGE)
        except BadSignature:  # also SignatureExpired: treated as logged out
            return None
        try:
            return Login(str(data["u"]), float(data["p"]), str(data.get("t", "")))
        except (KeyError, TypeError, ValueError):
            return None

    def write(self, response: Response, login: Login) -> None:
        value = self._serializer.dumps({"u": login.user, "p": login.password_at,
                                        "t": login.token})
        response.set_cookie(COOKIE, value, max_age=MAX_AGE, path="/", httponly=True,
                            samesite="lax", secure=self._secure)

    def clear(self, response: Response) -> None:
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="lax",
                               secure=self._secure)


def new_login(user: str) -> Login:
    return Login(user=user, password_at=time.time())
