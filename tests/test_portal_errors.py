"""The reference portal and backoffice when mfa-service fails: the user reads a clear
message, never a stack trace (examples/portal_backoffice; no browser needed)."""

from __future__ import annotations

import time
from http.cookies import SimpleCookie
from typing import Any

import grpc
import httpx
import pytest
from grpc import aio
from starlette.applications import Starlette
from starlette.responses import Response

from portal_backoffice.backoffice import create_backoffice
from portal_backoffice.config import Config
from portal_backoffice.login import COOKIE, Login, LoginCookie
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


def login_cookie() -> str:
    response = Response()
    LoginCookie(SECRET).write(response, Login("alice", time.time(), "some-session-token"))
    cookie: SimpleCookie = SimpleCookie(response.headers["set-cookie"])
    return cookie[COOKIE].value


def client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost",
                             cookies={COOKIE: login_cookie()})


@pytest.fixture
def config() -> Config:
    return Config(mfa_target="127.0.0.1:1", secret=SECRET)


async def test_portal_profile_says_2fa_is_unavailable(config: Config) -> None:
    app = create_portal(config, DownStub(), Users())  # type: ignore[arg-type]
    async with client(app) as browser:
        page = await browser.get("/profile")
    assert page.status_code == 503
    assert "Two-factor authentication is unavailable right now" in page.text
    assert "Traceback" not in page.text and "failed to connect" not in page.text


async def test_backoffice_says_2fa_is_unavailable(config: Config) -> None:
    app = create_backoffice(config, DownStub())  # type: ignore[arg-type]
    async with client(app) as browser:
        page = await browser.get("/")
    assert page.status_code == 503
    assert "Two-factor authentication is unavailable right now" in page.text


async def test_logout_works_while_2fa_is_down(config: Config) -> None:
    app = create_portal(config, DownStub(), Users())  # type: ignore[arg-type]
    async with client(app) as browser:
        page = await browser.post("/logout")
    assert page.status_code == 303
    assert f'{COOKIE}=""' in page.headers["set-cookie"]  # cleared all the same
