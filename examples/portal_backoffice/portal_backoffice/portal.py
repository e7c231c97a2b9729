"""The portal: central login (password, then the 2FA step), the profile page where users
turn factors on and off, and the demo inbox page.

Every mfa-service call goes through the generated stub (``mfa.v1``); the multi-step flows
(a challenge waiting for its code) are kept server-side in ``FlowStore`` under an opaque id
in a cookie, bound to the logged-in user.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import grpc
from mfa.v1 import two_factor_service_pb2 as pb
from mfa_client import ErrorReason
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from portal_backoffice.config import Config
from portal_backoffice.csrf import CsrfProtection
from portal_backoffice.devices import DeviceCookies
from portal_backoffice.inbox import Inbox
from portal_backoffice.login import FIRST_FACTOR_GRACE, Login, Sessions, new_sessions
from portal_backoffice.mfa import (
    CHANNELS,
    METHOD_NAMES,
    METHOD_SLUGS,
    READ_TIMEOUT,
    STATUS_NAMES,
    WRITE_TIMEOUT,
    MfaError,
    browser_name,
    describe_event,
    fmt_epoch,
    fmt_moment,
    fmt_time,
    to_error,
    verify_message,
    when,
)
from portal_backoffice.names import FactorNames, clean_name
from portal_backoffice.users import (
    DEMO_PASSWORD,
    DEMO_USERS,
    UserExists,
    Users,
    account_email,
    check_new_account,
)
from portal_backoffice.web import (
    EXCEPTION_HANDLERS,
    client_ip,
    log,
    redirect,
    render,
    user_agent,
)

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub

FLOW_COOKIE = "demo_flow"
FLOW_TTL = 10 * 60
INBOX_SHOWN = 30  # newest messages on the Inbox page


@dataclass
class Flow:
    """One multi-step action waiting for the user: a challenge and what to do with it."""

    id: str
    user: str
    # "login", "enroll", "disable", "change_old" (proof), "change_new", "regenerate"
    kind: str
    challenge_id: str
    factor_id: str  # the factor challenged (a recovery code's, to disable a lost factor)
    method: pb.Method.ValueType
    channel: pb.Channel.ValueType = pb.CHANNEL_UNSPECIFIED
    masked: str = ""
    code_length: int = 6
    next: str = "/profile"
    webauthn_options: str = ""  # request options (login, disable) or creation options
    totp_secret: str = ""
    qr_data_uri: str = ""
    proof: str = ""  # change_new: the approved PURPOSE_CHANGE_PHONE challenge
    target: str = ""  # disable: the factor to turn off (factor_id may be the recovery codes')
    subject: str = ""  # the method acted on, in words ("Email", "Passkey “Work laptop”")
    label: str = ""  # enroll, passkey: the name the user typed
    recovery_ok: bool = False  # disable: the user may use a recovery code instead
    expires_at: float = 0.0  # the challenge's end (time.time()); 0: unknown
    dead: bool = False  # its challenge takes no more codes: never reuse it
    created: float = field(default_factory=time.monotonic)

    def reusable(self, kind: str, factor_id: str, channel: pb.Channel.ValueType,
                 target: str = "") -> bool:
        """Whether pressing the same button again can go back to this step instead of
        sending another code (the one sent moments ago still works)."""
        return (self.kind == kind and self.factor_id == factor_id and self.target == target
                and not self.dead and self.expires_at - time.time() > 30
                and (channel == pb.CHANNEL_UNSPECIFIED or channel == self.channel))


class FlowStore:
    """Flows in memory, for FLOW_TTL. A real portal keeps them in its session store."""

    def __init__(self) -> None:
        self._flows: dict[str, Flow] = {}

    def put(self, flow: Flow) -> None:
        self._purge()
        self._flows[flow.id] = flow

    def get(self, flow_id: str, user: str) -> Flow | None:
        self._purge()
        flow = self._flows.get(flow_id)
        return flow if flow is not None and flow.user == user else None

    def drop(self, flow_id: str) -> None:
        self._flows.pop(flow_id, None)

    def _purge(self) -> None:
        now = time.monotonic()
        for key in [k for k, f in self._flows.items() if now - f.created > FLOW_TTL]:
            del self._flows[key]


@dataclass(frozen=True)
class Seen:
    """What the portal knows about the browser on this request."""

    login: Login
    session: pb.CheckSessionResponse | None  # the valid 2FA session of login.user, if any
    factors: list[pb.Factor]
    codes_left: int

    @property
    def second_factors(self) -> list[pb.Factor]:
        return [f for f in self.factors if f.status == pb.FACTOR_STATUS_ACTIVE
                and f.method != pb.METHOD_RECOVERY_CODE]

    @property
    def recovery_factor(self) -> pb.Factor | None:
        return next((f for f in self.factors if f.status == pb.FACTOR_STATUS_ACTIVE
                     and f.method == pb.METHOD_RECOVERY_CODE), None)

    @property
    def first_factor(self) -> bool:
        """This login confirmed the user's first factor moments ago (see login.Login)."""
        return (self.login.first_factor_at > 0
                and time.time() - self.login.first_factor_at < FIRST_FACTOR_GRACE)

    @property
    def recovery_from(self) -> datetime | None:
        """When the current recovery codes may turn off a factor (None: no codes)."""
        f = self.recovery_factor
        return when(f.established_at) if f is not None and self.codes_left > 0 else None

    @property
    def recovery_ready(self) -> bool:
        since = self.recovery_from
        return since is not None and since <= datetime.now(UTC)

    def factor(self, factor_id: str) -> pb.Factor | None:
        return next((f for f in self.factors if f.factor_id == factor_id), None)

    @property
    def session_age(self) -> float:
        # A remembered browser's session is never fresh (mfa-service's rule): adding a
        # factor asks for a code at once rather than after a refused attempt.
        if self.session is None or self.session.trusted_device:
            return float("inf")
        passed = when(self.session.authenticated_at)
        return (datetime.now(UTC) - passed).total_seconds() if passed else float("inf")


