"""The reference portal is safe to copy: cross-site POSTs are refused (CSRF), the login
cookie is an opaque id (the 2FA session token stays on the server), and a factor whose
enrolment was left is never resumed.

The browser tests serve an attacker's page from another origin with a form that submits
itself to the portal while the user is logged in; the HTTP tests (httpx against the running
portal, with the browser's cookie) try a POST without the form token, with a wrong one and
from a foreign Origin. mfa-service is asked directly (ListFactors, CheckSession) whether
anything changed.
"""

from __future__ import annotations

import html
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import httpx
import pytest
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from playwright.sync_api import BrowserContext, Page, expect

from tests.system.browser.conftest import Shots
from tests.system.browser.flows import enrol_app, factor_row, user_with_email
from tests.system.browser.stack import Stack

REFUSED = "This form expired or came from another site. Go back and try again."
TOKEN_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


# -- helpers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mfa(stack: Stack) -> Iterator[pb_grpc.TwoFactorServiceStub]:
    channel = grpc.insecure_channel(stack.grpc)
    yield pb_grpc.TwoFactorServiceStub(channel)
    channel.close()


def factors(mfa: pb_grpc.TwoFactorServiceStub, user: str) -> list[tuple[str, int, int]]:
    resp = mfa.ListFactors(pb.ListFactorsRequest(user_id=user), timeout=5)
    return sorted((f.factor_id, f.method, f.status) for f in resp.factors)


def email_factor_id(mfa: pb_grpc.TwoFactorServiceStub, user: str) -> str:
    resp = mfa.ListFactors(pb.ListFactorsRequest(user_id=user), timeout=5)
    return next(f.factor_id for f in resp.factors if f.method == pb.METHOD_EMAIL
                and f.status == pb.FACTOR_STATUS_ACTIVE)


def login_cookie(context: BrowserContext) -> str:
    return next(c["value"] for c in context.cookies() if c["name"] == "demo_login")


def http_as(context: BrowserContext, base: str) -> httpx.Client:
    """An HTTP client with the browser's cookies (the same logged-in user)."""
    cookies = {c["name"]: c["value"] for c in context.cookies()}
    return httpx.Client(base_url=base, cookies=cookies, timeout=10, follow_redirects=False)


def form_token(client: httpx.Client, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    match = TOKEN_RE.search(page.text)
    assert match, f"no CSRF token in the forms of {path}"
    return html.unescape(match.group(1))


class Attacker:
    """Another site: one page whose form submits itself to ``action`` with ``fields``."""

    def __init__(self, host: str) -> None:
        self.page = b""
        attacker = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(attacker.page)))
                self.end_headers()
                self.wfile.write(attacker.page)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, origin_host: str, action: str, fields: dict[str, str]) -> str:
        inputs = "".join(f'<input type="hidden" name="{html.escape(k)}" '
                         f'value="{html.escape(v)}">' for k, v in fields.items())
        self.page = (f'<!doctype html><title>You won a prize</title>'
                     f'<form id="f" method="post" action="{html.escape(action)}">{inputs}'
                     f'</form><script>document.getElementById("f").submit()</script>').encode()
        return f"http://{origin_host}:{self.server.server_address[1]}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def attacker() -> Iterator[Attacker]:
    # Bound on all loopback addresses: reachable as 127.0.0.2 (another site) and as
    # localhost on another port (the same site, another origin).
    server = Attacker("127.0.0.1")
    yield server
    server.close()


def attack(page: Page, url: str, target: str) -> int:
    """Open the attacker's page; returns the status of the portal's answer to its form."""
    with page.expect_response(lambda r: r.url.startswith(target)
                              and r.request.method == "POST") as answer:
        page.goto(url)
    return answer.value.status


# -- cross-site forms in a real browser ------------------------------------------------
@pytest.mark.parametrize("site", ["localhost", "127.0.0.1"],
                         ids=["same-site-other-port", "cross-site"])
