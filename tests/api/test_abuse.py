"""Issue #7: the step-up hole and the abuse paths, each attacked from outside through the
generated client, on SQLite and PostgreSQL (real SMTP and HTTP receivers where codes
travel). Every test here failed on the code before the fix."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import phonenumbers
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from phonenumbers import PhoneNumberType
from sqlalchemy import func, select

from mfa_service.app import App, create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.store.models import factors, outbox
from tests.support.client import AppFactor, enroll_app, login, rich_error, totp_at
from tests.support.config import TEST_KEYRING, make_settings
from tests.support.rig import (
    Rig,
    code_in,
    delivered_all,
    enroll_email,
    enroll_phone,
    eventually,
    has_code,
    phone_text,
    step_up,
    unique_phone,
)

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub


async def refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(aio.AioRpcError) as err:
        await call
    e = rich_error(err.value)
    return e.code, e.reason


STEP_UP = (grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_RECENT_SESSION_REQUIRED")


def wrong(code: str) -> str:
    return f"{(int(code) + 500_000) % 1_000_000:06d}"


# -- the hole: adding a factor needs the factor you have ---------------------------------------
async def test_an_app_cannot_be_added_to_a_phone_user_without_the_phone(
        rig: Rig, user_id: str) -> None:
    """The attack of issue #7, refused at its first step: with only the password step
    done, Enroll(app) for a user whose only factor is their phone."""
    await enroll_phone(rig, user_id)
    stub = rig.stub

    def add(method: pb.Method.ValueType, token: str = "") -> Awaitable[pb.EnrollResponse]:
        extra: dict[str, Any] = {"email": f"{user_id}@example.com"} if method == pb.METHOD_EMAIL \
            else {"phone_number": unique_phone()} if method == pb.METHOD_PHONE else {}
        return stub.Enroll(pb.EnrollRequest(user_id=user_id, method=method,
                                            application=pb.APPLICATION_PORTAL,
                                            session_token=token, **extra))

    for method in (pb.METHOD_AUTHENTICATOR_APP, pb.METHOD_EMAIL, pb.METHOD_PHONE):
        assert await refused(add(method)) == STEP_UP
    # Another user's fresh session, a made-up token, a revoked one, a stale one: all refused.
    other = f"{user_id}-other"
    await enroll_phone(rig, other)
    assert await refused(add(pb.METHOD_AUTHENTICATOR_APP, await step_up(rig, other))) == STEP_UP
    assert await refused(add(pb.METHOD_AUTHENTICATOR_APP, "not-a-session")) == STEP_UP
    revoked = await step_up(rig, user_id)
    await stub.RevokeSession(pb.RevokeSessionRequest(session_token=revoked))
    assert await refused(add(pb.METHOD_AUTHENTICATOR_APP, revoked)) == STEP_UP
    stale = await step_up(rig, user_id)
    rig.clock.advance(10 * 60 + 1)
    assert (await stub.CheckSession(pb.CheckSessionRequest(
        session_token=stale, application=pb.APPLICATION_PORTAL))).valid  # live, but stale
    assert await refused(add(pb.METHOD_AUTHENTICATOR_APP, stale)) == STEP_UP
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    assert sorted(f.method for f in listed.factors) == [pb.METHOD_PHONE, pb.METHOD_RECOVERY_CODE]

    # With the phone passed a moment ago, the user adds the app.
    added = await add(pb.METHOD_AUTHENTICATOR_APP, await step_up(rig, user_id))
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=added.challenge_id,
                                            code=totp_at(added.totp_secret, rig.clock)))
    assert ok.result == pb.VERIFY_RESULT_APPROVED


async def test_a_pending_factor_from_before_the_first_one_never_becomes_a_second(
        rig: Rig, user_id: str) -> None:
    """The sibling path: an app enrolled while the user had no factor (no session
    needed then) and confirmed after the user's phone became active."""
    early = await rig.stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL))
    await enroll_phone(rig, user_id)
    code, _ = await refused(rig.stub.Verify(pb.VerifyRequest(
        challenge_id=early.challenge_id, code=totp_at(early.totp_secret, rig.clock))))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = await refused(rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=early.factor.factor_id,
        purpose=pb.PURPOSE_CONFIRM_ENROLLMENT, application=pb.APPLICATION_PORTAL)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    listed = await rig.stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    status = {f.factor_id: f.status for f in listed.factors}
    assert status[early.factor.factor_id] == pb.FACTOR_STATUS_DISABLED