class Portal:
    def __init__(self, config: Config, stub: TwoFactorServiceAsyncStub, users: Users,
                 inbox: Inbox | None = None, sessions: Sessions | None = None,
                 names: FactorNames | None = None) -> None:
        self.config = config
        self.stub = stub
        self.users = users
        self.inbox = inbox
        self.sessions = sessions or new_sessions(config)
        self.names = names or FactorNames()
        self.flows = FlowStore()
        self.devices = DeviceCookies(secure=self.sessions.secure)

    # -- what the browser is ---------------------------------------------------------------
    async def _session(self, login: Login) -> pb.CheckSessionResponse | None:
        if not login.token:
            return None
        try:
            check = await self.stub.CheckSession(pb.CheckSessionRequest(
                session_token=login.token, application=pb.APPLICATION_PORTAL),
                timeout=READ_TIMEOUT)
        except grpc.RpcError as err:
            raise to_error(err) from None
        # A session of another user (a stale cookie after switching users) counts for nothing.
        return check if check.valid and check.user_id == login.user else None

    async def _factors(self, user: str) -> tuple[list[pb.Factor], int]:
        try:
            resp = await self.stub.ListFactors(pb.ListFactorsRequest(user_id=user),
                                               timeout=READ_TIMEOUT)
        except grpc.RpcError as err:
            raise to_error(err) from None
        return list(resp.factors), resp.recovery_codes_remaining

    async def _seen(self, request: Request) -> Seen | None:
        login = self.sessions.read(request)
        if login is None:
            return None
        (factors, codes_left), session = await asyncio.gather(self._factors(login.user),
                                                             self._session(login))
        return Seen(login, session, factors, codes_left)

    async def _full_login(self, request: Request) -> Seen | Response:
        """The user passed the password and, if they have a second factor, 2FA."""
        here = request.url.path
        seen = await self._seen(request)
        if seen is None:
            return redirect("/login", next=here)
        # A login that confirmed its first factor moments ago has proved it (no second
        # prompt at once); mfa-service gave it no session, so what mfa-service guards
        # (adding a factor, the backoffice) still asks.
        if seen.second_factors and seen.session is None and not seen.first_factor:
            return redirect("/2fa", next=here)
        return seen

    def safe_next(self, target: str | None, default: str = "/profile") -> str:
        """Only our own pages and the backoffice: no open redirect through ?next=."""
        if not target:
            return default
        if target.startswith("/") and not target.startswith("//") and "\\" not in target:
            return target
        parts = urlsplit(target)
        for base in (self.config.portal_url, self.config.backoffice_url):
            allowed = urlsplit(base)
            if (parts.scheme, parts.netloc) == (allowed.scheme, allowed.netloc):
                return target
        return default

    def _flow(self, request: Request, login: Login) -> Flow | None:
        flow_id = request.cookies.get(FLOW_COOKIE, "")
        return self.flows.get(flow_id, login.user) if flow_id else None

    def _start_flow(self, response: Response, flow: Flow) -> Response:
        self.flows.put(flow)
        response.set_cookie(FLOW_COOKIE, flow.id, max_age=FLOW_TTL, path="/", httponly=True,
                            samesite="lax", secure=self.sessions.secure)
        return response

    def _end_flow(self, request: Request, response: Response) -> None:
        self.flows.drop(request.cookies.get(FLOW_COOKIE, ""))
        response.delete_cookie(FLOW_COOKIE, path="/", httponly=True, samesite="lax",
                               secure=self.sessions.secure)

    # -- pages -----------------------------------------------------------------------------
    async def home(self, request: Request) -> Response:
        return redirect("/profile")

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def login_page(self, request: Request) -> Response:
        next_url = self.safe_next(request.query_params.get("next"))
        if request.method == "GET":
            return render(request, "login.html", next=next_url, users=self._demo_users())
        form = await request.form()
        username = str(form.get("username", "")).strip().lower()
        password = str(form.get("password", ""))
        next_url = self.safe_next(str(form.get("next", "")))
        # scrypt takes ~50 ms of CPU on purpose: off the event loop.
        if not await asyncio.to_thread(self.users.authenticate, username, password):
            return render(request, "login.html", status_code=401, next=next_url,
                          users=self._demo_users(), username=username,
                          error="Wrong username or password.")
        old = self.sessions.read(request)
        if old is not None and old.token:
            await self._revoke(old.token)  # a new login ends the previous 2FA session
        response = redirect("/2fa", next=next_url)
        # A new session id (and CSRF token): the id the browser had before is worthless.
        self.sessions.log_in(request, response, username)
        self._end_flow(request, response)
        return response

    def _demo_users(self) -> list[str]:
        return [f"{name} / {DEMO_PASSWORD}" for name in DEMO_USERS]

    async def signup(self, request: Request) -> Response:
        if request.method == "GET":
            return render(request, "signup.html")
        form = await request.form()
        username = str(form.get("username", "")).strip().lower()
        password = str(form.get("password", ""))
        problem = check_new_account(username, password)
        if problem is None:
            try:
                await asyncio.to_thread(self.users.create, username, password)
            except UserExists:
                problem = "That username is taken. Choose another one."
        if problem is not None:
            return render(request, "signup.html", status_code=400, error=problem,
                          username=username)
        return redirect("/login", n="signed-up")

    async def logout(self, request: Request) -> Response:
        login = self.sessions.read(request)
        if login is not None and login.token:
            await self._revoke(login.token)
        response = redirect("/login", n="logged-out")
        self.sessions.log_out(request, response)
        self._end_flow(request, response)
        return response

    async def _revoke(self, token: str) -> None:
        """End a 2FA session. Best effort: a logout must clear the cookie even while
        mfa-service is unreachable (the session then ends by its own timeouts)."""
        try:
            await self.stub.RevokeSession(pb.RevokeSessionRequest(session_token=token),
                                          timeout=WRITE_TIMEOUT)
        except grpc.RpcError as err:
            log.warning("could not revoke a 2FA session: %s",
                        to_error(err).details.reason_name or "no answer")

    # -- how factors are shown ---------------------------------------------------------------
    def _views(self, user: str, factors: list[pb.Factor]) -> list[dict[str, object]]:
        """Factors as the pages show them: a name people recognise and the dates. A
        passkey is called by the name the user gave it, else its authenticator's model
        (mfa-service's masked_destination), else "Passkey"; two with the same name are
        numbered, so no two rows read alike."""
        names = self.names.of_user(user)
        views = [self._factor_view(f, names.get(f.factor_id, "")) for f in factors]
        seen: dict[str, int] = {}
        for view in views:
            if view["slug"] == "passkey":
                seen[str(view["name"])] = seen.get(str(view["name"]), 0) + 1
        counters: dict[str, int] = {}
        for view in views:
            name = str(view["name"])
            if view["slug"] == "passkey" and seen.get(name, 0) > 1:
                counters[name] = counters.get(name, 0) + 1
                view["name"] = f"{name} {counters[name]}"
                view["subject"] = f"Passkey “{view['name']}”"
        return views

    @staticmethod
    def _factor_view(f: pb.Factor, label: str = "") -> dict[str, object]:
        method = METHOD_NAMES.get(f.method, "?")
        name, detail, subject = method, f.masked_destination, method
        if f.method == pb.METHOD_PASSKEY:
            model = f.masked_destination if f.masked_destination != "Passkey" else ""
            name = label or model or "Passkey"
            detail = "passkey" + (f" · {model}" if label and model else "")
            if name == "Passkey":
                detail = ""
            subject = "Passkey" if name == "Passkey" else f"Passkey “{name}”"
        return {"id": f.factor_id, "method": method, "name": name, "detail": detail,
                "subject": subject, "subject_lower": subject[0].lower() + subject[1:],
                "model": f.masked_destination if f.method == pb.METHOD_PASSKEY else "",
                "slug": next((s for s, m in METHOD_SLUGS.items() if m == f.method), ""),
                "status": STATUS_NAMES.get(f.status, "?"),
                "active": f.status == pb.FACTOR_STATUS_ACTIVE,
                "is_phone": f.method == pb.METHOD_PHONE,
                "created": fmt_time(f.created_at),
                "last_used": fmt_time(f.last_used_at) if f.last_used_at.seconds else "never"}

    def _subject(self, request: Request, seen: Seen) -> str:
        """The method a notice is about (``?f=<factor id>``, one of the user's own)."""
        factor = seen.factor(request.query_params.get("f", ""))
        if factor is None:
            return ""
        return str(self._views(seen.login.user, [factor])[0]["subject"])

    # -- the 2FA step ----------------------------------------------------------------------
    def _choose_page(self, request: Request, seen: Seen, next_url: str,
                     status_code: int = 200, error: str = "") -> Response:
        return render(request, "choose.html", status_code=status_code, seen=seen,
                      next=next_url, factors=self._views(seen.login.user, seen.second_factors),
                      recovery=seen.recovery_factor, codes_left=seen.codes_left, error=error,
                      can_cancel=seen.session is not None or seen.first_factor,
                      subject=self._subject(request, seen))

    async def choose(self, request: Request) -> Response:
        next_url = self.safe_next(request.query_params.get("next"))
        seen = await self._seen(request)
        if seen is None:
            return redirect("/login", next=next_url)
        step_up = request.query_params.get("n") == "step-up"
        if seen.session is not None and not step_up:
            return redirect(next_url)
        if not seen.second_factors:
            if next_url.startswith("/"):
                return redirect(next_url)
            return render(request, "message.html", title="Two-factor authentication needed",
                          message="The backoffice needs two-factor authentication. Turn it "
                                  "on in your profile first.", link=("/profile", "Profile"))
        stale = False
        if seen.session is None and not step_up:  # a step-up always asks for a code
            token, stale = await self._recognize(request, seen.login)
            if token:  # a browser the user asked to remember: no code
                done = redirect(next_url)
                self.sessions.passed_2fa(done, seen.login, token)
                return done
        page = self._choose_page(request, seen, next_url)
        if stale:
            self.devices.drop(page, seen.login.user)
        return page

    async def _recognize(self, request: Request, login: Login) -> tuple[str, bool]:
        """A 2FA session for this browser if the user asked to remember it, without a
        code; and whether its cookie is stale (forgotten or expired: it goes)."""
        remembered = self.devices.read(request, login.user)
        if remembered is None:
            return "", False
        try:
            resp = await self.stub.RecognizeDevice(pb.RecognizeDeviceRequest(
                user_id=login.user, device_token=remembered.token,
                application=pb.APPLICATION_PORTAL, client_ip=client_ip(request),
                user_agent=user_agent(request)), timeout=WRITE_TIMEOUT)
        except grpc.RpcError as err:
            # A limit reached, or mfa-service away: ask for a code as usual.
            log.warning("could not recognise a remembered browser: %s",
                        to_error(err).details.reason_name or "no answer")
            return "", False
        if not resp.recognized:
            return "", True
        return resp.session.session_token, False

    async def start_login(self, request: Request) -> Response:
        seen = await self._seen(request)
        form = await request.form()
        next_url = self.safe_next(str(form.get("next", "")))
        if seen is None:
            return redirect("/login", next=next_url)
        factor_id = str(form.get("factor_id", ""))
        allowed = {f.factor_id for f in seen.second_factors}
        if seen.recovery_factor is not None:
            allowed.add(seen.recovery_factor.factor_id)
        if factor_id not in allowed:
            return redirect("/2fa", next=next_url)
        channel = CHANNELS.get(str(form.get("channel", "")), pb.CHANNEL_UNSPECIFIED)
        current = self._flow(request, seen.login)
        if current is not None and current.reusable("login", factor_id, channel):
            # The code sent moments ago still works: no second code (and no cooldown).
            current.next = next_url
            return redirect("/verify", n="still-valid")
        try:
            flow = await self._challenge(seen.login.user, factor_id, pb.PURPOSE_LOGIN,
                                         channel, kind="login", next_url=next_url)
        except MfaError as err:
            # The choice page again, with every other method: a way on.
            return self._choose_page(request, seen, next_url, 400, err.user_message)
        return self._start_flow(redirect("/verify"), flow)

    async def _challenge(self, user: str, factor_id: str, purpose: pb.Purpose.ValueType,
                         channel: pb.Channel.ValueType, *, kind: str,
                         next_url: str = "/profile", session_token: str = "") -> Flow:
        try:
            resp = await self.stub.Challenge(pb.ChallengeRequest(
                user_id=user, factor_id=factor_id, purpose=purpose, channel=channel,
                application=pb.APPLICATION_PORTAL, request_id=uuid.uuid4().hex,
                # A new confirmation code (or passkey options) for a factor being added is
                # a step of adding it: mfa-service wants the user's fresh 2FA session.
                session_token=session_token), timeout=WRITE_TIMEOUT)
        except grpc.RpcError as err:
            raise to_error(err) from None
        ends = when(resp.expires_at)
        return Flow(id=secrets.token_urlsafe(32), user=user, kind=kind,
                    challenge_id=resp.challenge_id, factor_id=factor_id, method=resp.method,
                    channel=resp.channel, masked=resp.masked_destination,
                    code_length=resp.code_length, next=next_url,
                    webauthn_options=(resp.webauthn_creation_options
                                      or resp.webauthn_request_options),
                    expires_at=ends.timestamp() if ends else 0.0)

    # -- one page for every code (or passkey) the user proves -----------------------------
    async def verify_page(self, request: Request) -> Response:
        login = self.sessions.read(request)
        if login is None:
            return redirect("/login")
        flow = self._flow(request, login)
        if flow is None:
            return render(request, "message.html", title="Nothing to confirm",
                          message="This step has ended or expired. Start again.",
                          link=("/profile", "Back to your profile"))
        if request.method == "GET":
            return self._render_verify(request, flow)
        form = await request.form()
        code = str(form.get("code", "")).strip()
        webauthn = str(form.get("webauthn_response", ""))
        if not code and not webauthn:
            return self._render_verify(request, flow, error="Enter the code.")
        if flow.kind == "disable":
            return await self._finish_disable(request, login, flow, code, webauthn)
        remember = self._can_remember(flow) and form.get("remember") == "on"
        try:
            result = await self.stub.Verify(pb.VerifyRequest(
                challenge_id=flow.challenge_id, code=code, webauthn_response=webauthn,
                user_id=login.user, client_ip=client_ip(request),
                user_agent=user_agent(request), account_email=account_email(login.user),
                # Confirming the user's first factor logs them in too (the code just
                # proved it): no second prompt at once. Later factors: ignored.
                open_session=flow.kind != "login",
                # "Remember this browser": named as the user will see it in the list.
                remember_device=remember,
                device_label=browser_name(user_agent(request))[:64] if remember else ""),
                timeout=WRITE_TIMEOUT)
        except grpc.RpcError as err:
            return self._render_verify(request, flow, error=to_error(err).user_message)
        if result.result != pb.VERIFY_RESULT_APPROVED:
            return self._refused(request, flow, result.result, result.attempts_remaining)
        if flow.kind == "login":
            if login.token:
                await self._revoke(login.token)
            done = redirect(flow.next)
            # The token stays here, on the server; the browser gets a new opaque id.
            self.sessions.passed_2fa(done, login, result.session.session_token)
            if result.device_token:  # the browser's own credential: a cookie (devices.py)
                self.devices.keep(done, login.user, result.device.device_id,
                                  result.device_token, when(result.device.expires_at))
            self._end_flow(request, done)
            return done
        if flow.kind == "change_old":
            change = replace(flow, id=secrets.token_urlsafe(32), kind="change_new",
                             proof=flow.challenge_id, created=time.monotonic())
            self.flows.drop(flow.id)
            return self._start_flow(redirect("/profile/phone/new"), change)
        if flow.kind == "regenerate":
            return await self._finish_regenerate(request, login, flow)
        # enroll: the factor is ACTIVE (a phone change swapped the numbers)
        factor_id = result.factor.factor_id or flow.factor_id
        if flow.label:
            self.names.set(login.user, factor_id, flow.label)
        response: Response
        if result.recovery_codes:
            response = render(request, "recovery_codes.html", codes=list(result.recovery_codes),
                              title=f"{flow.subject or 'Two-factor authentication'} is "
                                    "turned on",
                              method=METHOD_NAMES.get(flow.method, ""),
                              next=f"/profile?n=enabled&f={factor_id}")
            if result.session.session_token:
                # The user's first factor, and mfa-service opened the session with it
                # (open_session): a real 2FA session, honoured by the backoffice too, so
                # "I saved them: continue" does not ask for 2FA again at once.
                self.sessions.passed_2fa(response, login, result.session.session_token)
            else:  # a server without open_session: the portal's own, narrower grace
                self.sessions.update(replace(login, first_factor_at=time.time()))
        else:
            response = redirect("/profile", n="phone-changed" if flow.proof else "enabled",
                                f=factor_id)
        self._end_flow(request, response)
        return response

    @staticmethod
    def _can_remember(flow: Flow) -> bool:
        """A login with a real factor (mfa-service never remembers a browser for a
        recovery code: that is for getting in when a factor is lost)."""
        return flow.kind == "login" and flow.method != pb.METHOD_RECOVERY_CODE

    def _refused(self, request: Request, flow: Flow, result: pb.VerifyResult.ValueType,
                 attempts_remaining: int) -> Response:
        if result != pb.VERIFY_RESULT_INVALID_CODE or attempts_remaining <= 0:
            flow.dead = True  # pressing the button again must open a new challenge
        return self._render_verify(request, flow, error=verify_message(
            result, attempts_remaining, flow.method))

    async def _finish_regenerate(self, request: Request, login: Login, flow: Flow) -> Response:
        """The proof is APPROVED: replace the recovery codes with it (consumed once)."""
        try:
            resp = await self.stub.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(
                user_id=login.user, proof_challenge_id=flow.challenge_id,
                application=pb.APPLICATION_PORTAL, client_ip=client_ip(request),
                user_agent=user_agent(request), account_email=account_email(login.user)),
                timeout=WRITE_TIMEOUT)
        except grpc.RpcError as err:
            page = render(request, "message.html", status_code=400,
                          title="No new recovery codes", message=to_error(err).user_message,
                          link=("/profile", "Back to your profile"))
            self._end_flow(request, page)
            return page
        page = render(request, "recovery_codes.html", title="Your new recovery codes",
                      codes=list(resp.recovery_codes), regenerated=True,
                      next="/profile?n=codes-new")
        self._end_flow(request, page)
        return page

    async def _finish_disable(self, request: Request, login: Login, flow: Flow, code: str,
                              webauthn: str) -> Response:
        target = flow.target or flow.factor_id
        try:
            result = await self.stub.Disable(pb.DisableRequest(
                user_id=flow.user, factor_id=target, challenge_id=flow.challenge_id,
                code=code, webauthn_response=webauthn, client_ip=client_ip(request),
                user_agent=user_agent(request), account_email=account_email(flow.user)),
                timeout=WRITE_TIMEOUT)
        except grpc.RpcError as err:
            return self._render_verify(request, flow, error=to_error(err).user_message)
        if result.result != pb.VERIFY_RESULT_APPROVED:
            return self._refused(request, flow, result.result, result.attempts_remaining)
        response: Response = redirect("/profile", n="disabled", f=target)
        # mfa-service ends the sessions that were opened with a factor it turns off. If
        # that was this browser's, say so, and ask for another method (not a bare prompt).
        if login.token and await self._session(login) is None:
            factors, _ = await self._factors(login.user)
            if any(f.status == pb.FACTOR_STATUS_ACTIVE and f.method != pb.METHOD_RECOVERY_CODE
                   for f in factors):
                response = redirect("/2fa", next="/profile", n="disabled-relogin", f=target)
        self._end_flow(request, response)
        return response

    def _render_verify(self, request: Request, flow: Flow, error: str = "") -> Response:
        subject = flow.subject or METHOD_NAMES.get(flow.method, "")
        lower = subject[:1].lower() + subject[1:]
        titles = {"login": "Two-factor authentication", "enroll": "Turn on " + lower,
                  "disable": "Turn off " + lower,
                  "change_old": "Change phone number: confirm your current number",
                  "regenerate": "Make new recovery codes: confirm it's you"}
        if flow.kind == "enroll" and flow.proof:
            titles["enroll"] = "Change phone number: confirm the new number"
        lost = ""
        if flow.kind == "disable" and flow.method != pb.METHOD_RECOVERY_CODE and flow.recovery_ok:
            lost = ("Lost it, or no code arrives?" if flow.method != pb.METHOD_PASSKEY
                    else "Lost this passkey?")
        return render(request, "verify.html", status_code=400 if error else 200, flow=flow,
                      title=titles.get(flow.kind, ""), error=error, lost_link=lost,
                      method=METHOD_NAMES.get(flow.method, ""),
                      is_passkey=flow.method == pb.METHOD_PASSKEY,
                      is_app=flow.method == pb.METHOD_AUTHENTICATOR_APP,
                      is_recovery=flow.method == pb.METHOD_RECOVERY_CODE,
                      is_phone=flow.method == pb.METHOD_PHONE,
                      sent=flow.method in (pb.METHOD_EMAIL, pb.METHOD_PHONE),
                      channel={pb.CHANNEL_SMS: "text message", pb.CHANNEL_VOICE: "voice call",
                               pb.CHANNEL_EMAIL: "email"}.get(flow.channel, ""),
                      webauthn_mode="create" if flow.kind == "enroll" else "get",
                      can_remember=self._can_remember(flow),
                      remember_days=self.config.remember_days,
                      # Inside <script>: a "<" in the JSON must not close the element.
                      webauthn_json=(flow.webauthn_options or "{}").replace("<", "\\u003c"))

    async def resend(self, request: Request) -> Response:
        login = self.sessions.read(request)
        if login is None:
            return redirect("/login")
        flow = self._flow(request, login)
        if flow is None:
            return redirect("/profile")
        form = await request.form()
        channel = CHANNELS.get(str(form.get("channel", "")), flow.channel
                               if flow.method == pb.METHOD_PHONE else pb.CHANNEL_UNSPECIFIED)
        purpose = {"login": pb.PURPOSE_LOGIN, "enroll": pb.PURPOSE_CONFIRM_ENROLLMENT,
                   "disable": pb.PURPOSE_DISABLE, "change_old": pb.PURPOSE_CHANGE_PHONE,
                   "regenerate": pb.PURPOSE_REGENERATE_RECOVERY_CODES}
        if flow.kind not in purpose:
            return redirect("/verify")
        try:
            fresh = await self._challenge(login.user, flow.factor_id, purpose[flow.kind],
                                          channel, kind=flow.kind, next_url=flow.next,
                                          session_token=login.token
                                          if flow.kind == "enroll" else "")
        except MfaError as err:
            return self._render_verify(request, flow, error=err.user_message)
        updated = replace(flow, challenge_id=fresh.challenge_id, channel=fresh.channel,
                          masked=fresh.masked or flow.masked, dead=False,
                          expires_at=fresh.expires_at,
                          webauthn_options=fresh.webauthn_options or flow.webauthn_options)
        self.flows.put(updated)
        return redirect("/verify", n="resent")

    # -- the profile -----------------------------------------------------------------------
    async def profile(self, request: Request) -> Response:
        seen = await self._full_login(request)
        if isinstance(seen, Response):
            return seen
        shown = [f for f in seen.factors if f.method != pb.METHOD_RECOVERY_CODE
                 and f.status != pb.FACTOR_STATUS_DISABLED]
        active_methods = {f.method for f in seen.second_factors}
        # One email, phone and app each; passkeys, one per device, as many as the user has.
        can_add = [(slug, "Another passkey" if m == pb.METHOD_PASSKEY and m in active_methods
                    else METHOD_NAMES[m]) for slug, m in METHOD_SLUGS.items()
                   if m not in active_methods or m == pb.METHOD_PASSKEY]
        session = None
        if seen.session is not None:
            session = {"method": METHOD_NAMES.get(seen.session.method, "?"),
                       "at": fmt_time(seen.session.authenticated_at),
                       "app": "the portal" if seen.session.application == pb.APPLICATION_PORTAL
                       else "the backoffice", "remembered": seen.session.trusted_device}
        response = render(request, "profile.html", user=seen.login.user,
                          devices=await self._device_rows(request, seen.login.user),
                          remember_days=self.config.remember_days,
                          factors=self._views(seen.login.user, shown), can_add=can_add,
                          codes_left=seen.codes_left, session=session,
                          first_factor=seen.first_factor,
                          has_factor=bool(seen.second_factors),
                          backoffice=self.config.backoffice_url,
                          subject=self._subject(request, seen))
        # Never resume adding a factor: a user who left the confirmation page starts again
        # (its PENDING factor stays "Not finished", without a button, and mfa-service
        # deletes it after 15 minutes).
        self._end_enrolment(request, seen.login, response)
        return response

    async def _device_rows(self, request: Request, user: str) -> list[dict[str, object]]:
        """The user's remembered browsers, as the profile lists them."""
        try:
            resp = await self.stub.ListDevices(pb.ListDevicesRequest(user_id=user),
                                               timeout=READ_TIMEOUT)
        except grpc.RpcError as err:
            raise to_error(err) from None
        here = self.devices.read(request, user)
        return [{"id": d.device_id, "label": d.label, "at": fmt_time(d.created_at),
                 "used": fmt_time(d.last_used_at), "until": fmt_time(d.expires_at),
                 "current": here is not None and here.device_id == d.device_id}
                for d in resp.devices]

    async def forget_device(self, request: Request) -> Response:
        seen = await self._full_login(request)
        if isinstance(seen, Response):
            return seen
        form = await request.form()
        device_id = str(form.get("device_id", ""))
        user = seen.login.user
        ended = 0
        try:
            done = await self.stub.ForgetDevice(pb.ForgetDeviceRequest(
                user_id=user, device_id=device_id, client_ip=client_ip(request),
                user_agent=user_agent(request)), timeout=WRITE_TIMEOUT)
            ended = done.sessions_ended
        except grpc.RpcError as err:
            error = to_error(err)
            if error.reason != ErrorReason.ERROR_REASON_DEVICE_NOT_FOUND:
                raise error from None
            # Forgotten already (another tab, or it expired): what the user wanted.
        here = self.devices.read(request, user)
        this_browser = here is not None and here.device_id == device_id
        response = redirect("/profile", n="device-forgotten")
        if this_browser and ended and await self._session(seen.login) is None:
            # This browser was logged in by being remembered: that ended with it.
            response = redirect("/2fa", next="/profile", n="this-device-forgotten")
        if this_browser:
            self.devices.drop(response, user)
        return response

    def _end_enrolment(self, request: Request, login: Login, response: Response) -> None:
        flow = self._flow(request, login)
        if flow is not None and flow.kind in ("enroll", "change_new"):
            self._end_flow(request, response)

    async def add(self, request: Request) -> Response:
        slug = request.path_params["method"]
        if slug not in METHOD_SLUGS:
            return redirect("/profile")
        seen = await self._full_login(request)
        if isinstance(seen, Response):
            return seen
        here = f"/profile/add/{slug}"
        # Adding a factor once one is ACTIVE needs a recent 2FA session (mfa-service
        # refuses otherwise): ask for it before the user fills in the form.
        if seen.second_factors and seen.session_age > self.config.step_up_max_age:
            return redirect("/2fa", next=here, n="step-up")
        if request.method == "GET":
            page = render(request, "add.html", slug=slug, method=METHOD_NAMES[METHOD_SLUGS[slug]])
            self._end_enrolment(request, seen.login, page)
            return page
        form = await request.form()
        email = str(form.get("email", "")).strip()
        phone = str(form.get("phone_number", "")).replace(" ", "")
        label = clean_name(str(form.get("label", "")))
        channel = CHANNELS.get(str(form.get("channel", "")), pb.CHANNEL_UNSPECIFIED)
        req = pb.EnrollRequest(
            user_id=seen.login.user, method=METHOD_SLUGS[slug], application=pb.APPLICATION_PORTAL,
            account_name=seen.login.user, session_token=seen.login.token)
        if slug == "email":
            req.email = email
        elif slug == "phone":
            req.phone_number, req.channel = phone, channel
        try:
            resp = await self.stub.Enroll(req, timeout=WRITE_TIMEOUT)
        except grpc.RpcError as err:
            error = to_error(err)
            if error.reason == ErrorReason.ERROR_REASON_RECENT_SESSION_REQUIRED:
                return redirect("/2fa", next=here, n="step-up")
            return render(request, "add.html", status_code=400, slug=slug,
                          method=METHOD_NAMES[METHOD_SLUGS[slug]], error=error.user_message,
                          email=email, phone_number=phone, label=label)
        flow = self._enrolment(seen.login.user, resp)
        if slug == "passkey":
            flow.label = label
            flow.subject = f"Passkey “{label}”" if label else "Passkey"
        return self._start_flow(redirect("/verify"), flow)

    def _enrolment(self, user: str, resp: pb.EnrollResponse, proof: str = "") -> Flow:
        qr = ""
        if resp.qr_svg:
            qr = "data:image/svg+xml;base64," + base64.b64encode(resp.qr_svg.encode()).decode()
        elif resp.qr_png:
            qr = "data:image/png;base64," + base64.b64encode(resp.qr_png).decode()
        channel = {pb.METHOD_EMAIL: pb.CHANNEL_EMAIL}.get(resp.factor.method, pb.CHANNEL_SMS)
        return Flow(id=secrets.token_urlsafe(32), user=user, kind="enroll",
                    challenge_id=resp.challenge_id, factor_id=resp.factor.factor_id,
                    method=resp.factor.method, channel=channel,
                    masked=resp.factor.masked_destination, code_length=resp.code_length,
                    webauthn_options=resp.webauthn_creation_options,
                    totp_secret=resp.totp_secret, qr_data_uri=qr, proof=proof,
                    subject=METHOD_NAMES.get(resp.factor.method, ""))

    # -- turning a factor off (with it, or with a recovery code when it is lost) -----------
    def _turn_off_page(self, request: Request, seen: Seen, factor: pb.Factor,
                       status_code: int = 200, error: str = "") -> Response:
        view = self._views(seen.login.user, [factor])[0]
        since = seen.recovery_from
        return render(request, "turn_off.html", status_code=status_code, f=view,
                      title=f"Turn off {view['subject_lower']}", error=error,
                      recovery_ready=seen.recovery_ready,
                      recovery_from=fmt_moment(since) if since else "")

    async def turn_off(self, request: Request) -> Response:
        seen = await self._full_login(request)
        if isinstance(seen, Response):
            return seen
        factor = next((f for f in seen.second_factors
                       if f.factor_id == request.path_params["factor_id"]), None)
        if factor is None:
            return redirect("/profile")
        return self._turn_off_page(request, seen, factor)

    async def disable(self, request: Request) -> Response:
        seen = await self._full_login(request)
        if isinstance(seen, Response):
            return seen
        form = await request.form()
        factor_id = str(form.get("factor_id", ""))
        factor = next((f for f in seen.second_factors if f.factor_id == factor_id), None)
        if factor is None:
            return redirect("/profile")
        channel = CHANNELS.get(str(form.get("channel", "")), pb.CHANNEL_UNSPECIFIED)
        with_recovery = str(form.get("proof", "")) == "recovery"
        recovery = seen.recovery_factor
        if with_recovery and (recovery is None or not seen.recovery_ready):
            return self._turn_off_page(request, seen, factor)
        # With a recovery code: the challenge is on the recovery codes, the target stays.
        challenged = recovery.factor_id if with_recovery and recovery else factor_id
        current = self._flow(request, seen.login)
        if current is not None and current.reusable("disable", challenged, channel, factor_id):
            return redirect("/verify", n="still-valid")  # the code sent still works
        try:
            flow = await self._challenge(seen.login.user, challenged, pb.PURPOSE_DISABLE,
                                         channel, kind="disable")
        except MfaError as err:
            # Back on the turn-off page, which also offers the recovery code.
            return self._turn_off_page(request, seen, factor, 400, err.user_message)
        flow.target = factor_id
        flow.subject = str(self._views(seen.login.user, [factor])[0]["subject"])
        flow.recovery_ok = seen.recovery_ready
        return self._start_flow(redirect("/verify"), flow)

    # -- changing the phone number --------------------------------------------------------
    async def change_phone(self, request: Request) -> Response:
        seen = await self._full_login(request)
        if isinstance(seen, Response):
            return seen
        if seen.session_age > self.config.step_up_max_age:
            return redirect("/2fa", next="/profile/phone/change", n="step-up")
        phone = next((f for f in seen.second_factors if f.method == pb.METHOD_PHONE), None)
        if phone is None:
            return redirect("/profile")
        view = self._views(seen.login.user, [phone])[0]
        if request.method == "GET":
            return render(request, "phone_change.html", f=view)
        form = await request.form()
        channel = CHANNELS.get(str(form.get("channel", "")), pb.CHANNEL_UNSPECIFIED)
        current = self._flow(request, seen.login)
        if current is not None and current.reusable("change_old", phone.factor_id, channel):
            return redirect("/verify", n="still-valid")
        try:
            flow = await self._challenge(seen.login.user, phone.factor_id,
                                         pb.PURPOSE_CHANGE_PHONE, channel, kind="change_old")
        except MfaError as err:
            return render(request, "phone_change.html", status_code=400, f=view,
                          error=err.user_message)
        return self._start_flow(redirect("/verify"), flow)

    async def new_phone(self, request: Request) -> Response:
        seen = await self._full_login(request)
        if isinstance(seen, Response):
            return seen
        flow = self._flow(request, seen.login)
        if flow is None or flow.kind != "change_new":
            return redirect("/profile")
        if request.method == "GET":
            return render(request, "phone_new.html", old=flow.masked)
        form = await request.form()
        phone = str(form.get("phone_number", "")).replace(" ", "")
        channel = CHANNELS.get(str(form.get("channel", "")), pb.CHANNEL_SMS)
        try:
            resp = await self.stub.Enroll(pb.EnrollRequest(
                user_id=seen.login.user, method=pb.METHOD_PHONE, phone_number=phone,
                channel=channel, application=pb.APPLICATION_PORTAL,
                change_proof_challenge_id=flow.proof, session_token=seen.login.token),
                timeout=WRITE_TIMEOUT)
        except grpc.RpcError as err:
            return render(request, "phone_new.html", status_code=400, old=flow.masked,
                          error=to_error(err).user_message, phone_number=phone)
        self.flows.drop(flow.id)
        return self._start_flow(redirect("/verify"),
                                self._enrolment(seen.login.user, resp, proof=flow.proof))

    # -- new recovery codes -----------------------------------------------------------------
    def _regenerate_page(self, request: Request, seen: Seen, status_code: int = 200,
                         error: str = "") -> Response:
        """Only established factors can prove it (mfa-service's rule): list those, and
        say from when the others can."""
        now = datetime.now(UTC)
        ready = [f for f in seen.second_factors
                 if (since := when(f.established_at)) is not None and since <= now]
        later = [f for f in seen.second_factors if f not in ready]
        starts = [since for f in later if (since := when(f.established_at)) is not None]
        return render(request, "regenerate.html", status_code=status_code, error=error,
                      factors=self._views(seen.login.user, ready),
                      waiting=[str(v["name"]) for v in self._views(seen.login.user, later)],
                      from_when=fmt_moment(min(starts)) if starts else "")

    async def regenerate(self, request: Request) -> Response:
        seen = await self._full_login(request)
        if isinstance(seen, Response):
            return seen
        if not seen.second_factors:
            return redirect("/profile")
        if request.method == "GET":
            return self._regenerate_page(request, seen)
        form = await request.form()
        factor_id = str(form.get("factor_id", ""))
        factor = next((f for f in seen.second_factors if f.factor_id == factor_id), None)
        if factor is None:
            return self._regenerate_page(request, seen)
        channel = CHANNELS.get(str(form.get("channel", "")), pb.CHANNEL_UNSPECIFIED)
        current = self._flow(request, seen.login)
        if current is not None and current.reusable("regenerate", factor_id, channel):
            return redirect("/verify", n="still-valid")
        try:
            flow = await self._challenge(seen.login.user, factor_id,
                                         pb.PURPOSE_REGENERATE_RECOVERY_CODES, channel,
                                         kind="regenerate")
        except MfaError as err:
            return self._regenerate_page(request, seen, 400, err.user_message)
        flow.subject = str(self._views(seen.login.user, [factor])[0]["subject"])
        return self._start_flow(redirect("/verify"), flow)

    # -- passkey names ----------------------------------------------------------------------
    async def rename(self, request: Request) -> Response:
        seen = await self._full_login(request)
        if isinstance(seen, Response):
            return seen
        factor = next((f for f in seen.second_factors if f.method == pb.METHOD_PASSKEY
                       and f.factor_id == request.path_params["factor_id"]), None)
        if factor is None:
            return redirect("/profile")
        view = self._views(seen.login.user, [factor])[0]
        if request.method == "GET":
            label = self.names.of_user(seen.login.user).get(factor.factor_id, "")
            return render(request, "rename.html", f=view, label=label or view["name"])
        form = await request.form()
        self.names.set(seen.login.user, factor.factor_id, str(form.get("label", "")))
        return redirect("/profile", n="renamed")

    # -- your sessions and security activity -------------------------------------------
    async def sessions_page(self, request: Request) -> Response:
        seen = await self._full_login(request)
        if isinstance(seen, Response):
            return seen
        logins = self.sessions.of_user(seen.login.user)
        checks = await asyncio.gather(*(self._session(r) for r in logins),
                                      return_exceptions=True)
        rows = []
        for record, check in zip(logins, checks, strict=True):
            second = ""
            if isinstance(check, pb.CheckSessionResponse) and check.trusted_device:
                second = "remembered browser, no code asked"
            elif isinstance(check, pb.CheckSessionResponse):
                second = f"passed with {METHOD_NAMES.get(check.method, '?').lower()}"
            elif record.first_factor_at:
                second = "turned on in this session"
            elif not isinstance(check, BaseException):
                second = "not passed"
            rows.append({"handle": record.handle, "current": record.id == seen.login.id,
                         "browser": browser_name(record.agent), "ip": record.ip,
                         "at": fmt_epoch(record.password_at), "seen": fmt_epoch(record.seen_at),
                         "second": second})
        return render(request, "sessions.html", rows=rows)

    async def end_session(self, request: Request) -> Response:
        seen = await self._full_login(request)
        if isinstance(seen, Response):
            return seen
        form = await request.form()
        handle = str(form.get("handle", ""))
        for record in self.sessions.of_user(seen.login.user):
            if record.handle == handle and record.id != seen.login.id:
                self.sessions.drop(record.id)  # that browser's cookie now opens nothing
                if record.token:
                    await self._revoke(record.token)
        return redirect("/profile/sessions", n="session-ended")

    async def end_all_sessions(self, request: Request) -> Response:
        seen = await self._full_login(request)
        if isinstance(seen, Response):
            return seen
        # mfa-service's central "log out everywhere": every 2FA session of the user, in
        # both applications (and any other that shares the login), not only those listed.
        try:
            await self.stub.RevokeSession(pb.RevokeSessionRequest(user_id=seen.login.user),
                                          timeout=WRITE_TIMEOUT)
        except grpc.RpcError as err:
            raise to_error(err) from None
        self.sessions.drop_user(seen.login.user)
        response = redirect("/login", n="everywhere")
        self.sessions.log_out(request, response)
        self.devices.drop(response, seen.login.user)  # mfa-service forgot them all
        self._end_flow(request, response)
        return response

    async def activity(self, request: Request) -> Response:
        seen = await self._full_login(request)
        if isinstance(seen, Response):
            return seen
        try:
            resp = await self.stub.ListAuditEvents(pb.ListAuditEventsRequest(
                user_id=seen.login.user, page_size=100), timeout=READ_TIMEOUT)
        except grpc.RpcError as err:
            # A portal whose caller may not read the audit trail (PERMISSION_DENIED).
            log.warning("no security activity: %s", to_error(err).details.reason_name
                        or to_error(err).details.code.name)
            return render(request, "activity.html", available=False, events=[])
        methods = {f.factor_id: METHOD_NAMES.get(f.method, "").lower() for f in seen.factors}
        events: list[dict[str, str]] = []
        for event in resp.events:
            what = describe_event(event, methods)
            if what is None:
                continue
            row = {"at": fmt_time(event.occurred_at), "what": what,
                   "where": ", ".join(filter(None, [
                       browser_name(event.user_agent) if event.user_agent else "",
                       event.client_ip]))}
            if events and events[-1] == row:  # "log out everywhere": one line, not one per session
                continue
            events.append(row)
        return render(request, "activity.html", available=True, events=events[:40])

    async def inbox_page(self, request: Request) -> Response:
        messages = list(reversed(self.inbox.messages()))[:INBOX_SHOWN] if self.inbox else []
        return render(request, "inbox.html", messages=messages, running=self.inbox is not None)