def test_a_form_on_another_site_cannot_turn_off_a_factor(
        page: Page, context: BrowserContext, stack: Stack, username: str, shot: Shots,
        attacker: Attacker, mfa: pb_grpc.TwoFactorServiceStub, site: str) -> None:
    user_with_email(page, stack, username)
    before, sent_before = factors(mfa, username), stack.last_id()
    # The attacker knows everything but the form token: even the factor's id.
    url = attacker.serve(site, f"{stack.portal}/profile/disable",
                         {"factor_id": email_factor_id(mfa, username), "csrf_token": "guess"})
    # localhost:<other port> is the same site, so SameSite=Lax lets the login cookie go
    # with the POST: only the portal's own checks (Origin, Sec-Fetch-Site, token) stop it.
    assert attack(page, url, f"{stack.portal}/profile/disable") == 403
    expect(page.locator("#message")).to_have_text(REFUSED)
    expect(page.get_by_role("link", name="Go to the home page")).to_be_visible()
    shot("refused")
    assert factors(mfa, username) == before
    assert stack.last_id() == sent_before  # no code went out for a turn-off
    # The user is still logged in, and the factor is still on.
    page.goto(f"{stack.portal}/profile")
    expect(factor_row(page, "email")).to_have_attribute("data-status", "On")


def test_a_form_on_another_site_cannot_add_a_factor(
        page: Page, stack: Stack, username: str, attacker: Attacker,
        mfa: pb_grpc.TwoFactorServiceStub) -> None:
    user_with_email(page, stack, username)
    before = factors(mfa, username)
    url = attacker.serve("localhost", f"{stack.portal}/profile/add/email",
                         {"email": f"thief-{username}@example.com"})
    assert attack(page, url, f"{stack.portal}/profile/add/email") == 403
    expect(page.locator("#message")).to_have_text(REFUSED)
    assert factors(mfa, username) == before


def test_a_form_on_another_site_cannot_log_the_user_out_of_the_backoffice(
        page: Page, stack: Stack, username: str, attacker: Attacker) -> None:
    user_with_email(page, stack, username)
    url = attacker.serve("localhost", f"{stack.backoffice}/logout", {})
    assert attack(page, url, f"{stack.backoffice}/logout") == 403
    page.goto(f"{stack.backoffice}/")
    expect(page.locator("#sso")).to_be_visible()


# -- the same, over plain HTTP ---------------------------------------------------------
def test_posts_without_the_right_token_or_from_another_origin_are_refused(
        page: Page, context: BrowserContext, stack: Stack, username: str,
        mfa: pb_grpc.TwoFactorServiceStub) -> None:
    user_with_email(page, stack, username)
    factor_id = email_factor_id(mfa, username)
    before, sent_before = factors(mfa, username), stack.last_id()
    with http_as(context, stack.portal) as client:
        token = form_token(client, "/profile")
        tries = {
            "no token": ({"factor_id": factor_id}, {}),
            "wrong token": ({"factor_id": factor_id, "csrf_token": token[:-2] + "xx"}, {}),
            "empty token": ({"factor_id": factor_id, "csrf_token": ""}, {}),
            "foreign Origin": ({"factor_id": factor_id, "csrf_token": token},
                               {"Origin": "http://127.0.0.2:9999"}),
            "Origin null": ({"factor_id": factor_id, "csrf_token": token}, {"Origin": "null"}),
            "the backoffice's Origin": ({"factor_id": factor_id, "csrf_token": token},
                                        {"Origin": stack.backoffice}),
            "cross-site fetch": ({"factor_id": factor_id, "csrf_token": token},
                                 {"Sec-Fetch-Site": "cross-site"}),
            "same-site fetch": ({"factor_id": factor_id, "csrf_token": token},
                                {"Sec-Fetch-Site": "same-site"}),
        }
        for name, (data, headers) in tries.items():
            answer = client.post("/profile/disable", data=data, headers=headers)
            assert answer.status_code == 403, name
            assert REFUSED in answer.text, name
            assert 'href="/"' in answer.text, name  # a way on, not a dead end
        assert factors(mfa, username) == before
        assert stack.last_id() == sent_before
        # The real form, from the portal's own page: it works.
        answer = client.post("/profile/disable", data={"factor_id": factor_id,
                                                       "csrf_token": token},
                             headers={"Origin": stack.portal, "Sec-Fetch-Site": "same-origin"})
        assert answer.status_code == 303
        assert answer.headers["location"] == "/verify"
        page_ = client.get("/verify")
        assert "Turn off email" in page_.text


