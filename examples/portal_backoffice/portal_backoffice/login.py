"""The central login that the portal and the backoffice share: server-side sessions.

The browser's cookie holds **an opaque id only**: 256 random bits, signed with the secret
both apps know (itsdangerous, HMAC-SHA256), HttpOnly (scripts cannot read it), SameSite=Lax
(other sites cannot make the browser send it with a POST) and Secure when the apps are
served over https. Everything else stays on the server, in ``Sessions``, under that id: who
passed the password step and when, the form (CSRF) token, and the mfa-service 2FA session
token once 2FA is passed. A stolen cookie is therefore worth nothing against mfa-service
itself (``CheckSession`` on its value answers "not valid"), and a logout deletes the
record, so even a copy of the cookie stops working.

Cookies belong to a host, not to a port, so the cookie the portal sets on
``localhost:8080`` reaches the backoffice on ``localhost:8081`` too (in production both apps
would sit under one parent domain and set ``Domain=``); the launcher gives both apps the
same ``Sessions`` object.

``Sessions`` is an in-memory dict: right for this one-process demo (both apps run in one
event loop), lost at restart (everybody logs in again). A real portal with several
processes keeps the same records in its shared session store (Redis, its database), with
the same expiry. A browser gets a session (without a user) the first time a page with a
form is shown, so that the login and sign-up forms carry a CSRF token too; the id changes
at login and again when 2FA is passed (no session fixation), and the old record is deleted.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field, replace

from itsdangerous import BadSignature, URLSafeSerializer
from starlette.requests import Request
from starlette.responses import Response

from portal_backoffice.config import Config

COOKIE = "demo_login"
# The password step's lifetime; the 2FA session's own limits are mfa-service's (12 h / 30 min).
MAX_AGE = 12 * 3600
# A session without a user (a login or sign-up form shown, nothing more).
ANONYMOUS_MAX_AGE = 2 * 3600
# How long a login that has just confirmed its first factor counts as "2FA passed" for
# the portal's own pages (mfa-service's idle timeout for a session is the same 30 minutes).
FIRST_FACTOR_GRACE = 30 * 60
# The store never grows beyond this many records: the oldest go first.
MAX_SESSIONS = 100_000


def _new_id() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


@dataclass(frozen=True)
class Login:
    """One browser's session record, kept on the server under ``id``."""

    id: str = field(default_factory=_new_id)
    #: The form token (synchronizer token) every POST must carry.
    csrf: str = field(default_factory=_new_id)
    created: float = field(default_factory=time.time)
    user: str = ""  # "" until the password step is passed
    password_at: float = 0.0
    token: str = ""  # the 2FA session token (Session.session_token), once 2FA is passed
    #: A public name for this record on the "Your sessions" page (never the id: the id is
    #: what the cookie proves, so it is never put in a page).
    handle: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    #: Where and with what the password step was passed (shown on "Your sessions").
    ip: str = ""
    agent: str = ""
    seen_at: float = field(default_factory=time.time)
    #: When this browser proved a factor by confirming the user's *first* factor (the
    #: portal's own record: mfa-service opens no session on a confirmation). The portal
    #: lets such a login see its own pages for FIRST_FACTOR_GRACE without asking for 2FA
    #: again at once; anything mfa-service guards still asks (see portal.Portal.profile).
    first_factor_at: float = 0.0

    def expired(self, now: float) -> bool:
        if self.user:
            return now - self.password_at > MAX_AGE
        return now - self.created > ANONYMOUS_MAX_AGE


