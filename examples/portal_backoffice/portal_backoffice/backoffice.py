"""The backoffice: honours the 2FA session passed on the portal, asks for nothing itself
(except a code when the portal's session came from a remembered browser).

It reads the shared login session (the cookie's opaque id, looked up in the session store
both apps share) and asks mfa-service whether the 2FA session token kept there is still
valid (``CheckSession`` with ``APPLICATION_BACKOFFICE``). Valid: the page opens, saying
where and when 2FA was passed. Not valid (no login, logged out, expired): the browser goes
to the portal's central login with a return URL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from mfa.v1 import two_factor_service_pb2 as pb
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from portal_backoffice.config import Config
from portal_backoffice.csrf import CsrfProtection
from portal_backoffice.login import Sessions, new_sessions
from portal_backoffice.mfa import METHOD_NAMES, READ_TIMEOUT, WRITE_TIMEOUT, fmt_time, to_error
from portal_backoffice.web import EXCEPTION_HANDLERS, log, redirect, render

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub


class Backoffice:
    def __init__(self, config: Config, stub: TwoFactorServiceAsyncStub,
                 sessions: Sessions | None = None) -> None:
        self.config = config
        self.stub = stub
        self.sessions = sessions or new_sessions(config)

    async def home(self, request: Request) -> Response:
        login = self.sessions.read(request)
        here = self.config.backoffice_url + "/"
        if login is None:
            return redirect(self.config.portal_url + "/login", next=here)
        if not login.token:
            return redirect(self.config.portal_url + "/2fa", next=here)
        try:
            check = await self.stub.CheckSession(pb.CheckSessionRequest(
                session_token=login.token, application=pb.APPLICATION_BACKOFFICE),
                timeout=READ_TIMEOUT)
        except grpc.RpcError as err:
            raise to_error(err) from None
        if not check.valid or check.user_id != login.user:
            return redirect(self.config.portal_url + "/2fa", next=here)
        if check.trusted_device:
            # The backoffice's own policy (CheckSession says what a session is worth): a
            # browser remembered on the portal skipped the code; staff tools ask for one.
            return redirect(self.config.portal_url + "/2fa", next=here, n="step-up")
        where = {pb.APPLICATION_PORTAL: "the portal",
                 pb.APPLICATION_BACKOFFICE: "the backoffice"}.get(check.application, "?")
        return render(request, "backoffice.html", app_name="Backoffice", user=check.user_id,
                      where=where, at=fmt_time(check.authenticated_at),
                      method=METHOD_NAMES.get(check.method, "?"),
                      expires=fmt_time(check.expires_at), portal=self.config.portal_url)

    async def logout(self, request: Request) -> Response:
        login = self.sessions.read(request)
        if login is not None and login.token:
            try:
                await self.stub.RevokeSession(pb.RevokeSessionRequest(
                    session_token=login.token), timeout=WRITE_TIMEOUT)
            except grpc.RpcError as err:  # best effort: the cookie goes in any case
                log.warning("could not revoke a 2FA session: %s",
                            to_error(err).details.reason_name or "no answer")
        response = redirect(self.config.portal_url + "/login", n="logged-out",
                            next=self.config.backoffice_url + "/")
        self.sessions.log_out(request, response)
        return response

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok")


def create_backoffice(config: Config, stub: TwoFactorServiceAsyncStub,
                      sessions: Sessions | None = None) -> Starlette:
    """The backoffice app. ``sessions``: the store shared with the portal (the login is
    the portal's; a new, empty store when not given)."""
    backoffice = Backoffice(config, stub, sessions)
    app = Starlette(routes=[
        Route("/", backoffice.home),
        Route("/healthz", backoffice.healthz),
        Route("/logout", backoffice.logout, methods=["POST"]),
    ], exception_handlers=EXCEPTION_HANDLERS, middleware=[
        Middleware(CsrfProtection, origin=config.backoffice_url, sessions=backoffice.sessions)])
    app.state.sessions = backoffice.sessions
    app.state.product_name = config.product_name
    return app
