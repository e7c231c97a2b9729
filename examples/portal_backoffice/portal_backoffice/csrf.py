"""Cross-site request forgery (CSRF) protection for every POST, in both apps.

Two independent checks, both needed for a POST to reach a page (defence in depth):

1. **Where it comes from.** Browsers say which page sent a request: ``Sec-Fetch-Site``
   (``same-origin`` for our own pages) and ``Origin``. A POST with ``Sec-Fetch-Site`` other
   than ``same-origin`` or ``none`` (``cross-site``, and ``same-site``: the backoffice is
   not the portal), or an ``Origin`` that is not the app's own (``null`` included), is
   refused. A client that sends neither header (not a browser) is judged by check 2 alone.
2. **A synchronizer token.** Every form carries a hidden ``csrf_token``, a random value
   kept in the user's server-side session (``login.Sessions``); a POST whose token is
   missing or not the session's is refused. The comparison is constant-time
   (``hmac.compare_digest``). Another site can make a browser send a form, but it cannot
   read our pages, so it cannot know the token.

It is an ASGI middleware, so no route can forget it: the form body is read here (at most
``MAX_FORM_BYTES``), checked, and handed on unchanged. A refusal is a 403 page in plain
words with a link home. (starlette-csrf was not used: it checks a double-submit cookie
against a request *header*, which plain HTML forms cannot send without script.)
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from portal_backoffice.login import Sessions
from portal_backoffice.web import log, render

FIELD = "csrf_token"
# The largest form accepted (a passkey's response is a few KiB).
MAX_FORM_BYTES = 256 * 1024
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SAFE_FETCH_SITES = frozenset({"same-origin", "none"})
REFUSED = "This form expired or came from another site. Go back and try again."


class CsrfProtection:
    """Refuses a POST (any unsafe method) from another site or without the session's token.

    ``origin``: the app's own origin as the browser sees it (``Config.portal_url`` or
    ``Config.backoffice_url``), e.g. ``http://localhost:8080``.
    """

    def __init__(self, app: ASGIApp, *, origin: str, sessions: Sessions) -> None:
        self.app = app
        self.origin = origin.rstrip("/").lower()
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        problem = self._wrong_site(request)
        if problem:
            await self._refuse(request, problem, scope, receive, send)
            return
        body = await _read_body(receive, MAX_FORM_BYTES)
        if body is None:
            await PlainTextResponse("Request too large", status_code=413)(scope, receive, send)
            return
        replay = _replay(body, receive)
        problem = await self._wrong_token(Request(scope, _replay(body, receive)))
        if problem:
            await self._refuse(request, problem, scope, replay, send)
            return
        await self.app(scope, replay, send)

    def _wrong_site(self, request: Request) -> str:
        site = request.headers.get("sec-fetch-site")
        if site is not None and site.lower() not in SAFE_FETCH_SITES:
            return f"Sec-Fetch-Site: {site}"
        origin = request.headers.get("origin")
        if origin is not None and origin.rstrip("/").lower() != self.origin:
            return f"Origin: {origin}"
        return ""

    async def _wrong_token(self, request: Request) -> str:
        session = self.sessions.current(request)
        if session is None:
            return "no session"
        try:
            form: FormData = await request.form()
        except Exception:  # a malformed body: it carries no token we can read
            return "unreadable form"
        sent = form.get(FIELD)
        if not isinstance(sent, str) or not sent:
            return "no token"
        if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            return "wrong token"
        return ""

    async def _refuse(self, request: Request, problem: str, scope: Scope, receive: Receive,
                      send: Send) -> None:
        log.warning("refused a %s to %s: %s", request.method, request.url.path, problem)
        page = render(request, "message.html", status_code=403, new_session=False,
                      title="Request refused", message=REFUSED,
                      link=("/", "Go to the home page"))
        await page(scope, receive, send)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None when it is larger than ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect: nothing more will come
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Callable[[], Awaitable[Message]]:
    """A ``receive`` that gives the body read already, then waits on the real one."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
