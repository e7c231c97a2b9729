"""Every RPC validates its input; bad input never reaches the store as UNKNOWN or INTERNAL.

Shape errors are INVALID_ARGUMENT with one ErrorInfo (reason ERROR_REASON_INVALID_REQUEST,
domain mfa.v1) and a BadRequest naming every bad field at once. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc import aio
from grpc_status import rpc_status
from mfa.v1 import two_factor_service_pb2 as pb

from mfa_service.clock import FixedClock
from tests.support.client import AppFactor, RichError, enroll_app, login, rich_error, totp_at

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

DOMAIN = "mfa.v1"
INVALID_REQUEST = "ERROR_REASON_INVALID_REQUEST"
# Well-formed ids that this service never handed out.
UNKNOWN_FACTOR = "6f1c2a47-3b5e-4d0a-9c1e-2b7d8e9f0a11"
UNKNOWN_CHALLENGE = "0d9e8f7a-6b5c-4d3e-8f2a-1b0c9d8e7f60"


# -- helpers ---------------------------------------------------------------------------------
async def call(stub: Stub, rpc: str, request: Message) -> Message:
    method: Callable[[Message], Any] = getattr(stub, rpc)
    response: Message = await method(request)
    return response


async def expect_error(stub: Stub, rpc: str, request: Message) -> RichError:
    with pytest.raises(aio.AioRpcError) as err:
        await call(stub, rpc, request)
    return rich_error(err.value)


def assert_invalid(e: RichError, fields: set[str]) -> None:
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT, (e.code, e.message)
    assert (e.reason, e.domain, e.error_infos) == (INVALID_REQUEST, DOMAIN, 1)
    assert set(e.field_violations) == fields, e.field_violations
    assert all(e.field_violations.values()), "every violation needs a description"
    assert e.message, "a message for humans reading logs"


def enroll(**fields: Any) -> pb.EnrollRequest:
    values: dict[str, Any] = {"user_id": "alice", "method": pb.METHOD_AUTHENTICATOR_APP,
                              "application": pb.APPLICATION_PORTAL}
    values.update(fields)
    return pb.EnrollRequest(**values)


def challenge(**fields: Any) -> pb.ChallengeRequest:
    values: dict[str, Any] = {"user_id": "alice", "factor_id": UNKNOWN_FACTOR,
                              "purpose": pb.PURPOSE_LOGIN, "application": pb.APPLICATION_PORTAL}
    values.update(fields)
    return pb.ChallengeRequest(**values)


def verify(**fields: Any) -> pb.VerifyRequest:
    values: dict[str, Any] = {"challenge_id": UNKNOWN_CHALLENGE, "code": "123456",
                              "client_ip": "203.0.113.7", "user_agent": "Mozilla/5.0"}
    values.update(fields)
    return pb.VerifyRequest(**values)


def disable(**fields: Any) -> pb.DisableRequest:
    values: dict[str, Any] = {"user_id": "alice", "factor_id": UNKNOWN_FACTOR,
                              "challenge_id": UNKNOWN_CHALLENGE, "code": "123456",
                              "client_ip": "2001:db8::1", "user_agent": "curl/8"}
    values.update(fields)
    return pb.DisableRequest(**values)


def check_session(**fields: Any) -> pb.CheckSessionRequest:
    values: dict[str, Any] = {"session_token": "t" * 43, "application": pb.APPLICATION_PORTAL}
    values.update(fields)
    return pb.CheckSessionRequest(**values)


def wrong_code(secret: str, clock: FixedClock) -> str:
    """A well-formed code that matches no step inside the +-1 window."""
    window = {totp_at(secret, clock, steps) for steps in (-1, 0, 1)}
    return next(c for c in (f"{n:06d}" for n in range(0, 1_000_000, 111_111)) if c not in window)


def case(rpc: str, request: Message, *fields: str, id: str) -> Any:
    return pytest.param(rpc, request, set(fields), id=id)


# -- shape validation, no store needed ---------------------------------------------------------
UPPER = UNKNOWN_FACTOR.upper()
LONG_USER = "u" * 129
BAD_SHAPE = [
    # Enroll
    case("Enroll", enroll(user_id=""), "user_id", id="enroll-empty-user_id"),
    case("Enroll", enroll(user_id=LONG_USER), "user_id", id="enroll-user_id-129-chars"),
    case("Enroll", enroll(user_id=" alice"), "user_id", id="enroll-user_id-leading-space"),
    case("Enroll", enroll(user_id="alice "), "user_id", id="enroll-user_id-trailing-space"),
    case("Enroll", enroll(user_id="ali\x00ce"), "user_id", id="enroll-user_id-nul"),
    case("Enroll", enroll(user_id="alice\nbob"), "user_id", id="enroll-user_id-newline"),
    case("Enroll", enroll(user_id="\x1b[31malice"), "user_id", id="enroll-user_id-escape"),
    case("Enroll", enroll(user_id="\u202eecila"), "user_id", id="enroll-user_id-rtl-override"),
    case("Enroll", enroll(user_id="\u200balice"), "user_id", id="enroll-user_id-zero-width"),
    case("Enroll", enroll(method=pb.METHOD_UNSPECIFIED), "method", id="enroll-method-unspecified"),
    case("Enroll", enroll(method=99), "method", id="enroll-method-99"),
    case("Enroll", enroll(application=pb.APPLICATION_UNSPECIFIED), "application",
         id="enroll-application-unspecified"),
    case("Enroll", enroll(application=7), "application", id="enroll-application-7"),
    case("Enroll", enroll(channel=42), "channel", id="enroll-channel-42"),
    case("Enroll", enroll(email="alice@example.com"), "email", id="enroll-email-with-app"),
    case("Enroll", enroll(phone_number="+4512345678"), "phone_number",
         id="enroll-phone-with-app"),
    case("Enroll", enroll(change_proof_challenge_id=UNKNOWN_CHALLENGE),
         "change_proof_challenge_id", id="enroll-change-proof-with-app"),
    case("Enroll", enroll(change_proof_challenge_id="nope"), "change_proof_challenge_id",
         id="enroll-change-proof-not-uuid"),
    case("Enroll", enroll(channel=pb.CHANNEL_SMS), "channel", id="enroll-channel-sms-with-app"),
    case("Enroll", enroll(channel=pb.CHANNEL_VOICE), "channel",
         id="enroll-channel-voice-with-app"),
    case("Enroll", enroll(method=pb.METHOD_RECOVERY_CODE), "method", id="enroll-recovery-code"),
    case("Enroll", enroll(account_name="Acme:alice"), "account_name",
         id="enroll-account_name-colon"),
    case("Enroll", enroll(account_name="a" * 321), "account_name",
         id="enroll-account_name-321-chars"),
    case("Enroll", enroll(user_id="", method=0, application=0),
         "user_id", "method", "application", id="enroll-three-bad-fields"),
    # Challenge
    case("Challenge", challenge(user_id=""), "user_id", id="challenge-empty-user_id"),
    case("Challenge", challenge(user_id=LONG_USER), "user_id", id="challenge-user_id-129-chars"),
    case("Challenge", challenge(user_id="alice\t"), "user_id", id="challenge-user_id-tab"),
    case("Challenge", challenge(factor_id=""), "factor_id", id="challenge-empty-factor_id"),
    case("Challenge", challenge(factor_id="factor-1"), "factor_id", id="challenge-factor_id-text"),
    case("Challenge", challenge(factor_id=UPPER), "factor_id", id="challenge-factor_id-uppercase"),
    case("Challenge", challenge(factor_id="{" + UNKNOWN_FACTOR + "}"), "factor_id",
         id="challenge-factor_id-braces"),
    case("Challenge", challenge(factor_id=UNKNOWN_FACTOR.replace("-", "")), "factor_id",
         id="challenge-factor_id-no-hyphens"),
    case("Challenge", challenge(factor_id="urn:uuid:" + UNKNOWN_FACTOR), "factor_id",
         id="challenge-factor_id-urn"),
    case("Challenge", challenge(factor_id=UNKNOWN_FACTOR + "\x00"), "factor_id",
         id="challenge-factor_id-nul"),
    case("Challenge", challenge(purpose=pb.PURPOSE_UNSPECIFIED), "purpose",
         id="challenge-purpose-unspecified"),
    case("Challenge", challenge(purpose=99), "purpose", id="challenge-purpose-99"),
    case("Challenge", challenge(application=pb.APPLICATION_UNSPECIFIED), "application",
         id="challenge-application-unspecified"),
    case("Challenge", challenge(application=3), "application", id="challenge-application-3"),
    case("Challenge", challenge(channel=99), "channel", id="challenge-channel-99"),
    case("Challenge", challenge(request_id="r" * 65), "request_id",
         id="challenge-request_id-65-chars"),
    case("Challenge", challenge(request_id=" retry-1"), "request_id",
         id="challenge-request_id-leading-space"),
    case("Challenge", challenge(request_id="retry\x00"), "request_id",
         id="challenge-request_id-nul"),
    case("Challenge", challenge(user_id=" x", factor_id="x", purpose=0, application=99,
                                request_id="r" * 65),
         "user_id", "factor_id", "purpose", "application", "request_id",
         id="challenge-five-bad-fields"),
    # Verify
    case("Verify", verify(challenge_id=""), "challenge_id", id="verify-empty-challenge_id"),
    case("Verify", verify(challenge_id="42"), "challenge_id", id="verify-challenge_id-text"),
    case("Verify", verify(challenge_id=UNKNOWN_CHALLENGE.upper()), "challenge_id",
         id="verify-challenge_id-uppercase"),
    case("Verify", verify(code=""), "code", id="verify-empty-code"),
    case("Verify", verify(code="1" * 65), "code", id="verify-code-65-chars"),
    case("Verify", verify(code="123\x00456"), "code", id="verify-code-nul"),
    case("Verify", verify(client_ip="999.1.1.1"), "client_ip", id="verify-client_ip-octet"),
    case("Verify", verify(client_ip="localhost"), "client_ip", id="verify-client_ip-hostname"),
    case("Verify", verify(client_ip="203.0.113.7:443"), "client_ip",
         id="verify-client_ip-with-port"),
    case("Verify", verify(client_ip="2001:db8::g"), "client_ip", id="verify-client_ip-bad-v6"),
    case("Verify", verify(user_agent="a" * 513), "user_agent", id="verify-user_agent-513-chars"),
    case("Verify", verify(user_agent="curl\x00"), "user_agent", id="verify-user_agent-nul"),
    case("Verify", verify(challenge_id="", code="", client_ip="x", user_agent="a" * 513),
         "challenge_id", "code", "client_ip", "user_agent", id="verify-four-bad-fields"),
    # Disable
    case("Disable", disable(user_id=""), "user_id", id="disable-empty-user_id"),
    case("Disable", disable(user_id=LONG_USER), "user_id", id="disable-user_id-129-chars"),
    case("Disable", disable(factor_id=""), "factor_id", id="disable-empty-factor_id"),
    case("Disable", disable(factor_id=UPPER), "factor_id", id="disable-factor_id-uppercase"),
    case("Disable", disable(challenge_id="c-1"), "challenge_id", id="disable-challenge_id-text"),
    case("Disable", disable(code=""), "code", id="disable-empty-code"),
    case("Disable", disable(code="9" * 65), "code", id="disable-code-65-chars"),
    case("Disable", disable(client_ip="10.0.0.256"), "client_ip", id="disable-client_ip-octet"),
    case("Disable", disable(user_agent="u" * 513), "user_agent",
         id="disable-user_agent-513-chars"),
    case("Disable", disable(user_id="", factor_id="f", challenge_id="", code="",
                            client_ip="nope", user_agent="a" * 600),
         "user_id", "factor_id", "challenge_id", "code", "client_ip", "user_agent",
         id="disable-six-bad-fields"),
    # CheckSession
    case("CheckSession", check_session(session_token=""), "session_token",
         id="check-empty-token"),
    case("CheckSession", check_session(session_token="t" * 257), "session_token",
         id="check-token-257-chars"),
    case("CheckSession", check_session(session_token="tok\x00en"), "session_token",
         id="check-token-nul"),
    case("CheckSession", check_session(application=pb.APPLICATION_UNSPECIFIED), "application",
         id="check-application-unspecified"),
    case("CheckSession", check_session(application=99), "application",
         id="check-application-99"),
    case("CheckSession", check_session(session_token="", application=0),
         "session_token", "application", id="check-two-bad-fields"),
    # ListFactors
    case("ListFactors", pb.ListFactorsRequest(), "user_id", id="list-empty-user_id"),
    case("ListFactors", pb.ListFactorsRequest(user_id=LONG_USER), "user_id",
         id="list-user_id-129-chars"),
    case("ListFactors", pb.ListFactorsRequest(user_id="alice "), "user_id",
         id="list-user_id-trailing-space"),
    case("ListFactors", pb.ListFactorsRequest(user_id="\x00"), "user_id", id="list-user_id-nul"),
    # RevokeSession
    case("RevokeSession", pb.RevokeSessionRequest(), "target", id="revoke-no-target"),
    case("RevokeSession", pb.RevokeSessionRequest(session_token=""), "session_token",
         id="revoke-empty-token"),
    case("RevokeSession", pb.RevokeSessionRequest(session_token="t" * 257), "session_token",
         id="revoke-token-257-chars"),
    case("RevokeSession", pb.RevokeSessionRequest(user_id=""), "user_id",
         id="revoke-empty-user_id"),
    case("RevokeSession", pb.RevokeSessionRequest(user_id=LONG_USER), "user_id",
         id="revoke-user_id-129-chars"),
    case("RevokeSession", pb.RevokeSessionRequest(user_id=" alice"), "user_id",
         id="revoke-user_id-leading-space"),
]


@pytest.mark.parametrize(("rpc", "request_", "fields"), BAD_SHAPE)
async def test_malformed_request_is_invalid_argument(
        stub: Stub, rpc: str, request_: Message, fields: set[str]) -> None:
    assert_invalid(await expect_error(stub, rpc, request_), fields)


# -- validation that needs real objects (the factor module checks codes and channels) -------
@dataclass
class Real:
    factor: AppFactor
    login_challenge_id: str
    disable_challenge_id: str
    clock: FixedClock


@pytest.fixture
async def real(stub: Stub, user_id: str, fresh_clock: FixedClock) -> Real:
    factor = await enroll_app(stub, user_id, fresh_clock)
    opened = [await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=factor.factor_id, purpose=purpose,
        application=pb.APPLICATION_PORTAL)) for purpose in (pb.PURPOSE_LOGIN, pb.PURPOSE_DISABLE)]
    return Real(factor, opened[0].challenge_id, opened[1].challenge_id, fresh_clock)


def verify_code(code: str) -> Callable[[Real], tuple[str, Message]]:
    return lambda r: ("Verify", pb.VerifyRequest(challenge_id=r.login_challenge_id, code=code))


def disable_code(code: str) -> Callable[[Real], tuple[str, Message]]:
    return lambda r: ("Disable", pb.DisableRequest(
        user_id=r.factor.user_id, factor_id=r.factor.factor_id,
        challenge_id=r.disable_challenge_id, code=code))


def challenge_real(**fields: Any) -> Callable[[Real], tuple[str, Message]]:
    def build(r: Real) -> tuple[str, Message]:
        values: dict[str, Any] = {"user_id": r.factor.user_id, "factor_id": r.factor.factor_id,
                                  "purpose": pb.PURPOSE_LOGIN,
                                  "application": pb.APPLICATION_PORTAL}
        values.update(fields)
        return "Challenge", pb.ChallengeRequest(**values)
    return build


MALFORMED_CODES = {  # id -> code; none can be a 6-digit code once spaces and dashes go
    "5-digits": "12345",
    "7-digits": "1234567",
    "letters": "abcdef",
    "65-chars": "1" * 65,
    "digit-and-letter": "12345a",
    "5-digits-with-dash": "12-345",
    "fullwidth-digits": "\uff11\uff12\uff13\uff14\uff15\uff16",
    "arabic-indic-digits": "\u0661\u0662\u0663\u0664\u0665\u0666",
}

BAD_ON_REAL = [
    *[pytest.param(verify_code(code), {"code"}, id=f"verify-code-{name}")
      for name, code in MALFORMED_CODES.items()],
    *[pytest.param(disable_code(code), {"code"}, id=f"disable-code-{name}")
      for name, code in list(MALFORMED_CODES.items())[:4]],
    pytest.param(challenge_real(channel=pb.CHANNEL_SMS), {"channel"},
                 id="challenge-app-factor-channel-sms"),
    pytest.param(challenge_real(channel=pb.CHANNEL_EMAIL), {"channel"},
                 id="challenge-app-factor-channel-email"),
    pytest.param(challenge_real(purpose=pb.PURPOSE_CHANGE_PHONE), {"purpose"},
                 id="challenge-app-factor-change-phone"),
]


@pytest.mark.parametrize(("build", "fields"), BAD_ON_REAL)
async def test_malformed_input_on_a_real_challenge_is_invalid_argument(
        stub: Stub, real: Real, build: Callable[[Real], tuple[str, Message]],
        fields: set[str]) -> None:
    rpc, request = build(real)
    assert_invalid(await expect_error(stub, rpc, request), fields)


async def test_malformed_codes_do_not_use_up_attempts(stub: Stub, real: Real) -> None:
    for code in MALFORMED_CODES.values():
        e = await expect_error(stub, "Verify", pb.VerifyRequest(
            challenge_id=real.login_challenge_id, code=code))
        assert_invalid(e, {"code"})
    wrong = await stub.Verify(pb.VerifyRequest(
        challenge_id=real.login_challenge_id, code=wrong_code(real.factor.secret, real.clock)))
    assert (wrong.result, wrong.attempts_remaining) == (pb.VERIFY_RESULT_INVALID_CODE, 4)
    right = await stub.Verify(pb.VerifyRequest(
        challenge_id=real.login_challenge_id, code=totp_at(real.factor.secret, real.clock)))
    assert right.result == pb.VERIFY_RESULT_APPROVED


async def test_malformed_codes_on_disable_do_not_use_up_attempts(
        stub: Stub, real: Real) -> None:
    f = real.factor
    for code in MALFORMED_CODES.values():
        e = await expect_error(stub, "Disable", pb.DisableRequest(
            user_id=f.user_id, factor_id=f.factor_id, challenge_id=real.disable_challenge_id,
            code=code))
        assert_invalid(e, {"code"})
    wrong = await stub.Disable(pb.DisableRequest(
        user_id=f.user_id, factor_id=f.factor_id, challenge_id=real.disable_challenge_id,
        code=wrong_code(f.secret, real.clock)))
    assert (wrong.result, wrong.attempts_remaining) == (pb.VERIFY_RESULT_INVALID_CODE, 4)
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=f.user_id))
    assert [x.status for x in listed.factors if x.factor_id == f.factor_id] == [
        pb.FACTOR_STATUS_ACTIVE]


async def test_length_limits_are_inclusive(stub: Stub, real: Real) -> None:
    """128-character user ids, 64-character request ids and 256-character tokens pass."""
    long_user = (real.factor.user_id + "-" + "u" * 128)[:128]
    resp = await stub.Enroll(enroll(user_id=long_user, account_name="alice@example.com"))
    assert resp.factor.user_id == long_user
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=long_user))
    assert [f.factor_id for f in listed.factors] == [resp.factor.factor_id]

    opened = await stub.Challenge(pb.ChallengeRequest(
        user_id=real.factor.user_id, factor_id=real.factor.factor_id,
        purpose=pb.PURPOSE_LOGIN, application=pb.APPLICATION_PORTAL, request_id="r" * 64))
    assert opened.challenge_id
    check = await stub.CheckSession(check_session(session_token="t" * 256))
    assert check.valid is False


@pytest.mark.parametrize("suffix", [
    pytest.param("-" + "u" * 128, id="128-chars"),
    pytest.param(":tenant-7", id="with-colon"),
])
async def test_enroll_without_account_name_accepts_every_valid_user_id(
        stub: Stub, user_id: str, suffix: str) -> None:
    valid_user = (user_id + suffix)[:128]
    resp = await stub.Enroll(enroll(user_id=valid_user))
    assert resp.factor.user_id == valid_user
    # The default label is the user id, made fit for an otpauth label (no ':').
    assert ":" not in resp.factor.masked_destination
    assert resp.factor.masked_destination.replace("-", "") == valid_user.replace(
        ":", "").replace("-", "")


# -- well-formed but unknown ids --------------------------------------------------------------
async def test_unknown_factor_is_not_found(stub: Stub, user_id: str) -> None:
    e = await expect_error(stub, "Challenge", challenge(user_id=user_id))
    assert (e.code, e.reason, e.domain, e.error_infos) == (
        grpc.StatusCode.NOT_FOUND, "ERROR_REASON_FACTOR_NOT_FOUND", DOMAIN, 1)


async def test_unknown_challenge_is_not_found_on_verify(stub: Stub) -> None:
    e = await expect_error(stub, "Verify", verify(challenge_id=str(uuid.uuid4())))
    assert (e.code, e.reason, e.domain, e.error_infos) == (
        grpc.StatusCode.NOT_FOUND, "ERROR_REASON_CHALLENGE_NOT_FOUND", DOMAIN, 1)


async def test_unknown_challenge_is_not_found_on_disable(stub: Stub, real: Real) -> None:
    e = await expect_error(stub, "Disable", pb.DisableRequest(
        user_id=real.factor.user_id, factor_id=real.factor.factor_id,
        challenge_id=str(uuid.uuid4()), code="123456"))
    assert (e.code, e.reason, e.domain, e.error_infos) == (
        grpc.StatusCode.NOT_FOUND, "ERROR_REASON_CHALLENGE_NOT_FOUND", DOMAIN, 1)


# -- SQL metacharacters are data ---------------------------------------------------------------
async def test_sql_metacharacters_in_ids_are_just_data(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    session = await login(stub, factor, fresh_clock)
    # Not the values of the sweep below, which may enrol them as users.
    for evil in ("x' OR 'x'='x", "') OR TRUE; --", "%", "_", "*", "\\"):
        listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=evil))
        assert list(listed.factors) == [], evil
        revoked = await stub.RevokeSession(pb.RevokeSessionRequest(user_id=evil))
        assert revoked.revoked_count == 0, evil
    check = await stub.CheckSession(pb.CheckSessionRequest(
        session_token=session.session_token, application=pb.APPLICATION_PORTAL))
    assert check.valid


# -- robustness sweep -------------------------------------------------------------------------
NASTY = [
    "", " ", "\x00", "a" * 10_000, "\U0001f510\U0001f642\U0001f44d\U0001f3fd",
    "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627",  # RTL text
    "\u202eevil\u202c", "' OR 1=1 --", "../../etc/passwd", "%s%n%x%p",
    # Valid UTF-8 but hostile: noncharacters, the last code point, combining and joiners.
    # (Lone surrogates cannot be sent at all: protobuf strings must be UTF-8.)
    "\ufffe\uffff\U0010ffff", "e\u0301\u200d\u00a0\ufeff", "\x1b[2J\r\n",
]
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED,
           # Wrong codes in the sweep add up to a lockout: a refusal, not a fault.
           grpc.StatusCode.RESOURCE_EXHAUSTED}

SWEEP = [
    ("Enroll", ["user_id", "email", "phone_number", "account_name",
                "change_proof_challenge_id"]),
    ("Challenge", ["user_id", "factor_id", "request_id"]),
    ("Verify", ["challenge_id", "code", "client_ip", "user_agent", "device_label"]),
    ("Disable", ["user_id", "factor_id", "challenge_id", "code", "client_ip", "user_agent"]),
    ("CheckSession", ["session_token"]),
    ("ListFactors", ["user_id"]),
    ("RevokeSession", ["session_token", "user_id"]),
    ("RecognizeDevice", ["user_id", "device_token", "client_ip", "user_agent"]),
    ("ListDevices", ["user_id"]),
    ("ForgetDevice", ["user_id", "device_id", "client_ip", "user_agent"]),
]


def base_requests(real: Real, login_challenge_id: str,
                  session_token: str) -> dict[str, Message]:
    f, wrong = real.factor, wrong_code(real.factor.secret, real.clock)
    return {
        # A fresh user, so requests that pass validation really enrol (and store the value).
        "Enroll": enroll(user_id=f"{f.user_id}-enroll"),
        "Challenge": pb.ChallengeRequest(user_id=f.user_id, factor_id=f.factor_id,
                                         purpose=pb.PURPOSE_LOGIN,
                                         application=pb.APPLICATION_PORTAL),
        "Verify": pb.VerifyRequest(challenge_id=login_challenge_id, code=wrong,
                                   client_ip="198.51.100.1", user_agent="sweep",
                                   remember_device=True, device_label="sweep"),
        "Disable": pb.DisableRequest(user_id=f.user_id, factor_id=f.factor_id,
                                     challenge_id=real.disable_challenge_id, code=wrong,
                                     client_ip="198.51.100.1", user_agent="sweep"),
        "CheckSession": pb.CheckSessionRequest(session_token=session_token,
                                               application=pb.APPLICATION_BACKOFFICE),
        "ListFactors": pb.ListFactorsRequest(user_id=f.user_id),
        "RevokeSession": pb.RevokeSessionRequest(session_token="not-a-live-token"),
        "RecognizeDevice": pb.RecognizeDeviceRequest(
            user_id=f.user_id, device_token="not-a-device-token-" + "x" * 24,
            application=pb.APPLICATION_PORTAL, client_ip="198.51.100.1", user_agent="sweep"),
        "ListDevices": pb.ListDevicesRequest(user_id=f.user_id),
        "ForgetDevice": pb.ForgetDeviceRequest(
            user_id=f.user_id, device_id="00000000-0000-4000-8000-000000000000",
            client_ip="198.51.100.1", user_agent="sweep"),
    }


def contract_problem(err: aio.AioRpcError) -> str | None:
    """What is wrong with an error answer, or None when it follows AIP-193."""
    if err.code() not in ALLOWED:
        return f"status {err.code().name}: {err.details()}"
    try:
        status = rpc_status.from_call(err)
    except ValueError as exc:  # google.rpc.Status disagrees with the gRPC status
        return f"inconsistent google.rpc.Status: {exc}"
    if status is None:
        return f"{err.code().name} without google.rpc.Status"
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    if len(infos) != 1 or infos[0].domain != DOMAIN:
        return f"{err.code().name} with ErrorInfos {[(i.reason, i.domain) for i in infos]}"
    return None


@pytest.mark.parametrize(("rpc", "field"),
                         [pytest.param(rpc, name, id=f"{rpc}.{name}")
                          for rpc, names in SWEEP for name in names])
async def test_nasty_values_never_break_the_server(
        stub: Stub, real: Real, rpc: str, field: str) -> None:
    session = await login(stub, real.factor, real.clock)  # a live token for CheckSession
    login_challenge = await stub.Challenge(pb.ChallengeRequest(  # login() used up the first
        user_id=real.factor.user_id, factor_id=real.factor.factor_id,
        purpose=pb.PURPOSE_LOGIN, application=pb.APPLICATION_PORTAL))
    base = base_requests(real, login_challenge.challenge_id, session.session_token)[rpc]
    problems: list[str] = []
    for value in NASTY:
        request = type(base)()
        request.CopyFrom(base)
        setattr(request, field, value)
        try:
            await call(stub, rpc, request)
        except aio.AioRpcError as err:
            problem = contract_problem(err)
            if problem is not None:
                problems.append(f"{rpc}.{field}={value[:40]!r}: {problem}")
    assert problems == []
    # ...and the server still serves this user afterwards.
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=real.factor.user_id))
    assert [f.method for f in listed.factors] == [pb.METHOD_AUTHENTICATOR_APP,
                                                  pb.METHOD_RECOVERY_CODE]