def create_portal(config: Config, stub: TwoFactorServiceAsyncStub, users: Users,
                  inbox: Inbox | None = None, sessions: Sessions | None = None,
                  names: FactorNames | None = None) -> Starlette:
    """The portal app. ``sessions``: the store shared with the backoffice (a new one when
    not given); ``names``: the passkey names users typed (in memory when not given)."""
    portal = Portal(config, stub, users, inbox, sessions, names)
    routes = [
        Route("/", portal.home),
        Route("/healthz", portal.healthz),
        Route("/login", portal.login_page, methods=["GET", "POST"]),
        Route("/signup", portal.signup, methods=["GET", "POST"]),
        Route("/logout", portal.logout, methods=["POST"]),
        Route("/2fa", portal.choose),
        Route("/2fa/start", portal.start_login, methods=["POST"]),
        Route("/verify", portal.verify_page, methods=["GET", "POST"]),
        Route("/verify/resend", portal.resend, methods=["POST"]),
        Route("/profile", portal.profile),
        Route("/profile/add/{method}", portal.add, methods=["GET", "POST"]),
        Route("/profile/turn-off/{factor_id}", portal.turn_off),
        Route("/profile/disable", portal.disable, methods=["POST"]),
        Route("/profile/phone/change", portal.change_phone, methods=["GET", "POST"]),
        Route("/profile/phone/new", portal.new_phone, methods=["GET", "POST"]),
        Route("/profile/recovery-codes", portal.regenerate, methods=["GET", "POST"]),
        Route("/profile/rename/{factor_id}", portal.rename, methods=["GET", "POST"]),
        Route("/profile/sessions", portal.sessions_page),
        Route("/profile/sessions/end", portal.end_session, methods=["POST"]),
        Route("/profile/sessions/end-all", portal.end_all_sessions, methods=["POST"]),
        Route("/profile/devices/forget", portal.forget_device, methods=["POST"]),
        Route("/profile/activity", portal.activity),
        Route("/inbox", portal.inbox_page),
    ]
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS, middleware=[
        Middleware(CsrfProtection, origin=config.portal_url, sessions=portal.sessions)])
    app.state.portal = portal
    app.state.sessions = portal.sessions
    app.state.product_name = config.product_name
    return app
