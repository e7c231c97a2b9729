"""Passkeys (METHOD_PASSKEY) through the real server, on SQLite and PostgreSQL.

The browser and its authenticator are the only fake: tests/support/softauthn.py makes what
``navigator.credentials.create()/get()`` and ``toJSON()`` would, with real ES256 keys, so
every refusal below is py_webauthn refusing a real signature, origin, RP ID or flag.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from webauthn.helpers import bytes_to_base64url

from mfa_service.clock import FixedClock
from tests.support.client import enroll_app, login, rich_error
from tests.support.passkey import enroll_passkey, passkey_challenge, passkey_login
from tests.support.softauthn import CredentialExcluded, SoftAuthenticator

if TYPE_CHECKING:  # the async stub class exists only in the typed stubs (.pyi)
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub
ONE_PASSWORD = bytes.fromhex("bada5566a7aa401fbd9645619a55120d")


async def test_a_first_passkey_is_enrolled_and_confirmed_by_the_browser(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    key = SoftAuthenticator()
    enrolled = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_PASSKEY, application=pb.APPLICATION_PORTAL,
        account_name="ada@example.com"))
    assert enrolled.factor.status == pb.FACTOR_STATUS_PENDING
    assert enrolled.code_length == 0 and not enrolled.totp_secret
    options = json.loads(enrolled.webauthn_creation_options)
    assert options["rp"] == {"id": "localhost", "name": "Cloud Platform"}
    # The user handle is opaque: not the user id, nothing that reveals it.
    assert user_id not in enrolled.webauthn_creation_options
    assert options["user"]["name"] == "ada@example.com"
    assert options["authenticatorSelection"]["userVerification"] == "required"
    assert options["authenticatorSelection"]["residentKey"] == "preferred"
    assert options["excludeCredentials"] == []
    assert options["timeout"] <= 300_000
    lifetime = enrolled.expires_at.ToDatetime() - fresh_clock.now().replace(tzinfo=None)
    assert lifetime.total_seconds() <= 300

    confirmed = await stub.Verify(pb.VerifyRequest(
        challenge_id=enrolled.challenge_id,
        webauthn_response=key.create(enrolled.webauthn_creation_options)))
    assert confirmed.result == pb.VERIFY_RESULT_APPROVED
    assert confirmed.factor.status == pb.FACTOR_STATUS_ACTIVE
    assert len(confirmed.recovery_codes) == 10  # the user's first factor
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    (passkey,) = [f for f in listed.factors if f.method == pb.METHOD_PASSKEY]
    assert passkey.status == pb.FACTOR_STATUS_ACTIVE
    assert passkey.masked_destination == "Passkey"  # a zero AAGUID names no model


async def test_list_factors_names_a_known_authenticator_model(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    _, confirmed = await enroll_passkey(stub, user_id, SoftAuthenticator(aaguid=ONE_PASSWORD))
    assert confirmed.factor.masked_destination == "1Password"
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    assert [f.masked_destination for f in listed.factors
            if f.method == pb.METHOD_PASSKEY] == ["1Password"]


async def test_login_with_a_passkey_opens_a_session_both_applications_honour(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    key = SoftAuthenticator()
    enrolled, _ = await enroll_passkey(stub, user_id, key)
    ch = await passkey_challenge(stub, user_id, enrolled.factor.factor_id)
    assert ch.method == pb.METHOD_PASSKEY and ch.channel == pb.CHANNEL_NONE
    request = json.loads(ch.webauthn_request_options)
    assert request["rpId"] == "localhost"
    assert request["userVerification"] == "required"
    assert [c["id"] for c in request["allowCredentials"]] == [
        bytes_to_base64url(key.credential_ids()[0])]
    ok = await stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, webauthn_response=key.get(ch.webauthn_request_options),
        user_id=user_id))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    assert ok.session.method == pb.METHOD_PASSKEY
    checked = await stub.CheckSession(pb.CheckSessionRequest(
        session_token=ok.session.session_token, application=pb.APPLICATION_BACKOFFICE))
    assert checked.valid and checked.user_id == user_id
    assert checked.method == pb.METHOD_PASSKEY


@pytest.mark.parametrize("attack", [
    "wrong_origin", "wrong_rp_id", "no_user_verification", "bad_signature",
    "other_challenge", "other_credential"])
async def test_a_bad_assertion_is_a_wrong_attempt(
        stub: Stub, user_id: str, fresh_clock: FixedClock, attack: str) -> None:
    key = SoftAuthenticator()
    enrolled, _ = await enroll_passkey(stub, user_id, key)
    factor_id = enrolled.factor.factor_id
    ch = await passkey_challenge(stub, user_id, factor_id)
    options = ch.webauthn_request_options
    if attack == "wrong_origin":  # a phishing page relaying the real challenge
        response = key.get(options, origin="https://portal.example.evil")
    elif attack == "wrong_rp_id":
        response = key.get(options, rp_id="evil.example")
    elif attack == "no_user_verification":
        response = key.get(options, user_verified=False)
    elif attack == "bad_signature":
        response = key.get(options, tamper_signature=True)
    elif attack == "other_challenge":
        other = await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=factor_id, purpose=pb.PURPOSE_DISABLE,
            application=pb.APPLICATION_PORTAL))
        response = key.get(other.webauthn_request_options)
    else:  # another authenticator's credential, even one the server knows
        stranger = SoftAuthenticator()
        await enroll_passkey(stub, f"{user_id}-x", stranger)
        response = stranger.get(options.replace(
            json.loads(options)["allowCredentials"][0]["id"],
            bytes_to_base64url(stranger.credential_ids()[0])))
    refused = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id,
                                                 webauthn_response=response))
    assert refused.result == pb.VERIFY_RESULT_INVALID_CODE
    assert refused.attempts_remaining == 4
    events = await stub.ListAuditEvents(pb.ListAuditEventsRequest(user_id=user_id))
    (failed,) = [e for e in events.events if e.event == "verify" and e.outcome == "failed"]
    assert failed.detail["refused"] in ("assertion_refused", "another_challenge",
                                        "other_credential")
    assert response not in str(failed.detail)
    assert not refused.HasField("session")
    # The genuine response still works on the same challenge (attempts remain).
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id,
                                            webauthn_response=key.get(options)))
    assert ok.result == pb.VERIFY_RESULT_APPROVED


async def test_wrong_passkey_responses_count_toward_the_users_lockout(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    key = SoftAuthenticator()
    enrolled, _ = await enroll_passkey(stub, user_id, key)
    ch = await passkey_challenge(stub, user_id, enrolled.factor.factor_id)
    results = [(await stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id,
        webauthn_response=key.get(ch.webauthn_request_options, user_verified=False)))).result
        for _ in range(5)]
    assert results[-1] == pb.VERIFY_RESULT_MAX_ATTEMPTS_REACHED
    with pytest.raises(aio.AioRpcError) as err:
        await passkey_challenge(stub, user_id, enrolled.factor.factor_id)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rich_error(err.value).reason == "ERROR_REASON_USER_LOCKED_OUT"


async def test_a_used_challenge_and_a_replayed_assertion_are_refused(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    key = SoftAuthenticator()
    enrolled, _ = await enroll_passkey(stub, user_id, key)
    ch = await passkey_challenge(stub, user_id, enrolled.factor.factor_id)
    response = key.get(ch.webauthn_request_options)
    first = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id,
                                               webauthn_response=response))
    assert first.result == pb.VERIFY_RESULT_APPROVED
    again = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id,
                                               webauthn_response=response))
    assert again.result == pb.VERIFY_RESULT_ALREADY_USED
    # The same signed assertion on a new challenge: it signed the old one.
    fresh = await passkey_challenge(stub, user_id, enrolled.factor.factor_id)
    replayed = await stub.Verify(pb.VerifyRequest(challenge_id=fresh.challenge_id,
                                                  webauthn_response=response))
    assert replayed.result == pb.VERIFY_RESULT_INVALID_CODE


async def test_a_sign_counter_going_backwards_is_refused_and_audited_as_a_clone(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    key = SoftAuthenticator()
    enrolled, _ = await enroll_passkey(stub, user_id, key)
    factor_id = enrolled.factor.factor_id
    for _ in range(2):
        ok = await passkey_login(stub, user_id, factor_id, key)
        assert ok.result == pb.VERIFY_RESULT_APPROVED
    key.counter = 1  # a copy of the key that signed fewer times than the original
    cloned = await passkey_login(stub, user_id, factor_id, key)
    assert cloned.result == pb.VERIFY_RESULT_INVALID_CODE
    events = await stub.ListAuditEvents(pb.ListAuditEventsRequest(user_id=user_id))
    alarms = [e for e in events.events if e.event == "security_alarm"]
    assert len(alarms) == 1
    assert alarms[0].detail["alarm"] == "passkey_counter_regressed"
    assert alarms[0].factor_id == factor_id
    assert int(alarms[0].detail["presented_counter"]) < int(alarms[0].detail["stored_counter"])
    # The original key, counting on, is still accepted.
    key.counter = 10
    assert (await passkey_login(stub, user_id, factor_id, key)).result == (
        pb.VERIFY_RESULT_APPROVED)


async def test_disabling_a_passkey_needs_that_passkey(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    key = SoftAuthenticator()
    enrolled, _ = await enroll_passkey(stub, user_id, key)
    factor_id = enrolled.factor.factor_id
    session = (await passkey_login(stub, user_id, factor_id, key)).session
    ch = await passkey_challenge(stub, user_id, factor_id, pb.PURPOSE_DISABLE)
    with pytest.raises(aio.AioRpcError) as err:  # a typed code is not a passkey's proof
        await stub.Disable(pb.DisableRequest(user_id=user_id, factor_id=factor_id,
                                             challenge_id=ch.challenge_id, code="123456"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "code" in rich_error(err.value).field_violations
    wrong = await stub.Disable(pb.DisableRequest(
        user_id=user_id, factor_id=factor_id, challenge_id=ch.challenge_id,
        webauthn_response=SoftAuthenticator().create(
            (await stub.Enroll(pb.EnrollRequest(
                user_id=f"{user_id}-y", method=pb.METHOD_PASSKEY,
                application=pb.APPLICATION_PORTAL))).webauthn_creation_options)))
    assert wrong.result == pb.VERIFY_RESULT_INVALID_CODE
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    assert [f.status for f in listed.factors if f.factor_id == factor_id] == [
        pb.FACTOR_STATUS_ACTIVE]
    done = await stub.Disable(pb.DisableRequest(
        user_id=user_id, factor_id=factor_id, challenge_id=ch.challenge_id,
        webauthn_response=key.get(ch.webauthn_request_options)))
    assert done.result == pb.VERIFY_RESULT_APPROVED
    assert done.factor.status == pb.FACTOR_STATUS_DISABLED
    # The sessions the passkey opened end with it.
    assert not (await stub.CheckSession(pb.CheckSessionRequest(
        session_token=session.session_token, application=pb.APPLICATION_PORTAL))).valid


async def test_adding_a_passkey_needs_a_recent_session_like_any_factor(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    app = await enroll_app(stub, user_id, fresh_clock)
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Enroll(pb.EnrollRequest(user_id=user_id, method=pb.METHOD_PASSKEY,
                                           application=pb.APPLICATION_PORTAL))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rich_error(err.value).reason == "ERROR_REASON_RECENT_SESSION_REQUIRED"
    session = await login(stub, app, fresh_clock)
    _, confirmed = await enroll_passkey(stub, user_id, SoftAuthenticator(),
                                        session.session_token)
    assert confirmed.result == pb.VERIFY_RESULT_APPROVED
    assert not confirmed.recovery_codes  # not the first factor


async def test_several_passkeys_and_the_same_authenticator_is_excluded(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    laptop, phone = SoftAuthenticator(), SoftAuthenticator()
    first, _ = await enroll_passkey(stub, user_id, laptop)
    session = (await passkey_login(stub, user_id, first.factor.factor_id, laptop)).session
    second = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_PASSKEY, application=pb.APPLICATION_PORTAL,
        session_token=session.session_token))
    excluded = json.loads(second.webauthn_creation_options)["excludeCredentials"]
    assert [c["id"] for c in excluded] == [bytes_to_base64url(laptop.credential_ids()[0])]
    with pytest.raises(CredentialExcluded):  # the laptop already holds one: it says so
        laptop.create(second.webauthn_creation_options)
    # A client that ignores excludeCredentials cannot register the same credential twice.
    twice = await stub.Verify(pb.VerifyRequest(
        challenge_id=second.challenge_id, webauthn_response=SoftAuthenticator().create(
            second.webauthn_creation_options, credential_id=laptop.credential_ids()[0])))
    assert twice.result == pb.VERIFY_RESULT_INVALID_CODE
    ok = await stub.Verify(pb.VerifyRequest(
        challenge_id=second.challenge_id,
        webauthn_response=phone.create(second.webauthn_creation_options)))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    assert [f.status for f in listed.factors if f.method == pb.METHOD_PASSKEY] == [
        pb.FACTOR_STATUS_ACTIVE, pb.FACTOR_STATUS_ACTIVE]
    # Each passkey answers only its own challenges.
    phone_id = ok.factor.factor_id
    assert (await passkey_login(stub, user_id, phone_id, phone)).result == (
        pb.VERIFY_RESULT_APPROVED)


async def test_a_pending_passkey_gets_a_new_confirmation_with_creation_options(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    enrolled = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_PASSKEY, application=pb.APPLICATION_PORTAL))
    again = await passkey_challenge(stub, user_id, enrolled.factor.factor_id,
                                    pb.PURPOSE_CONFIRM_ENROLLMENT)
    assert not again.webauthn_request_options
    assert json.loads(again.webauthn_creation_options)["user"]
    key = SoftAuthenticator()
    stale = await stub.Verify(pb.VerifyRequest(
        challenge_id=enrolled.challenge_id,
        webauthn_response=key.create(enrolled.webauthn_creation_options)))
    assert stale.result == pb.VERIFY_RESULT_ALREADY_USED  # superseded by the new one
    ok = await stub.Verify(pb.VerifyRequest(
        challenge_id=again.challenge_id,
        webauthn_response=SoftAuthenticator().create(again.webauthn_creation_options)))
    assert ok.result == pb.VERIFY_RESULT_APPROVED


async def test_a_retried_challenge_gets_the_same_browser_options(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    enrolled, _ = await enroll_passkey(stub, user_id, SoftAuthenticator())
    request = pb.ChallengeRequest(user_id=user_id, factor_id=enrolled.factor.factor_id,
                                  purpose=pb.PURPOSE_LOGIN, application=pb.APPLICATION_PORTAL,
                                  request_id="retry-1")
    first, again = await stub.Challenge(request), await stub.Challenge(request)
    assert first.challenge_id == again.challenge_id
    assert first.webauthn_request_options == again.webauthn_request_options


@pytest.mark.parametrize(("fields", "field"), [
    ({"webauthn_response": "not json"}, "webauthn_response"),
    ({"webauthn_response": '{"id": "x"}'}, "webauthn_response"),
    ({"code": "123456"}, "code"),
    ({"code": "123456", "webauthn_response": "{}"}, "webauthn_response"),
])
async def test_a_malformed_proof_is_invalid_argument_and_costs_no_attempt(
        stub: Stub, user_id: str, fresh_clock: FixedClock, fields: dict[str, Any],
        field: str) -> None:
    key = SoftAuthenticator()
    enrolled, _ = await enroll_passkey(stub, user_id, key)
    ch = await passkey_challenge(stub, user_id, enrolled.factor.factor_id)
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, **fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in rich_error(err.value).field_violations
    ok = await stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, webauthn_response=key.get(ch.webauthn_request_options)))
    # Only the approving attempt was counted (5 allowed, 4 left after it).
    assert ok.result == pb.VERIFY_RESULT_APPROVED and ok.attempts_remaining == 4


async def test_a_webauthn_response_on_a_code_challenge_is_invalid_argument(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    app = await enroll_app(stub, user_id, fresh_clock)
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=app.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id,
                                           webauthn_response='{"id": "x"}'))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "webauthn_response" in rich_error(err.value).field_violations


# -- configuration -----------------------------------------------------------------------------


