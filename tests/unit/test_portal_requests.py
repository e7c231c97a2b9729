"""What the reference portal sends to mfa-service (examples/portal_backoffice; no browser,
a recording stub): the account email on the calls that change factors, and the 2FA session
token when it asks for a new confirmation code of a factor being added."""

from __future__ import annotations

import re
from http.cookies import SimpleCookie
from typing import Any

import httpx
from google.protobuf.timestamp_pb2 import Timestamp
from mfa.v1 import two_factor_service_pb2 as pb
from starlette.requests import Request
from starlette.responses import Response

from portal_backoffice.config import Config
from portal_backoffice.login import COOKIE, Sessions
from portal_backoffice.portal import FLOW_COOKIE, create_portal
from portal_backoffice.users import Users, account_email

SECRET = "test-secret"
TOKEN = "the-2fa-session-token"
CONFIG = Config(mfa_target="127.0.0.1:1", secret=SECRET)


class RecordingStub:
    """alice with an ACTIVE email factor and a fresh 2FA session; records every request."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def sent(self, name: str) -> list[Any]:
        return [req for called, req in self.calls if called == name]

    async def ListFactors(self, req: pb.ListFactorsRequest, **kw: Any) -> Any:
        self.calls.append(("ListFactors", req))
        return pb.ListFactorsResponse(factors=[pb.Factor(
            factor_id="f-email", method=pb.METHOD_EMAIL, status=pb.FACTOR_STATUS_ACTIVE,
            masked_destination="a***@example.com")])

    async def CheckSession(self, req: pb.CheckSessionRequest, **kw: Any) -> Any:
        self.calls.append(("CheckSession", req))
        now = Timestamp()
        now.GetCurrentTime()
        return pb.CheckSessionResponse(valid=req.session_token == TOKEN, user_id="alice",
                                       authenticated_at=now, method=pb.METHOD_EMAIL,
                                       application=pb.APPLICATION_PORTAL)

    async def Enroll(self, req: pb.EnrollRequest, **kw: Any) -> Any:
        self.calls.append(("Enroll", req))
        return pb.EnrollResponse(factor=pb.Factor(
            factor_id="f-phone", method=pb.METHOD_PHONE, status=pb.FACTOR_STATUS_PENDING,
            masked_destination="+45 ** ** ** 56"), challenge_id="c-1", code_length=6)

    async def Challenge(self, req: pb.ChallengeRequest, **kw: Any) -> Any:
        self.calls.append(("Challenge", req))
        return pb.ChallengeResponse(challenge_id="c-2", method=pb.METHOD_PHONE,
                                    channel=pb.CHANNEL_SMS, code_length=6,
                                    masked_destination="+45 ** ** ** 56")

    async def Verify(self, req: pb.VerifyRequest, **kw: Any) -> Any:
        self.calls.append(("Verify", req))
        return pb.VerifyResponse(result=pb.VERIFY_RESULT_INVALID_CODE, attempts_remaining=4)


def alice(sessions: Sessions) -> str:
    response = Response()
    login = sessions.log_in(Request({"type": "http", "headers": []}), response, "alice")
    sessions.passed_2fa(response, login, TOKEN)
    cookie: SimpleCookie = SimpleCookie(response.headers.getlist("set-cookie")[-1])
    return cookie[COOKIE].value


def token_on(page: httpx.Response) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match
    return match.group(1)


async def test_adding_a_phone_sends_the_account_email_and_the_session_on_resend() -> None:
    stub, sessions = RecordingStub(), Sessions(SECRET)
    app = create_portal(CONFIG, stub, Users(), sessions=sessions)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url=CONFIG.portal_url,
                                 cookies={COOKIE: alice(sessions)}) as browser:
        token = token_on(await browser.get("/profile/add/phone"))
        started = await browser.post("/profile/add/phone", data={
            "csrf_token": token, "phone_number": "+4520123456", "channel": "sms"})
        assert started.status_code == 303, started.text
        assert FLOW_COOKIE in browser.cookies
        resent = await browser.post("/verify/resend", data={"csrf_token": token,
                                                            "channel": "sms"})
        assert resent.status_code == 303, resent.text
        wrong = await browser.post("/verify", data={"csrf_token": token, "code": "000000"})
        assert wrong.status_code == 400
    [enroll] = stub.sent("Enroll")
    assert account_email("alice") == "alice@example.org"
    assert enroll.session_token == TOKEN
    [challenge] = stub.sent("Challenge")
    assert challenge.purpose == pb.PURPOSE_CONFIRM_ENROLLMENT
    assert challenge.session_token == TOKEN
    [verify] = stub.sent("Verify")
    assert verify.account_email == "alice@example.org"


async def test_a_login_challenge_does_not_carry_the_session_token() -> None:
    stub, sessions = RecordingStub(), Sessions(SECRET)
    app = create_portal(CONFIG, stub, Users(), sessions=sessions)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url=CONFIG.portal_url,
                                 cookies={COOKIE: alice(sessions)}) as browser:
        token = token_on(await browser.get("/2fa?n=step-up"))
        started = await browser.post("/2fa/start", data={"csrf_token": token,
                                                         "factor_id": "f-email"})
        assert started.status_code == 303, started.text
    [challenge] = stub.sent("Challenge")
    assert challenge.purpose == pb.PURPOSE_LOGIN
    assert challenge.session_token == ""
