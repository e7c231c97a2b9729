"""The proof model (service/policy.py, docs/SECURITY.md): the table itself, then one test
per row against the real gRPC server (SQLite and PostgreSQL): allowed with the right
evidence, refused with each weaker kind. Both holes the model closed are here as plain
reproductions: a password alone finishing the user's cancelled passkey with the
attacker's own key, and a stolen fresh session minting recovery codes that then disable
every factor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb

from mfa_service.clock import FixedClock
from tests.support.client import AppFactor, enroll_app, login, regenerate_proof, rich_error, totp_at
from tests.support.rig import Rig, code_in, enroll_email, eventually, has_code, step_up
from tests.support.softauthn import SoftAuthenticator

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

HOLD = 24 * 3600
PORTAL = pb.APPLICATION_PORTAL


# -- the table ------------------------------------------------------------------------------


# -- through the server ------------------------------------------------------------------------
async def refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(aio.AioRpcError) as err:
        await call
    e = rich_error(err.value)
    return e.code, e.reason


STEP_UP = (grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_RECENT_SESSION_REQUIRED")
TOO_NEW = (grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_CREDENTIAL_TOO_NEW")


async def statuses(stub: Stub, user_id: str) -> dict[str, int]:
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    return {f.factor_id: f.status for f in listed.factors}


async def add_app(stub: Stub, user_id: str, session: str, clock: FixedClock) -> AppFactor:
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=PORTAL,
        session_token=session))
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id,
                                            code=totp_at(resp.totp_secret, clock)))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    clock.advance(30)
    return AppFactor(resp.factor.factor_id, resp.totp_secret, user_id)


async def add_passkey(stub: Stub, user_id: str, session: str, key: SoftAuthenticator) -> str:
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_PASSKEY, application=PORTAL, session_token=session))
    ok = await stub.Verify(pb.VerifyRequest(
        challenge_id=resp.challenge_id,
        webauthn_response=key.create(resp.webauthn_creation_options)))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    return resp.factor.factor_id


async def test_adding_a_factor_needs_a_fresh_session(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    first = await enroll_app(stub, user_id, fresh_clock)
    enroll = pb.EnrollRequest(user_id=user_id, method=pb.METHOD_PASSKEY, application=PORTAL)
    assert await refused(stub.Enroll(enroll)) == STEP_UP  # the password step alone
    session = await login(stub, first, fresh_clock)
    fresh_clock.advance(10 * 60 + 1)  # a session, no longer fresh
    enroll.session_token = session.session_token
    assert await refused(stub.Enroll(enroll)) == STEP_UP
    enroll.session_token = (await login(stub, first, fresh_clock)).session_token
    assert (await stub.Enroll(enroll)).factor.status == pb.FACTOR_STATUS_PENDING


async def test_a_password_alone_cannot_finish_a_cancelled_passkey(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """The HIGH finding: the user starts a passkey with a fresh session and cancels the
    browser dialog; with the password alone, Challenge(CONFIRM_ENROLLMENT) on the PENDING
    factor gave fresh creation options, and Verify registered the attacker's key."""
    first = await enroll_app(stub, user_id, fresh_clock)
    session = await login(stub, first, fresh_clock)
    started = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_PASSKEY, application=PORTAL,
        session_token=session.session_token))  # ... and the user cancels
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    [pending] = [f for f in listed.factors if f.status == pb.FACTOR_STATUS_PENDING]
    again = pb.ChallengeRequest(user_id=user_id, factor_id=pending.factor_id,
                                purpose=pb.PURPOSE_CONFIRM_ENROLLMENT, application=PORTAL)
    assert await refused(stub.Challenge(again)) == STEP_UP
    again.application = pb.APPLICATION_BACKOFFICE
    assert await refused(stub.Challenge(again)) == STEP_UP
    # The user's own fresh session may ask again, and the user's key finishes it.
    again.application, again.session_token = PORTAL, session.session_token
    options = await stub.Challenge(again)
    assert options.webauthn_creation_options
    ok = await stub.Verify(pb.VerifyRequest(
        challenge_id=options.challenge_id,
        webauthn_response=SoftAuthenticator().create(options.webauthn_creation_options)))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    assert (await statuses(stub, user_id))[started.factor.factor_id] == pb.FACTOR_STATUS_ACTIVE