async def test_added_factor_and_new_recovery_codes_are_told_to_the_phone(
        rig: Rig, user_id: str) -> None:
    phone_id, number = await enroll_phone(rig, user_id)

    def notices() -> list[str]:
        return [phone_text(r) for r in rig.calls_to(number, notices=True)
                if not has_code(phone_text(r))]

    await delivered_all(rig, user_id)
    assert notices() == []  # the phone proved itself: no notice to itself
    added = await rig.stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL,
        session_token=await step_up(rig, user_id)))
    await rig.stub.Verify(pb.VerifyRequest(challenge_id=added.challenge_id,
                                           code=totp_at(added.totp_secret, rig.clock)))
    await eventually(lambda: len(notices()) == 1)
    assert "added" in notices()[0].lower()
    rig.clock.advance(30)
    # New codes need a proof with an established factor: the phone (the first factor).
    sent = len(rig.calls_to(number))
    proof = await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=phone_id, purpose=pb.PURPOSE_REGENERATE_RECOVERY_CODES,
        application=pb.APPLICATION_PORTAL))
    sms = (await eventually(lambda: rig.calls_to(number)[sent:]))[0]
    ok = await rig.stub.Verify(pb.VerifyRequest(challenge_id=proof.challenge_id,
                                                code=code_in(phone_text(sms))))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    await rig.stub.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(
        user_id=user_id, proof_challenge_id=proof.challenge_id,
        application=pb.APPLICATION_PORTAL))
    await eventually(lambda: len(notices()) == 2)
    assert "recovery codes" in notices()[1].lower()


# -- 1. parallel Enroll ------------------------------------------------------------------------
async def codes_queued(app: App, *, user_id: str | None = None,
                       destination: str | None = None) -> int:
    query = select(func.count()).select_from(outbox).where(outbox.c.kind == "code")
    if user_id is not None:
        query = query.where(outbox.c.user_id == user_id)
    if destination is not None:
        query = query.where(outbox.c.destination == destination)
    async with app.database.engine.connect() as conn:
        return int(await conn.scalar(query) or 0)


async def pending_factors(app: App, user_id: str) -> int:
    async with app.database.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(factors).where(
            factors.c.user_id == user_id, factors.c.status == "pending")) or 0)


@pytest.fixture
async def no_cooldown(database_url: str, fresh_clock: FixedClock) -> AsyncIterator[App]:
    """A server without the resend cooldown, so only the window limits stand in the way."""
    app = await create_server(make_settings(database_url, resend_cooldown_seconds=0),
                              clock=fresh_clock, keyring=Keyring.parse(TEST_KEYRING))
    yield app
    await app.stop(0)


