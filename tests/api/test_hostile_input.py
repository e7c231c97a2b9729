"""Hostile WebAuthn responses through the real server (SQLite and PostgreSQL): whatever a
caller puts in ``webauthn_response`` (nesting deep enough to blow the parser's stack, a
field of the wrong type, null, a huge blob, the other ceremony's JSON), the answer is
INVALID_ARGUMENT naming the field or a VerifyResult, never INTERNAL or UNKNOWN, and no
traceback reaches the log. Also RevokeSession(user_id), the central "log out everywhere".
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc import aio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from webauthn.helpers import bytes_to_base64url

from mfa_service.app import App, create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.transport.auth import new_token
from tests.support.client import rich_error, totp_at
from tests.support.config import TEST_KEYRING, make_settings
from tests.support.examples import examples
from tests.support.passkey import enroll_passkey, passkey_challenge
from tests.support.softauthn import SoftAuthenticator

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

Metadata = tuple[tuple[str, str], ...]
INVALID = "invalid_argument"  # expected: INVALID_ARGUMENT on webauthn_response
REFUSED = "refused"  # expected: a VerifyResult that is not APPROVED
EITHER = "either"


@dataclass
class Ceremonies:
    """A user with an active passkey, and one open challenge of each ceremony with the
    genuine browser answer to it (not sent): a login (assertion) and the confirmation of
    a second passkey (registration)."""

    user_id: str
    login_challenge: str
    assertion: dict[str, Any]
    enrol_challenge: str
    registration: dict[str, Any]


async def ceremonies(stub: Stub, user_id: str) -> Ceremonies:
    key = SoftAuthenticator()
    enrolled, confirmed = await enroll_passkey(stub, user_id, key)
    assert confirmed.result == pb.VERIFY_RESULT_APPROVED
    factor_id = enrolled.factor.factor_id
    ch = await passkey_challenge(stub, user_id, factor_id)
    session = await stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, webauthn_response=key.get(ch.webauthn_request_options)))
    assert session.result == pb.VERIFY_RESULT_APPROVED
    second = await stub.Enroll(pb.EnrollRequest(  # a second passkey: step-up with the session
        user_id=user_id, method=pb.METHOD_PASSKEY, application=pb.APPLICATION_PORTAL,
        account_name=f"{user_id}@example.com", session_token=session.session.session_token))
    login = await passkey_challenge(stub, user_id, factor_id)
    return Ceremonies(
        user_id, login.challenge_id, json.loads(key.get(login.webauthn_request_options)),
        second.challenge_id,
        json.loads(SoftAuthenticator().create(second.webauthn_creation_options)))


def nested_inside(depth: int) -> Callable[[dict[str, Any]], Any]:
    """A genuine credential whose clientExtensionResults nests ``depth`` arrays deep (as
    text: json.dumps itself would recurse too deeply)."""
    def mutate(credential: dict[str, Any]) -> Any:
        text = json.dumps(setting("clientExtensionResults", {"x": "DEEP"})(credential))
        return text.replace('"DEEP"', "[" * depth + "0" + "]" * depth)
    return mutate


def setting(path: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    """A mutation: the field at dotted ``path`` set to ``value`` (``None``: null)."""
    def mutate(credential: dict[str, Any]) -> Any:
        out = copy.deepcopy(credential)
        *parents, last = path.split(".")
        target = out
        for p in parents:
            target = target[p]
        target[last] = value
        return out
    return mutate


def raw(text: str) -> Callable[[dict[str, Any]], Any]:
    return lambda _credential: text


def null_everywhere(credential: dict[str, Any]) -> Any:
    out: dict[str, Any] = {k: None for k in credential}
    out["response"] = {k: None for k in credential["response"]}
    return out


HUGE = "A" * 60_000  # valid base64url, under the 64 KiB limit
CASES: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "deep_nesting": (raw("[" * 2000 + "]" * 2000), INVALID),
    "deep_nesting_objects": (raw('{"a":' * 2000 + "0" + "}" * 2000), INVALID),
    "deep_nesting_inside": (nested_inside(2000), INVALID),
    "brackets_inside_strings_are_fine": (setting("clientExtensionResults", {"x": "[{" * 500}),
                                         EITHER),
    "transports_int": (setting("response.transports", 5), INVALID),
    "transports_ints": (setting("response.transports", [1, 2]), INVALID),
    "transports_object": (setting("response.transports", {"usb": True}), INVALID),
    "id_number": (setting("id", 12345), INVALID),
    "raw_id_number": (setting("rawId", 12345), INVALID),
    "type_other": (setting("type", "password"), INVALID),
    "response_list": (setting("response", []), INVALID),
    "response_string": (setting("response", "x"), INVALID),
    "client_data_not_base64url": (setting("response.clientDataJSON", "not base64url!"),
                                  INVALID),
    "client_data_bad_length": (setting("response.clientDataJSON", "abcde"), INVALID),
    "client_data_not_json": (setting("response.clientDataJSON",
                                     bytes_to_base64url(b"\xff\x00{")), REFUSED),
    "client_data_number": (setting("response.clientDataJSON", 7), INVALID),
    "authenticator_data_huge": (setting("response.authenticatorData", HUGE), REFUSED),
    "attestation_object_huge": (setting("response.attestationObject", HUGE), REFUSED),
    "signature_number": (setting("response.signature", 1.5), INVALID),
    "user_handle_object": (setting("response.userHandle", {}), INVALID),
    "algorithm_string": (setting("response.publicKeyAlgorithm", "-7"), INVALID),
    "attachment_list": (setting("authenticatorAttachment", ["platform"]), INVALID),
    "extensions_list": (setting("clientExtensionResults", []), INVALID),
    "null_everywhere": (null_everywhere, INVALID),
    "null": (raw("null"), INVALID),
    "not_json": (raw("{'id': 1}"), INVALID),
    "lone_surrogate_origin": (raw('{"id": "\\ud800", "type": "public-key", "response": {}}'),
                              INVALID),
}
READ_BY = {"authenticator_data_huge": "assertion", "attestation_object_huge": "registration"}
for _name in ("id", "rawId", "type", "response", "authenticatorAttachment",
              "clientExtensionResults"):
    CASES[f"null_{_name}"] = (setting(_name, None), EITHER)
for _name in ("clientDataJSON", "attestationObject", "authenticatorData", "signature",
              "userHandle", "transports", "publicKey", "publicKeyAlgorithm"):
    CASES[f"null_response_{_name}"] = (setting(f"response.{_name}", None), EITHER)


async def answer(stub: Stub, challenge_id: str, response: Any) -> str:
    """INVALID (naming webauthn_response) or REFUSED; anything else fails the test."""
    text = response if isinstance(response, str) else json.dumps(response)
    error: aio.AioRpcError | None = None
    try:
        result = await stub.Verify(pb.VerifyRequest(challenge_id=challenge_id,
                                                    webauthn_response=text))
    except aio.AioRpcError as err:
        error = err
    if error is not None:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(),
                                                                  error.details())
        assert "webauthn_response" in rich_error(error).field_violations
        return INVALID
    assert result.result != pb.VERIFY_RESULT_UNSPECIFIED
    return "approved" if result.result == pb.VERIFY_RESULT_APPROVED else REFUSED


async def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """Called inside ``caplog.at_level``: the access-log line of the last call is written
    after its answer was sent, so it may arrive a moment after the client has it."""
    for _ in range(200):
        if [r for r in caplog.records if r.name == "mfa_service.rpc"]:
            break
        await asyncio.sleep(0.01)
    assert [r for r in caplog.records if r.name == "mfa_service.rpc"], "log not captured"
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("ceremony", ["assertion", "registration"])
@pytest.mark.parametrize("case", list(CASES))
async def test_a_hostile_webauthn_response_is_invalid_or_refused_never_internal(
        stub: Stub, user_id: str, fresh_clock: FixedClock, caplog: pytest.LogCaptureFixture,
        case: str, ceremony: str) -> None:
    c = await ceremonies(stub, user_id)
    mutate, expected = CASES[case]
    challenge_id, genuine = ((c.login_challenge, c.assertion) if ceremony == "assertion"
                             else (c.enrol_challenge, c.registration))
    if ceremony == "registration" and case == "null_response_attestationObject":
        expected = INVALID  # a registration without its attestation is no registration
    if READ_BY.get(case, ceremony) != ceremony:
        expected = EITHER  # a field this ceremony does not read
    with caplog.at_level(logging.INFO, logger="mfa_service"):
        got = await answer(stub, challenge_id, mutate(genuine))
        if expected != EITHER:
            assert got == expected
        else:
            assert got in (INVALID, REFUSED, "approved")
        if got == INVALID:  # a malformed request is not a guess: the genuine one still works
            assert await answer(stub, challenge_id, genuine) == "approved"
        await no_traceback(caplog)


@pytest.mark.parametrize("swap", ["registration_for_assertion", "assertion_for_registration"])
async def test_the_other_ceremony_s_json_is_refused(
        stub: Stub, user_id: str, fresh_clock: FixedClock, caplog: pytest.LogCaptureFixture,
        swap: str) -> None:
    c = await ceremonies(stub, user_id)
    with caplog.at_level(logging.INFO, logger="mfa_service"):
        if swap == "registration_for_assertion":
            got = await answer(stub, c.login_challenge, c.registration)
        else:
            got = await answer(stub, c.enrol_challenge, c.assertion)
        assert got in (INVALID, REFUSED)
        await no_traceback(caplog)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)
FIELDS = ["id", "rawId", "type", "response", "authenticatorAttachment",
          "clientExtensionResults", "response.clientDataJSON", "response.authenticatorData",
          "response.signature", "response.userHandle", "response.attestationObject",
          "response.transports", "response.publicKeyAlgorithm"]


@settings(max_examples=examples(50, least=10), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(value=JSON, where=st.sampled_from(["whole", *FIELDS]),
       ceremony=st.sampled_from(["assertion", "registration"]))
async def test_any_json_value_as_webauthn_response_is_never_internal(
        stub: Stub, fresh_clock: FixedClock, caplog: pytest.LogCaptureFixture,
        value: Any, where: str, ceremony: str) -> None:
    caplog.clear()
    c = await ceremonies(stub, f"user-{uuid.uuid4().hex[:10]}")
    challenge_id, genuine = ((c.login_challenge, c.assertion) if ceremony == "assertion"
                             else (c.enrol_challenge, c.registration))
    sent = value if where == "whole" else setting(where, value)(genuine)
    with caplog.at_level(logging.INFO, logger="mfa_service"):
        assert await answer(stub, challenge_id, sent) in (INVALID, REFUSED, "approved")
        await no_traceback(caplog)


# -- RevokeSession(user_id): the central "log out everywhere" --------------------------------
@pytest.fixture
async def callers_server(tmp_path: Path, database_url: str,
                         fresh_clock: FixedClock) -> AsyncIterator[tuple[App, dict[str, str]]]:
    """A server with a callers file: a back-office backend, a portal-only backend and a
    caller allowed no application; their bearer tokens by name."""
    tokens = {name: new_token() for name in ("backoffice", "portal", "nothing")}
    apps = {"backoffice": ["backoffice"], "portal": ["portal"], "nothing": []}
    (tmp_path / "callers.toml").write_text("".join(
        f'[[callers]]\nname = "{name}"\napplications = {json.dumps(apps[name])}\n'
        f'token_sha256 = ["{sha}"]\n' for name, (_token, sha) in tokens.items()))
    app = await create_server(make_settings(database_url,
                                            callers_file=tmp_path / "callers.toml"),
                              clock=fresh_clock, keyring=Keyring.parse(TEST_KEYRING))
    try:
        yield app, {name: token for name, (token, _sha) in tokens.items()}
    finally:
        await app.stop(0)


async def _backoffice_session(stub: Stub, as_backoffice: Metadata, user_id: str,
                              clock: FixedClock) -> str:
    enrolled = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP,
        application=pb.APPLICATION_BACKOFFICE, account_name=f"{user_id}@example.com"),
        metadata=as_backoffice)
    confirmed = await stub.Verify(pb.VerifyRequest(
        challenge_id=enrolled.challenge_id, code=totp_at(enrolled.totp_secret, clock)),
        metadata=as_backoffice)
    assert confirmed.result == pb.VERIFY_RESULT_APPROVED
    clock.advance(30)
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=enrolled.factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_BACKOFFICE), metadata=as_backoffice)
    login = await stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, code=totp_at(enrolled.totp_secret, clock)),
        metadata=as_backoffice)
    assert login.result == pb.VERIFY_RESULT_APPROVED
    clock.advance(30)
    return login.session.session_token


async def test_a_portal_only_caller_logs_a_user_out_of_the_backoffice_too(
        callers_server: tuple[App, dict[str, str]], user_id: str,
        fresh_clock: FixedClock) -> None:
    app, tokens = callers_server
    as_ = {name: (("authorization", f"Bearer {t}"),) for name, t in tokens.items()}
    async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub: Stub = pb_grpc.TwoFactorServiceStub(channel)
        token = await _backoffice_session(stub, as_["backoffice"], user_id, fresh_clock)
        check = pb.CheckSessionRequest(session_token=token,
                                       application=pb.APPLICATION_BACKOFFICE)
        assert (await stub.CheckSession(check, metadata=as_["backoffice"])).valid

        with pytest.raises(aio.AioRpcError) as err:  # allowed no application: refused
            await stub.RevokeSession(pb.RevokeSessionRequest(user_id=user_id),
                                     metadata=as_["nothing"])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert rich_error(err.value).reason == "ERROR_REASON_APPLICATION_NOT_ALLOWED"
        assert (await stub.CheckSession(check, metadata=as_["backoffice"])).valid

        ended = await stub.RevokeSession(pb.RevokeSessionRequest(user_id=user_id),
                                         metadata=as_["portal"])
        assert ended.revoked_count == 1
        assert not (await stub.CheckSession(check, metadata=as_["backoffice"])).valid