async def test_confirming_needs_the_enrolling_session_still_live(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    first = await enroll_app(stub, user_id, fresh_clock)
    session = await login(stub, first, fresh_clock)
    second = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_PASSKEY, application=PORTAL,
        session_token=session.session_token))
    await stub.RevokeSession(pb.RevokeSessionRequest(session_token=session.session_token))
    code, reason = await refused(stub.Verify(pb.VerifyRequest(
        challenge_id=second.challenge_id,
        webauthn_response=SoftAuthenticator().create(second.webauthn_creation_options))))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                              "ERROR_REASON_ENROLLING_SESSION_ENDED")
    assert (await statuses(stub, user_id))[second.factor.factor_id] == (
        pb.FACTOR_STATUS_PENDING)


async def test_a_pending_factor_is_gone_after_its_ttl(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    first = await enroll_app(stub, user_id, fresh_clock)
    session = await login(stub, first, fresh_clock)
    left = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_PASSKEY, application=PORTAL,
        session_token=session.session_token))
    assert left.factor.factor_id in await statuses(stub, user_id)
    fresh_clock.advance(15 * 60)
    assert left.factor.factor_id not in await statuses(stub, user_id)
    code, reason = await refused(stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=left.factor.factor_id,
        purpose=pb.PURPOSE_CONFIRM_ENROLLMENT, application=PORTAL,
        session_token=(await login(stub, first, fresh_clock)).session_token)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ERROR_REASON_FACTOR_NOT_FOUND")
    late = await stub.Verify(pb.VerifyRequest(
        challenge_id=left.challenge_id,
        webauthn_response=SoftAuthenticator().create(left.webauthn_creation_options)))
    assert late.result == pb.VERIFY_RESULT_EXPIRED


async def test_disabling_needs_that_factor_or_established_recovery_codes(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    first = await enroll_app(stub, user_id, fresh_clock)
    key = SoftAuthenticator()
    passkey_id = await add_passkey(
        stub, user_id, (await login(stub, first, fresh_clock)).session_token, key)
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    [recovery_id] = [f.factor_id for f in listed.factors
                     if f.method == pb.METHOD_RECOVERY_CODE]
    # A proof with another factor, established or new, never disables this one.
    for prover, target in ((first.factor_id, passkey_id), (passkey_id, first.factor_id)):
        ch = await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=prover, purpose=pb.PURPOSE_DISABLE,
            application=PORTAL))
        proof = (totp_at(first.secret, fresh_clock) if prover == first.factor_id else "")
        request = pb.DisableRequest(user_id=user_id, factor_id=target,
                                    challenge_id=ch.challenge_id, code=proof)
        if not proof:
            request.webauthn_response = key.get(ch.webauthn_request_options)
        assert await refused(stub.Disable(request)) == (
            grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_CHALLENGE_MISMATCH")
    # Codes regenerated now are new: they log in, but disable nothing for a day.
    proof_id = await regenerate_proof(stub, first, fresh_clock)
    codes = list((await stub.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(
        user_id=user_id, proof_challenge_id=proof_id, application=PORTAL))).recovery_codes)
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=recovery_id, purpose=pb.PURPOSE_DISABLE,
        application=PORTAL))
    disable = pb.DisableRequest(user_id=user_id, factor_id=passkey_id,
                                challenge_id=ch.challenge_id, code=codes[0])
    code, reason = await refused(stub.Disable(disable))
    assert (code, reason) == TOO_NEW
    fresh_clock.advance(HOLD)
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=recovery_id, purpose=pb.PURPOSE_DISABLE,
        application=PORTAL))
    disable.challenge_id = ch.challenge_id
    assert (await stub.Disable(disable)).result == pb.VERIFY_RESULT_APPROVED
    assert (await statuses(stub, user_id))[passkey_id] == pb.FACTOR_STATUS_DISABLED