async def outcomes(calls: Sequence[Awaitable[Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for result in await asyncio.gather(*calls, return_exceptions=True):
        key = "ok" if not isinstance(result, BaseException) else rich_error(result).reason \
            if isinstance(result, aio.AioRpcError) else repr(result)
        counts[key] = counts.get(key, 0) + 1
    return counts


async def test_parallel_enrolments_send_one_code_within_the_cooldown(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    got = await outcomes([stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_EMAIL, email=f"{user_id}-{i}@example.com",
        application=pb.APPLICATION_PORTAL)) for i in range(12)])
    assert got == {"ok": 1, "ERROR_REASON_RESEND_COOLDOWN": 11}
    assert await codes_queued(app, user_id=user_id) == 1
    assert await pending_factors(app, user_id) == 1


async def test_parallel_enrolments_stop_at_the_send_limit(
        no_cooldown: App, user_id: str) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{no_cooldown.port}") as channel:
        stub: Stub = pb_grpc.TwoFactorServiceStub(channel)
        got = await outcomes([stub.Enroll(pb.EnrollRequest(
            user_id=user_id, method=pb.METHOD_EMAIL, email=f"{user_id}-{i}@example.com",
            application=pb.APPLICATION_PORTAL)) for i in range(12)])
    assert got == {"ok": 10, "ERROR_REASON_SEND_RATE_LIMITED": 2}
    assert await codes_queued(no_cooldown, user_id=user_id) == 10
    assert await pending_factors(no_cooldown, user_id) == 1  # one PENDING per method


# -- 3. SMS pumping and toll fraud ---------------------------------------------------------------
async def test_one_number_gets_five_codes_whichever_users_ask(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    number = unique_phone()
    enrol = [stub.Enroll(pb.EnrollRequest(
        user_id=f"{user_id}-{i}", method=pb.METHOD_PHONE, phone_number=number,
        channel=pb.CHANNEL_VOICE, application=pb.APPLICATION_PORTAL)) for i in range(20)]
    assert await outcomes(enrol) == {"ok": 5, "ERROR_REASON_DESTINATION_RATE_LIMITED": 15}
    assert await codes_queued(app, destination=number) == 5
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Enroll(pb.EnrollRequest(user_id=f"{user_id}-late", method=pb.METHOD_PHONE,
                                           phone_number=number,
                                           application=pb.APPLICATION_PORTAL))
    e = rich_error(err.value)
    assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.retry_seconds is not None and 0 < e.retry_seconds <= 600
    fresh_clock.advance(10 * 60 + 1)  # the window has passed
    await stub.Enroll(pb.EnrollRequest(user_id=f"{user_id}-late", method=pb.METHOD_PHONE,
                                       phone_number=number, application=pb.APPLICATION_PORTAL))


async def test_one_address_in_any_letter_case_counts_as_one(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    local = f"flood-{user_id}"
    for i in range(5):
        address = (local.upper() if i % 2 else local) + "@Example.COM"
        await stub.Enroll(pb.EnrollRequest(user_id=f"{user_id}-{i}", method=pb.METHOD_EMAIL,
                                           email=address, application=pb.APPLICATION_PORTAL))
    assert await refused(stub.Enroll(pb.EnrollRequest(
        user_id=f"{user_id}-x", method=pb.METHOD_EMAIL, email=f"{local}@example.com",
        application=pb.APPLICATION_PORTAL))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "ERROR_REASON_DESTINATION_RATE_LIMITED")


@pytest.mark.parametrize("kind", [
    PhoneNumberType.PREMIUM_RATE, PhoneNumberType.SHARED_COST, PhoneNumberType.UAN,
    PhoneNumberType.PERSONAL_NUMBER, PhoneNumberType.TOLL_FREE])
async def test_costly_number_types_are_refused(
        stub: Stub, user_id: str, kind: int) -> None:
    example = next(n for region in sorted(phonenumbers.SUPPORTED_REGIONS)
                   if (n := phonenumbers.example_number_for_type(region, kind)) is not None)
    number = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Enroll(pb.EnrollRequest(user_id=user_id, method=pb.METHOD_PHONE,
                                           phone_number=number,
                                           application=pb.APPLICATION_PORTAL))
    e = rich_error(err.value)
    assert (e.code, set(e.field_violations)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                {"phone_number"})


async def test_premium_rate_numbers_of_the_review_are_refused(stub: Stub, user_id: str) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Enroll(pb.EnrollRequest(user_id=user_id, method=pb.METHOD_PHONE,
                                           phone_number="+449012345678",
                                           application=pb.APPLICATION_PORTAL))
    assert rich_error(err.value).field_violations.keys() == {"phone_number"}


async def test_enroll_obeys_the_cooldown(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    def enrol(i: int) -> Awaitable[pb.EnrollResponse]:
        return stub.Enroll(pb.EnrollRequest(user_id=user_id, method=pb.METHOD_EMAIL,
                                            email=f"{user_id}-{i}@example.com",
                                            application=pb.APPLICATION_PORTAL))
    await enrol(1)
    fresh_clock.advance(10)
    with pytest.raises(aio.AioRpcError) as err:
        await enrol(2)
    e = rich_error(err.value)
    assert (e.reason, e.retry_seconds) == ("ERROR_REASON_RESEND_COOLDOWN", 20)
    fresh_clock.advance(21)
    await enrol(3)


async def test_enroll_obeys_the_lockout(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    session = await login(stub, factor, fresh_clock)
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    for _ in range(5):
        await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id,
                                           code=wrong(totp_at(factor.secret, fresh_clock))))
    assert await refused(stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_EMAIL, email=f"{user_id}@example.com",
        application=pb.APPLICATION_PORTAL, session_token=session.session_token))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "ERROR_REASON_USER_LOCKED_OUT")


# -- 4. the cooldown is against resends ------------------------------------------------------------
async def test_after_an_approval_the_next_code_goes_at_once(rig: Rig, user_id: str) -> None:
    address = f"{user_id}@example.com"
    resp = await rig.stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_EMAIL, email=address,
        application=pb.APPLICATION_PORTAL))
    mail = (await eventually(lambda: rig.mails_to(address)))[-1]
    await rig.stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id,
                                           code=code_in(mail.get_content())))
    # Confirmed a second ago: logging in sends a code at once...
    login_ch = await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=resp.factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    # ...but asking again while that code is still open is a resend: 30 s.
    assert await refused(rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=resp.factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "ERROR_REASON_RESEND_COOLDOWN")
    mail = (await eventually(lambda: rig.mails_to(address)[1:]))[-1]
    ok = await rig.stub.Verify(pb.VerifyRequest(challenge_id=login_ch.challenge_id,
                                                code=code_in(mail.get_content())))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    # Logged in a second ago: turning the factor off sends its code at once too.
    await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=resp.factor.factor_id, purpose=pb.PURPOSE_DISABLE,
        application=pb.APPLICATION_PORTAL))