class Sessions:
    """Server-side sessions keyed by a random id; the cookie holds the signed id."""

    def __init__(self, secret: str, *, secure: bool = False) -> None:
        self._signer = URLSafeSerializer(secret, salt="portal-backoffice-session",
                                         signer_kwargs={"digest_method": hashlib.sha256})
        # Secure cookies are not sent over http://localhost by every browser: set from the
        # apps' URLs (https in production).
        self.secure = secure
        self._records: dict[str, Login] = {}

    # -- the store ---------------------------------------------------------------------
    def _get(self, session_id: str) -> Login | None:
        record = self._records.get(session_id)
        if record is not None and record.expired(time.time()):
            del self._records[session_id]
            return None
        return record

    def _put(self, record: Login) -> Login:
        now = time.time()
        if len(self._records) >= MAX_SESSIONS:
            for key in [k for k, r in self._records.items() if r.expired(now)]:
                del self._records[key]
            while len(self._records) >= MAX_SESSIONS:  # the oldest first (insertion order)
                del self._records[next(iter(self._records))]
        self._records[record.id] = record
        return record

    def drop(self, session_id: str) -> None:
        self._records.pop(session_id, None)

    def update(self, record: Login) -> Login:
        """Store a changed record under its (unchanged) id."""
        if record.id in self._records:
            self._records[record.id] = record
        return record

    def of_user(self, user: str) -> list[Login]:
        """The live logins of one user, oldest first ("Your sessions"). A scan: fine for
        the demo's dict; a real store keeps an index by user."""
        now = time.time()
        return sorted((r for r in self._records.values()
                       if r.user == user and not r.expired(now)), key=lambda r: r.password_at)

    def drop_user(self, user: str) -> list[Login]:
        """Delete every login of ``user`` (log out everywhere); returns them."""
        gone = [r for r in self._records.values() if r.user == user]
        for record in gone:
            del self._records[record.id]
        return gone

    # -- the browser's side ------------------------------------------------------------
    def current(self, request: Request) -> Login | None:
        """This browser's session, with or without a user (None: no valid cookie)."""
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            session_id = self._signer.loads(raw)
        except BadSignature:
            return None
        return self._get(session_id) if isinstance(session_id, str) else None

    def read(self, request: Request) -> Login | None:
        """The logged-in session (the password step passed), or None."""
        record = self.current(request)
        if record is None or not record.user:
            return None
        now = time.time()
        if now - record.seen_at > 60:  # "last active" on "Your sessions", to the minute
            record = self.update(replace(record, seen_at=now))
        return record

    def for_form(self, request: Request) -> tuple[Login, bool]:
        """The session whose CSRF token a form carries; a new one without a user when the
        browser has none (True: the response must set the cookie)."""
        record = self.current(request)
        if record is not None:
            return record, False
        return self._put(Login()), True

    def set_cookie(self, response: Response, record: Login) -> None:
        max_age = MAX_AGE if record.user else ANONYMOUS_MAX_AGE
        response.set_cookie(COOKIE, self._signer.dumps(record.id), max_age=max_age, path="/",
                            httponly=True, samesite="lax", secure=self.secure)

    def log_in(self, request: Request, response: Response, user: str) -> Login:
        """The password step passed: a new session (new id, new CSRF token) replaces
        whatever the browser had."""
        old = self.current(request)
        if old is not None:
            self.drop(old.id)
        client = request.scope.get("client")
        record = self._put(Login(user=user, password_at=time.time(),
                                 ip=client[0] if client else "",
                                 agent=request.headers.get("user-agent", "")[:256]))
        self.set_cookie(response, record)
        return record

    def passed_2fa(self, response: Response, login: Login, token: str) -> Login:
        """2FA passed: the token goes into the record, under a new id."""
        self.drop(login.id)
        record = self._put(replace(login, id=_new_id(), csrf=_new_id(), token=token))
        self.set_cookie(response, record)
        return record

    def log_out(self, request: Request, response: Response) -> None:
        old = self.current(request)
        if old is not None:
            self.drop(old.id)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="lax",
                               secure=self.secure)


def new_sessions(config: Config) -> Sessions:
    """A store for these apps: Secure cookies when they are served over https."""
    return Sessions(config.secret, secure=config.portal_url.startswith("https://"))