async def test_regenerating_codes_needs_a_proof_with_an_established_factor(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    first = await enroll_app(stub, user_id, fresh_clock)
    session = await login(stub, first, fresh_clock)
    added = await add_app_like_second_factor(stub, user_id, session.session_token,
                                             fresh_clock)
    # The new factor cannot prove it (refused before any code is asked for) ...
    code, reason = await refused(stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=added, purpose=pb.PURPOSE_REGENERATE_RECOVERY_CODES,
        application=PORTAL)))
    assert (code, reason) == TOO_NEW
    # ... nor recovery codes, nor a session alone; the established first factor can.
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    [recovery_id] = [f.factor_id for f in listed.factors
                     if f.method == pb.METHOD_RECOVERY_CODE]
    code, _ = await refused(stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=recovery_id, purpose=pb.PURPOSE_REGENERATE_RECOVERY_CODES,
        application=PORTAL)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert await refused(stub.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(
        user_id=user_id, session_token=session.session_token, application=PORTAL))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_PROOF_REQUIRED")
    proof = await regenerate_proof(stub, first, fresh_clock)
    codes = await stub.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(
        user_id=user_id, proof_challenge_id=proof, application=PORTAL))
    assert len(codes.recovery_codes) == 10
    # The first factor is established at once, the added one a day later.
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    established = {f.factor_id: f.established_at.ToDatetime() for f in listed.factors}
    assert established[first.factor_id] <= fresh_clock.now().replace(tzinfo=None)
    assert established[added] > fresh_clock.now().replace(tzinfo=None)


async def add_app_like_second_factor(stub: Stub, user_id: str, session: str,
                                     clock: FixedClock) -> str:
    """A second factor (a passkey: one app per user) added with ``session``."""
    del clock
    return await add_passkey(stub, user_id, session, SoftAuthenticator())