# -- 5. lockout as a weapon --------------------------------------------------------------------
async def test_a_hundred_wrong_codes_leave_the_user_their_recovery_codes(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL))
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id,
                                            code=totp_at(resp.totp_secret, fresh_clock)))
    fresh_clock.advance(30)
    factor = AppFactor(resp.factor.factor_id, resp.totp_secret, user_id)
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    [recovery_id] = [f.factor_id for f in listed.factors if f.method == pb.METHOD_RECOVERY_CODE]
    for _ in range(20):  # what anyone who can open challenges for the user can do
        ch = await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_PORTAL))
        for _ in range(5):
            await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id,
                                               code=wrong(totp_at(factor.secret, fresh_clock))))
        fresh_clock.advance(16 * 60)  # past the longest temporary wait
    admin = (grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_ADMIN_RESET_REQUIRED")
    assert await refused(stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))) == admin
    # The user is not locked out for good: a recovery code still logs in, and clears it.
    rc = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=recovery_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    passed = await stub.Verify(pb.VerifyRequest(challenge_id=rc.challenge_id,
                                                code=ok.recovery_codes[0]))
    assert passed.result == pb.VERIFY_RESULT_APPROVED
    assert passed.session.session_token
    await login(stub, factor, fresh_clock)  # the app works again


# -- 6. sessions end with their factor -------------------------------------------------------------
async def test_disabling_a_factor_ends_the_sessions_it_created(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    portal = await login(stub, factor, fresh_clock)
    backoffice = await login(stub, factor, fresh_clock, pb.APPLICATION_BACKOFFICE)
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_DISABLE,
        application=pb.APPLICATION_PORTAL))
    done = await stub.Disable(pb.DisableRequest(
        user_id=user_id, factor_id=factor.factor_id, challenge_id=ch.challenge_id,
        code=totp_at(factor.secret, fresh_clock)))
    assert done.result == pb.VERIFY_RESULT_APPROVED
    for session in (portal, backoffice):
        assert not (await stub.CheckSession(pb.CheckSessionRequest(
            session_token=session.session_token, application=pb.APPLICATION_PORTAL))).valid
    events = await stub.ListAuditEvents(pb.ListAuditEventsRequest(user_id=user_id))
    ended = [e for e in events.events if e.event == "session_revoked"]
    assert len(ended) == 2
    assert {e.detail["scope"] for e in ended} == {"factor_removed"}


async def test_a_phone_change_ends_the_old_numbers_sessions(rig: Rig, user_id: str) -> None:
    old_id, old_number = await enroll_phone(rig, user_id)
    old_session = await step_up(rig, user_id)  # passed with the old number
    proof = await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=old_id, purpose=pb.PURPOSE_CHANGE_PHONE,
        application=pb.APPLICATION_PORTAL))
    sms = (await eventually(lambda: [r for r in rig.calls_to(old_number)
                                     if "change" in phone_text(r).lower()]))[-1]
    await rig.stub.Verify(pb.VerifyRequest(challenge_id=proof.challenge_id,
                                           code=code_in(phone_text(sms))))
    await enroll_phone(rig, user_id, unique_phone(), proof=proof.challenge_id)
    assert not (await rig.stub.CheckSession(pb.CheckSessionRequest(
        session_token=old_session, application=pb.APPLICATION_PORTAL))).valid


