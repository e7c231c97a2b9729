"""The delivery rig: an in-process server whose messages go through the outbox to a real
SMTP server (aiosmtpd) and a real local HTTP server (webhook and Twilio shapes), its
generated client, and helpers to read what reached those edges. Its fixtures (``smtp``,
``provider``, ``rig``) are in tests/conftest.py."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

import phonenumbers
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy import select

from mfa_service.app import App, create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.settings import Settings
from mfa_service.store.models import outbox
from tests.support.client import AppFactor, login
from tests.support.config import TEST_KEYRING, make_settings
from tests.support.fakes import HttpServer, RecordedRequest, RecordingHandler

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

CODE_RE = re.compile(r"\b(\d{6})\b")
SPOKEN_CODE_RE = re.compile(r"\d(?:, \d){5}")


def has_code(text: str) -> bool:
    return bool(CODE_RE.search(text) or SPOKEN_CODE_RE.search(text))


@dataclass
class Rig:
    """A server wired to real delivery edges, its client, and what reached the edges."""

    app: App
    stub: Stub
    clock: FixedClock
    smtp: RecordingHandler
    provider: HttpServer
    restart: Callable[..., Any]
    recovery_codes: dict[str, list[str]] = field(default_factory=dict)
    # Per user: a factor that receives codes (factor_id, "email"|"phone", destination),
    # used to pass 2FA again for a step-up session.
    reachable: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    app_factors: dict[str, AppFactor] = field(default_factory=dict)  # or an app for that

    def has_factor(self, user_id: str) -> bool:
        return user_id in self.reachable or user_id in self.app_factors

    def mails_to(self, address: str, *, notices: bool = False) -> list[EmailMessage]:
        """Mails that carry a code (with ``notices``: every mail) to ``address``."""
        return [m for m in self.smtp.messages() if m["To"] == address
                and (notices or CODE_RE.search(m.get_content()))]

    def calls_to(self, number: str, *, notices: bool = False) -> list[RecordedRequest]:
        """SMS/calls that carry a code (with ``notices``: every one) to ``number``."""
        out = []
        for r in self.provider.requests:
            to = (json.loads(r.body)["to"] if r.headers.get("content-type") == "application/json"
                  else r.form()["To"])
            if to == number and (notices or has_code(phone_text(r))):
                out.append(r)
        return out


def phone_text(r: RecordedRequest) -> str:
    if r.headers.get("content-type") == "application/json":
        return str(json.loads(r.body)["text"])
    form = r.form()
    return form.get("Body") or form["Twiml"]


def unique_phone() -> str:
    """A valid, practically unique Danish number."""
    while True:
        candidate = f"+452{uuid.uuid4().int % 10**7:07d}"
        if phonenumbers.is_valid_number(phonenumbers.parse(candidate)):
            return candidate


def unique_email(user_id: str) -> str:
    return f"{user_id}@example.com"


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll ``check`` until it returns something truthy (the dispatcher runs concurrently)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting for delivery"
        await asyncio.sleep(0.01)


async def delivered_all(rig: Rig, user_id: str) -> None:
    """Wait until nothing is pending in the outbox for ``user_id``."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        async with rig.app.database.transaction() as tx:
            if await tx.outbox.pending_for(user_id) == 0:
                return
        assert asyncio.get_running_loop().time() < deadline, "outbox never drained"
        await asyncio.sleep(0.01)