async def test_a_stolen_fresh_session_adds_a_factor_that_removes_nothing(
        rig: Rig, user_id: str) -> None:
    """The MEDIUM finding, played with real SMTP: a stolen fresh session regenerated
    recovery codes and disabled every factor with them; now the attacker's app (allowed:
    that is step-up) can neither disable nor replace the user's factors within the hold,
    itself or through codes, and the user's email is told of it."""
    stub, clock = rig.stub, rig.clock
    email_id, address = await enroll_email(rig, user_id)
    stolen = await step_up(rig, user_id)
    attacker = await add_app(stub, user_id, stolen, clock)
    notices = await eventually(lambda: [m for m in rig.mails_to(address, notices=True)
                                        if not has_code(m.get_content())])
    assert any("added" in m.get_content().lower() for m in notices)
    assert (await statuses(stub, user_id))[email_id] == pb.FACTOR_STATUS_ACTIVE
    own = await login(stub, attacker, clock)  # the attacker's own fresh session
    for session in (stolen, own.session_token):
        assert await refused(stub.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(
            user_id=user_id, session_token=session, application=PORTAL))) == (
            grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_PROOF_REQUIRED")
    assert await refused(stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=attacker.factor_id,
        purpose=pb.PURPOSE_REGENERATE_RECOVERY_CODES, application=PORTAL))) == TOO_NEW
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=attacker.factor_id, purpose=pb.PURPOSE_DISABLE,
        application=PORTAL))
    assert await refused(stub.Disable(pb.DisableRequest(
        user_id=user_id, factor_id=email_id, challenge_id=ch.challenge_id,
        code=totp_at(attacker.secret, clock)))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_CHALLENGE_MISMATCH")
    # Replacing the email: one ACTIVE email per user, and a phone change needs the old one.
    assert (await refused(stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_EMAIL, email="thief@example.com",
        application=PORTAL, session_token=own.session_token))))[1] == (
        "ERROR_REASON_ALREADY_ENROLLED")
    clock.advance(HOLD - 3600)  # still inside the hold
    assert await refused(stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=attacker.factor_id,
        purpose=pb.PURPOSE_REGENERATE_RECOVERY_CODES, application=PORTAL))) == TOO_NEW
    assert (await statuses(stub, user_id))[email_id] == pb.FACTOR_STATUS_ACTIVE
    # The user, told by mail, removes the attacker's app with their email.
    before = len(rig.mails_to(address))
    off = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=email_id, purpose=pb.PURPOSE_DISABLE, application=PORTAL))
    mail = (await eventually(lambda: rig.mails_to(address)[before:]))[-1]
    code_sent = code_in(mail.get_content())
    assert await refused(stub.Disable(pb.DisableRequest(
        user_id=user_id, factor_id=attacker.factor_id, challenge_id=off.challenge_id,
        code=code_sent))) == (grpc.StatusCode.FAILED_PRECONDITION,
                              "ERROR_REASON_CHALLENGE_MISMATCH")
    # (Disabling needs the enabled method: the app is removed by its own code, or by an
    # established recovery code; the user's first codes are established.)
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    [recovery_id] = [f.factor_id for f in listed.factors
                     if f.method == pb.METHOD_RECOVERY_CODE]
    rc = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=recovery_id, purpose=pb.PURPOSE_DISABLE,
        application=PORTAL))
    done = await stub.Disable(pb.DisableRequest(
        user_id=user_id, factor_id=attacker.factor_id, challenge_id=rc.challenge_id,
        code=rig.recovery_codes[user_id][0], account_email=address))
    assert done.result == pb.VERIFY_RESULT_APPROVED


async def test_account_email_hears_of_changes_to_a_user_with_only_an_app(
        rig: Rig, user_id: str) -> None:
    stub, clock = rig.stub, rig.clock
    first = await enroll_app(stub, user_id, clock)
    account = f"account-{user_id}@example.com"
    session = await login(stub, first, clock)
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_PASSKEY, application=PORTAL,
        session_token=session.session_token))
    await stub.Verify(pb.VerifyRequest(
        challenge_id=resp.challenge_id, account_email=account,
        webauthn_response=SoftAuthenticator().create(resp.webauthn_creation_options)))
    mails = await eventually(lambda: rig.mails_to(account, notices=True))
    assert "added" in mails[0].get_content().lower()
    assert not has_code(mails[0].get_content())
    code, _ = await refused(stub.Verify(pb.VerifyRequest(
        challenge_id=resp.challenge_id, code="123456", account_email="not an address")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_confirming_the_first_factor_may_open_the_session_and_only_the_first(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=PORTAL))
    ok = await stub.Verify(pb.VerifyRequest(
        challenge_id=resp.challenge_id, code=totp_at(resp.totp_secret, fresh_clock),
        open_session=True))
    assert ok.result == pb.VERIFY_RESULT_APPROVED and ok.recovery_codes
    check = await stub.CheckSession(pb.CheckSessionRequest(
        session_token=ok.session.session_token, application=pb.APPLICATION_BACKOFFICE))
    assert check.valid and check.user_id == user_id
    assert check.method == pb.METHOD_AUTHENTICATOR_APP
    # A later factor keeps the normal flow: no session from its confirmation.
    fresh_clock.advance(30)
    added = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_PASSKEY, application=PORTAL,
        session_token=ok.session.session_token))
    confirmed = await stub.Verify(pb.VerifyRequest(
        challenge_id=added.challenge_id, open_session=True,
        webauthn_response=SoftAuthenticator().create(added.webauthn_creation_options)))
    assert confirmed.result == pb.VERIFY_RESULT_APPROVED
    assert not confirmed.HasField("session")