# -- 7. production refuses plaintext delivery ----------------------------------------------------


# -- 8. INTERNAL from caller input -------------------------------------------------------------
def page_token(value: int) -> str:
    return base64.urlsafe_b64encode(str(value).encode()).decode()


@pytest.mark.parametrize(("fields", "bad"), [
    ({"page_token": page_token(2**63)}, "page_token"),
    ({"page_token": page_token(10**30)}, "page_token"),
    ({"page_token": page_token(-5)}, "page_token"),
    ({"start_time": Timestamp(seconds=2**40)}, "start_time"),
    ({"start_time": Timestamp(seconds=-(2**40))}, "start_time"),
    ({"end_time": Timestamp(seconds=2**62)}, "end_time"),
])
async def test_audit_paging_out_of_range_is_invalid_argument(
        stub: Stub, user_id: str, fields: dict[str, Any], bad: str) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await stub.ListAuditEvents(pb.ListAuditEventsRequest(user_id=user_id, **fields))
    e = rich_error(err.value)
    assert (e.code, set(e.field_violations)) == (grpc.StatusCode.INVALID_ARGUMENT, {bad})


# -- 9. deadlock ----------------------------------------------------------------------------------
async def test_challenge_and_verify_racing_on_one_factor_never_abort(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """A Verify and a Challenge that supersedes its challenge, sent together, 25 times.
    Whichever takes the user's lock first wins, and neither aborts: either the Verify is
    APPROVED (a session the backoffice honours), or it finds its challenge superseded
    (ALREADY_USED) and the code, not spent, approves the new challenge. Every round ends
    in exactly one login."""
    factor = await enroll_app(stub, user_id, fresh_clock)
    results = []
    for _ in range(25):
        ch = await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_PORTAL))
        code = totp_at(factor.secret, fresh_clock)
        verify, newer = await asyncio.gather(
            stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=code)),
            stub.Challenge(pb.ChallengeRequest(  # supersedes the one being verified
                user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
                application=pb.APPLICATION_PORTAL)))
        results.append(verify.result)
        assert verify.result in (pb.VERIFY_RESULT_APPROVED, pb.VERIFY_RESULT_ALREADY_USED)
        if verify.result == pb.VERIFY_RESULT_ALREADY_USED:
            verify = await stub.Verify(pb.VerifyRequest(challenge_id=newer.challenge_id,
                                                        code=code))
        assert verify.result == pb.VERIFY_RESULT_APPROVED, pb.VerifyResult.Name(verify.result)
        check = await stub.CheckSession(pb.CheckSessionRequest(
            session_token=verify.session.session_token,
            application=pb.APPLICATION_BACKOFFICE))
        assert check.valid and check.user_id == user_id
        fresh_clock.advance(30)
    print("first Verify of each round:", {pb.VerifyResult.Name(r): results.count(r)
                                          for r in set(results)})


# -- 10. hardening -----------------------------------------------------------------------------


async def test_verify_bound_to_another_user_is_not_found(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    code = totp_at(factor.secret, fresh_clock)
    assert await refused(stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, code=code, user_id=f"{user_id}-other"))) == (
        grpc.StatusCode.NOT_FOUND, "ERROR_REASON_CHALLENGE_NOT_FOUND")
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=code,
                                            user_id=user_id))
    assert (ok.result, ok.attempts_remaining) == (pb.VERIFY_RESULT_APPROVED, 4)


async def test_enrol_email_for_a_phone_user_through_the_rig_helpers(
        rig: Rig, user_id: str) -> None:
    """The helpers that every delivery test uses step up before adding a factor."""
    await enroll_phone(rig, user_id)
    await enroll_email(rig, user_id)
    listed = await rig.stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    assert sorted(f.method for f in listed.factors if f.status == pb.FACTOR_STATUS_ACTIVE) == [
        pb.METHOD_EMAIL, pb.METHOD_PHONE, pb.METHOD_RECOVERY_CODE]