async def outbox_row(rig: Rig, challenge_id: str, until: Callable[[Any], bool]) -> Any:
    """The outbox row of a challenge once ``until`` holds (the dispatcher settles it)."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        async with rig.app.database.engine.connect() as conn:
            row = (await conn.execute(select(outbox).where(
                outbox.c.challenge_id == challenge_id))).one()
        if until(row):
            return row
        assert asyncio.get_running_loop().time() < deadline, "outbox row never settled"
        await asyncio.sleep(0.01)


def code_in(text: str) -> str:
    match = CODE_RE.search(text)
    assert match, "no code in the message"
    return match.group(1)


def delivery_settings(database_url: str, smtp_port: int, provider: HttpServer,
                      phone_provider: str = "webhook", **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "outbox_dispatcher": True, "outbox_poll_seconds": 0.05,
        "email_provider": "smtp", "smtp_host": "127.0.0.1", "smtp_port": smtp_port,
        "smtp_tls": "none", "smtp_from": "no-reply@example.test",
        "phone_provider": phone_provider, "outbox_backoff_max_seconds": 60,
    }
    if phone_provider == "webhook":
        values["phone_webhook_url"] = provider.url("/send")
    else:
        values.update(twilio_base_url=provider.url(""), twilio_account_sid="AC0123",
                      twilio_auth_token="tw-token", twilio_from="+4570000000")
    values.update(extra)
    return make_settings(database_url, **values)


@asynccontextmanager
async def running_rig(database_url: str, smtp: tuple[RecordingHandler, int],
                      provider: HttpServer, clock: FixedClock,
                      phone_provider: str) -> AsyncIterator[Rig]:
    """A delivery rig on ``database_url``; every server it started is stopped at the end."""
    handler, port = smtp
    apps: list[App] = []

    async def start(**extra: Any) -> App:
        settings = delivery_settings(database_url, port, provider, phone_provider, **extra)
        app = await create_server(settings, clock=clock,
                                  keyring=Keyring.parse(TEST_KEYRING))
        apps.append(app)
        return app

    app = await start()
    channel = aio.insecure_channel(f"127.0.0.1:{app.port}")
    stub: Stub = pb_grpc.TwoFactorServiceStub(channel)
    try:
        yield Rig(app, stub, clock, handler, provider, start)
    finally:
        await channel.close()
        for a in apps:
            await a.stop(0)


async def step_up(rig: Rig, user_id: str) -> str:
    """Pass 2FA again (the user's app, else their first email/phone): a fresh session."""
    if user_id in rig.app_factors:
        return (await login(rig.stub, rig.app_factors[user_id], rig.clock)).session_token
    factor_id, kind, destination = rig.reachable[user_id]
    before = (len(rig.mails_to(destination)) if kind == "email"
              else len(rig.calls_to(destination)))
    ch = await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    if kind == "email":
        text = (await eventually(lambda: rig.mails_to(destination)[before:]))[-1].get_content()
    else:
        text = phone_text((await eventually(lambda: rig.calls_to(destination)[before:]))[-1])
    ok = await rig.stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id,
                                                code=code_in(text)))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    return ok.session.session_token


async def enroll_email(rig: Rig, user_id: str) -> tuple[str, str]:
    """Enrol and confirm an email factor; returns (factor_id, address).

    The user's recovery codes (first factor) are kept in ``rig.recovery_codes``; a user
    with a factor already passes 2FA again first (the step-up rule)."""
    address = unique_email(user_id)
    session = await step_up(rig, user_id) if rig.has_factor(user_id) else ""
    resp = await rig.stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_EMAIL, email=address,
        application=pb.APPLICATION_PORTAL, session_token=session))
    mail = (await eventually(lambda: rig.mails_to(address)))[-1]
    ok = await rig.stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id,
                                                code=code_in(mail.get_content())))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    rig.recovery_codes[user_id] = list(ok.recovery_codes)
    rig.reachable.setdefault(user_id, (resp.factor.factor_id, "email", address))
    rig.clock.advance(31)  # past the resend cooldown
    return resp.factor.factor_id, address


async def enroll_phone(rig: Rig, user_id: str, number: str | None = None,
                       proof: str = "") -> tuple[str, str]:
    number = number or unique_phone()
    session = await step_up(rig, user_id) if rig.has_factor(user_id) else ""
    before = len(rig.calls_to(number))
    resp = await rig.stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_PHONE, phone_number=number,
        channel=pb.CHANNEL_SMS, application=pb.APPLICATION_PORTAL,
        change_proof_challenge_id=proof, session_token=session))
    sms = (await eventually(lambda: rig.calls_to(number)[before:]))[-1]
    ok = await rig.stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id,
                                                code=code_in(phone_text(sms))))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    if not proof:
        rig.reachable.setdefault(user_id, (resp.factor.factor_id, "phone", number))
    else:  # the old number is gone: step up with the new one from now on
        rig.reachable[user_id] = (resp.factor.factor_id, "phone", number)
    rig.clock.advance(31)
    return resp.factor.factor_id, number


