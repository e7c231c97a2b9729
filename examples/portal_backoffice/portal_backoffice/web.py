"""What both apps share: templates, the error pages, small request helpers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from portal_backoffice.login import Sessions
from portal_backoffice.mfa import MfaError

log = logging.getLogger("portal_backoffice")
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))

# Notices shown after a redirect, chosen by key: the page never echoes text from the URL.
# "{name}" is the method the notice is about ("Email", "Passkey “Work laptop”"), looked up
# by the page from the user's own factors (``?f=<factor id>``), never taken from the URL.
NOTICES = {
    "logged-out": "You are logged out.",
    "signed-up": "Your demo account is ready. Log in with it.",
    "resent": "A new code is on its way.",
    "still-valid": "We sent you a code moments ago, and it still works: type it below.",
    "enabled": "{name} is turned on.",
    "disabled": "{name} is turned off.",
    "disabled-relogin": "{name} is turned off. You had logged in with it, so confirm it's "
                        "you with another method to go on.",
    "phone-changed": "Your phone number is changed.",
    "codes-new": "Your new recovery codes are ready. The old ones no longer work.",
    "renamed": "The new name is saved.",
    "session-ended": "That session is signed out.",
    "everywhere": "You are signed out everywhere: every browser, and the backoffice too.",
    "step-up": "For your security, confirm it's you with two-factor authentication first.",
    "device-forgotten": "That browser is forgotten: it will ask for a code next time.",
    "this-device-forgotten": "This browser is forgotten, so it asks for a code again.",
}


def sessions_of(request: Request) -> Sessions:
    """The server-side session store the app was created with (shared by both apps)."""
    sessions: Sessions = request.app.state.sessions
    return sessions


def render(request: Request, name: str, status_code: int = 200, *,
           new_session: bool = True, **context: Any) -> Response:
    """A page. Every form on it carries the session's CSRF token (``csrf_token``); a browser
    without a session gets one (without a user) and its cookie with this response, unless
    ``new_session`` is False (a refused cross-site POST arrives without the cookie: a new
    one would replace the user's login)."""
    sessions = sessions_of(request)
    session, fresh = (sessions.for_form(request) if new_session
                      else (sessions.current(request), False))
    subject = str(context.pop("subject", "") or "The method")
    context.setdefault("notice", NOTICES.get(request.query_params.get("n", ""), "")
                       .replace("{name}", subject))
    # Only decides which links the header offers; who is logged in is checked elsewhere.
    context.setdefault("logged_in", bool(session and session.user))
    context.setdefault("product_name", getattr(request.app.state, "product_name", "Portal"))
    # Every page has a way on: a message page without its own link gets one.
    if name == "message.html" and not context.get("link"):
        context["link"] = (("/profile", "Back to your profile") if context["logged_in"]
                           else ("/login", "Go to the login page"))
    context["csrf_token"] = session.csrf if session else ""
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    if fresh and session is not None:
        sessions.set_cookie(response, session)
    return response


def redirect(path: str, **params: str) -> RedirectResponse:
    query = urlencode({k: v for k, v in params.items() if v})
    return RedirectResponse(f"{path}?{query}" if query else path, status_code=303)


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


def user_agent(request: Request) -> str:
    return request.headers.get("user-agent", "")[:256]


async def mfa_error_page(request: Request, exc: Exception) -> Response:
    """An mfa-service error nobody handled closer: a clear message, never a stack trace."""
    assert isinstance(exc, MfaError)
    log.warning("mfa-service error on %s: %s", request.url.path, exc.details.reason_name
                or exc.details.code.name)
    return render(request, "message.html", status_code=503 if exc.details.code.name in (
        "UNAVAILABLE", "DEADLINE_EXCEEDED") else 400, title="That did not work",
        message=exc.user_message)


async def http_error_page(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return render(request, "message.html", status_code=exc.status_code,
                  title="Not found" if exc.status_code == 404 else "Request refused",
                  message=str(exc.detail))


async def server_error_page(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return render(request, "message.html", status_code=500, title="Something went wrong",
                  message="Something went wrong on our side. Try again.")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    MfaError: mfa_error_page, HTTPException: http_error_page, Exception: server_error_page,
}
