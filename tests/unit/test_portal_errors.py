"""The reference portal and backoffice when mfa-service fails: the user reads a clear
message, never a stack trace (examples/portal_backoffice; no browser needed)."""

from __future__ import annotations

from http.cookies import SimpleCookie
from typing import Any

import grpc
import httpx
import pytest
from grpc import aio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from portal_backoffice.backoffice import create_backoffice
from portal_backoffice.config import Config
from portal_backoffice.login import COOKIE, Sessions
from portal_backoffice.portal import create_portal
from portal_backoffice.users import Users

SECRET = "test-secret"


class DownStub:
    """Every RPC fails the way a channel to a stopped service does."""

    def __getattr__(self, name: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            raise aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(),
                                  details="failed to connect to all addresses")
        return call


def logged_in(sessions: Sessions) -> tuple[str, str]:
    """A session of alice with a 2FA token, kept in ``sessions``: (cookie value, CSRF token)."""
    response = Response()
    login = sessions.log_in(Request({"type": "http", "headers": []}), response, "alice")
    login = sessions.passed_2fa(response, login, "some-session-token")
    cookie: SimpleCookie = SimpleCookie(response.headers.getlist("set-cookie")[-1])
    return cookie[COOKIE].value, login.csrf


def client(app: Starlette, sessions: Sessions) -> tuple[httpx.AsyncClient, str]:
    """A browser logged in as alice, and the CSRF token its forms carry."""
    cookie, csrf = logged_in(sessions)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                             base_url=config().portal_url, cookies={COOKIE: cookie}), csrf


def config() -> Config:
    return Config(mfa_target="127.0.0.1:1", secret=SECRET)


@pytest.fixture
def sessions() -> Sessions:
    return Sessions(SECRET)


async def test_portal_profile_says_2fa_is_unavailable(sessions: Sessions) -> None:
    app = create_portal(config(), DownStub(), Users(), sessions=sessions)  # type: ignore[arg-type]
    browser, _ = client(app, sessions)
    async with browser:
        page = await browser.get("/profile")
    assert page.status_code == 503
    assert "Two-factor authentication is unavailable right now" in page.text
    assert "Traceback" not in page.text and "failed to connect" not in page.text


async def test_backoffice_says_2fa_is_unavailable(sessions: Sessions) -> None:
    app = create_backoffice(config(), DownStub(), sessions)  # type: ignore[arg-type]
    browser, _ = client(app, sessions)
    async with browser:
        page = await browser.get("/")
    assert page.status_code == 503
    assert "Two-factor authentication is unavailable right now" in page.text


async def test_logout_works_while_2fa_is_down(sessions: Sessions) -> None:
    app = create_portal(config(), DownStub(), Users(), sessions=sessions)  # type: ignore[arg-type]
    browser, csrf = client(app, sessions)
    async with browser:
        page = await browser.post("/logout", data={"csrf_token": csrf})
    assert page.status_code == 303
    assert f'{COOKIE}=""' in page.headers["set-cookie"]  # cleared all the same