def test_the_login_and_signup_forms_need_their_token_too(stack: Stack) -> None:
    with httpx.Client(base_url=stack.portal, timeout=10) as client:
        for path in ("/login", "/signup"):
            refused = client.post(path, data={"username": "alice",
                                              "password": "correct horse battery"})
            assert refused.status_code == 403, path
            assert REFUSED in refused.text
        token = form_token(client, "/login")  # and the session cookie that goes with it
        anonymous = client.cookies["demo_login"]
        ok = client.post("/login", data={"username": "alice", "csrf_token": token,
                                         "password": "correct horse battery"},
                         headers={"Origin": stack.portal})
        assert ok.status_code == 303
        # The login made a new session: the id the browser had before is worthless.
        assert client.cookies["demo_login"] != anonymous


def test_the_backoffice_logout_needs_its_token(page: Page, context: BrowserContext,
                                               stack: Stack, username: str) -> None:
    user_with_email(page, stack, username)
    with http_as(context, stack.backoffice) as client:
        assert client.post("/logout").status_code == 403
        assert client.get("/").status_code == 200  # still logged in
        token = form_token(client, "/")
        assert client.post("/logout", data={"csrf_token": token}).status_code == 303


# -- the cookie ------------------------------------------------------------------------
def test_the_login_cookie_is_an_opaque_id_not_the_2fa_session_token(
        page: Page, context: BrowserContext, stack: Stack, username: str,
        mfa: pb_grpc.TwoFactorServiceStub) -> None:
    user_with_email(page, stack, username)
    expect(page.locator("#session-info")).to_be_visible()  # 2FA passed: a valid session
    cookie = next(c for c in context.cookies() if c["name"] == "demo_login")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    value = cookie["value"]
    # Whatever a thief copies from the cookie, mfa-service does not take it as a session.
    for candidate in {value, *value.split("."), *value.split(".")[0].split("-")}:
        if not candidate:
            continue
        check = mfa.CheckSession(pb.CheckSessionRequest(
            session_token=candidate, application=pb.APPLICATION_PORTAL), timeout=5)
        assert not check.valid, candidate
    assert len(value) < 200  # an id and its signature, no payload


# -- no resume of an enrolment that was left --------------------------------------------
def test_a_factor_whose_enrolment_was_left_is_not_resumed(
        page: Page, stack: Stack, username: str, shot: Shots,
        mfa: pb_grpc.TwoFactorServiceStub) -> None:
    user_with_email(page, stack, username)
    enrol_app(page, stack)  # the QR page, then the user goes away
    assert any(m == pb.METHOD_AUTHENTICATOR_APP and s == pb.FACTOR_STATUS_PENDING
               for _, m, s in factors(mfa, username))
    page.goto(f"{stack.portal}/profile")
    row = factor_row(page, "app")
    expect(row).to_have_attribute("data-status", "Not finished")
    expect(row.locator("button, a")).to_have_count(0)  # no "continue" / "confirm"
    expect(page.locator("#add-app")).to_be_visible()  # starting again is the way
    shot("pending-not-resumed")
    # The confirmation page is gone too: it does not show the key again.
    page.goto(f"{stack.portal}/verify")
    expect(page.locator("h1")).to_have_text("Nothing to confirm")
    expect(page.locator("#totp-secret")).to_have_count(0)
