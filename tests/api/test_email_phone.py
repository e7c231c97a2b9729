"""Email, SMS and voice codes end to end: the generated client against an in-process
server whose messages go through the outbox to a real SMTP server (aiosmtpd) and a real
local HTTP server (webhook and Twilio shapes). On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy import select

from mfa_service.app import App
from mfa_service.crypto import Keyring
from mfa_service.delivery.outbox import decode_payload
from mfa_service.store.models import outbox
from tests.support.client import rich_error, totp_at
from tests.support.config import TEST_KEYRING
from tests.support.rig import (
    Rig,
    code_in,
    delivered_all,
    enroll_email,
    enroll_phone,
    eventually,
    has_code,
    outbox_row,
    phone_text,
    step_up,
    unique_email,
    unique_phone,
)

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

async def test_email_factor_lifecycle(rig: Rig, user_id: str) -> None:
    address = unique_email(user_id)
    resp = await rig.stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_EMAIL, email=address.upper(),
        application=pb.APPLICATION_PORTAL))
    assert resp.factor.status == pb.FACTOR_STATUS_PENDING
    assert resp.factor.masked_destination.endswith("•••@example.com")
    assert resp.code_length == 6
    mail = (await eventually(lambda: rig.mails_to(address.upper().split("@")[0] + "@example.com")
                             or rig.mails_to(address)))[-1]
    body = mail.get_content()
    assert "Cloud Platform" in body and "5 minutes" in body
    assert "never share" in body.lower() or "never ask" in body.lower()

    confirmed = await rig.stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id,
                                                       code=code_in(body)))
    assert confirmed.factor.status == pb.FACTOR_STATUS_ACTIVE
    rig.clock.advance(31)

    ch = await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=resp.factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_BACKOFFICE))
    assert (ch.channel, ch.code_length) == (pb.CHANNEL_EMAIL, 6)
    assert ch.masked_destination == resp.factor.masked_destination
    mails = await eventually(lambda: len(rig.mails_to(mail["To"])) == 2 and rig.mails_to(
        mail["To"]))
    login = await rig.stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id,
                                                   code=code_in(mails[-1].get_content())))
    assert login.result == pb.VERIFY_RESULT_APPROVED
    assert login.session.method == pb.METHOD_EMAIL
    assert login.session.application == pb.APPLICATION_BACKOFFICE
    rig.clock.advance(31)

    off = await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=resp.factor.factor_id, purpose=pb.PURPOSE_DISABLE,
        application=pb.APPLICATION_PORTAL))
    mails = await eventually(lambda: len(rig.mails_to(mail["To"])) == 3 and rig.mails_to(
        mail["To"]))
    done = await rig.stub.Disable(pb.DisableRequest(
        user_id=user_id, factor_id=resp.factor.factor_id, challenge_id=off.challenge_id,
        code=code_in(mails[-1].get_content())))
    assert done.factor.status == pb.FACTOR_STATUS_DISABLED


async def test_phone_by_sms_then_voice(rig: Rig, user_id: str) -> None:
    factor_id, number = await enroll_phone(rig, user_id)
    first = rig.calls_to(number)[0]
    if rig.provider.requests[0].headers.get("content-type") == "application/json":
        assert json.loads(first.body)["channel"] == "sms"
        assert first.headers["idempotency-key"]
    else:
        assert first.path == "/2010-04-01/Accounts/AC0123/Messages.json"
        assert first.form()["From"] == "+4570000000"

    ch = await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=factor_id, purpose=pb.PURPOSE_LOGIN,
        channel=pb.CHANNEL_VOICE, application=pb.APPLICATION_PORTAL))
    assert ch.channel == pb.CHANNEL_VOICE
    assert ch.masked_destination.endswith(number[-2:])
    call = (await eventually(lambda: rig.calls_to(number)[1:]))[0]
    spoken = phone_text(call)
    digits = re.findall(r"\d(?:, \d){5}", spoken)
    assert len(digits) == 2 and digits[0] == digits[1]  # read digit by digit, twice
    if call.headers.get("content-type") != "application/json":
        assert call.path.endswith("/Calls.json")
        assert spoken.startswith("<Response><Say>")
    code = digits[0].replace(", ", "")
    ok = await rig.stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=code))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    assert ok.session.method == pb.METHOD_PHONE


async def test_resend_kills_the_old_code_and_is_rate_limited(rig: Rig, user_id: str) -> None:
    factor_id, number = await enroll_phone(rig, user_id)
    login = pb.ChallengeRequest(user_id=user_id, factor_id=factor_id,
                                purpose=pb.PURPOSE_LOGIN, application=pb.APPLICATION_PORTAL)
    first = await rig.stub.Challenge(login)
    assert (first.resend_available_at.ToDatetime().timestamp()
            - rig.clock.now().timestamp()) == 30
    first_sms = (await eventually(lambda: rig.calls_to(number)[1:]))[0]

    with pytest.raises(aio.AioRpcError) as err:
        await rig.stub.Challenge(login)
    e = rich_error(err.value)
    assert (e.code, e.reason, e.retry_seconds) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "ERROR_REASON_RESEND_COOLDOWN", 30)

    rig.clock.advance(30)
    second = await rig.stub.Challenge(login)
    second_sms = (await eventually(lambda: rig.calls_to(number)[2:]))[0]
    old = await rig.stub.Verify(pb.VerifyRequest(challenge_id=first.challenge_id,
                                                 code=code_in(phone_text(first_sms))))
    assert old.result == pb.VERIFY_RESULT_ALREADY_USED  # the old code died
    new = await rig.stub.Verify(pb.VerifyRequest(challenge_id=second.challenge_id,
                                                 code=code_in(phone_text(second_sms))))
    assert new.result == pb.VERIFY_RESULT_APPROVED
    # Sends so far in this window: enrolment, first, second. Two more are allowed: no
    # number gets more than 5 codes in 10 minutes, whichever users ask...
    for _ in range(2):
        rig.clock.advance(30)
        await rig.stub.Challenge(login)
    rig.clock.advance(30)
    with pytest.raises(aio.AioRpcError) as err:
        await rig.stub.Challenge(login)
    e = rich_error(err.value)
    assert (e.code, e.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  "ERROR_REASON_DESTINATION_RATE_LIMITED")
    assert e.retry_seconds is not None and 0 < e.retry_seconds <= 600
    rig.clock.advance(e.retry_seconds)
    await delivered_all(rig, user_id)
    before = len(rig.calls_to(number))
    latest = await rig.stub.Challenge(login)
    sms = (await eventually(lambda: rig.calls_to(number)[before:]))[0]
    ok = await rig.stub.Verify(pb.VerifyRequest(challenge_id=latest.challenge_id,
                                                code=code_in(phone_text(sms))))
    assert ok.result == pb.VERIFY_RESULT_APPROVED


async def test_phone_change_needs_the_old_number(rig: Rig, user_id: str) -> None:
    _, address = await enroll_email(rig, user_id)
    old_id, old_number = await enroll_phone(rig, user_id)
    new_number = unique_phone()

    # Without a recent 2FA session nothing is added, not even with a proof.
    with pytest.raises(aio.AioRpcError) as err:
        await rig.stub.Enroll(pb.EnrollRequest(
            user_id=user_id, method=pb.METHOD_PHONE, phone_number=new_number,
            application=pb.APPLICATION_PORTAL))
    e = rich_error(err.value)
    assert (e.code, e.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                  "ERROR_REASON_RECENT_SESSION_REQUIRED")
    session = await step_up(rig, user_id)
    with pytest.raises(aio.AioRpcError) as err:
        await rig.stub.Enroll(pb.EnrollRequest(
            user_id=user_id, method=pb.METHOD_PHONE, phone_number=new_number,
            application=pb.APPLICATION_PORTAL, session_token=session))
    e = rich_error(err.value)
    assert (e.code, e.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                  "ERROR_REASON_PHONE_CHANGE_PROOF_REQUIRED")

    proof = await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=old_id, purpose=pb.PURPOSE_CHANGE_PHONE,
        application=pb.APPLICATION_PORTAL))
    proof_sms = (await eventually(lambda: rig.calls_to(old_number)[1:]))[0]
    # An unapproved proof is no proof.
    with pytest.raises(aio.AioRpcError) as err:
        await rig.stub.Enroll(pb.EnrollRequest(
            user_id=user_id, method=pb.METHOD_PHONE, phone_number=new_number,
            application=pb.APPLICATION_PORTAL, change_proof_challenge_id=proof.challenge_id,
            session_token=session))
    assert rich_error(err.value).reason == "ERROR_REASON_PHONE_CHANGE_PROOF_REQUIRED"
    approved = await rig.stub.Verify(pb.VerifyRequest(challenge_id=proof.challenge_id,
                                                      code=code_in(phone_text(proof_sms))))
    assert approved.result == pb.VERIFY_RESULT_APPROVED
    assert approved.factor.status == pb.FACTOR_STATUS_ACTIVE  # not changed yet

    new_id, _ = await enroll_phone(rig, user_id, new_number, proof=proof.challenge_id)
    listed = await rig.stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    phones = {f.factor_id: f.status for f in listed.factors if f.method == pb.METHOD_PHONE}
    assert phones == {old_id: pb.FACTOR_STATUS_DISABLED, new_id: pb.FACTOR_STATUS_ACTIVE}

    # The proof works once.
    with pytest.raises(aio.AioRpcError) as err:
        await rig.stub.Enroll(pb.EnrollRequest(
            user_id=user_id, method=pb.METHOD_PHONE, phone_number=unique_phone(),
            application=pb.APPLICATION_PORTAL, change_proof_challenge_id=proof.challenge_id,
            session_token=await step_up(rig, user_id)))
    assert rich_error(err.value).reason == "ERROR_REASON_PHONE_CHANGE_PROOF_REQUIRED"

    # The old number and the email address are told.
    notices = await eventually(lambda: [r for r in rig.calls_to(old_number, notices=True)
                                        if not has_code(phone_text(r))])
    assert len(notices) == 1
    assert new_number[-2:] in phone_text(notices[0])
    assert "changed" in phone_text(notices[0]).lower()
    mails = await eventually(lambda: [m for m in rig.mails_to(address, notices=True)
                                      if "phone number" in m.get_content().lower()
                                      and "changed" in m.get_content().lower()])
    assert len(mails) == 1


async def test_a_stale_change_proof_is_refused(rig: Rig, user_id: str) -> None:
    old_id, old_number = await enroll_phone(rig, user_id)
    proof = await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=old_id, purpose=pb.PURPOSE_CHANGE_PHONE,
        application=pb.APPLICATION_PORTAL))
    sms = (await eventually(lambda: rig.calls_to(old_number)[1:]))[0]
    await rig.stub.Verify(pb.VerifyRequest(challenge_id=proof.challenge_id,
                                           code=code_in(phone_text(sms))))
    rig.clock.advance(10 * 60 + 1)
    with pytest.raises(aio.AioRpcError) as err:
        await rig.stub.Enroll(pb.EnrollRequest(
            user_id=user_id, method=pb.METHOD_PHONE, phone_number=unique_phone(),
            application=pb.APPLICATION_PORTAL, change_proof_challenge_id=proof.challenge_id,
            session_token=await step_up(rig, user_id)))
    assert rich_error(err.value).reason == "ERROR_REASON_PHONE_CHANGE_PROOF_REQUIRED"


async def test_provider_down_then_up_delivers_exactly_once(rig: Rig, user_id: str) -> None:
    rig.provider.status = 503
    number = unique_phone()
    resp = await rig.stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_PHONE, phone_number=number,
        application=pb.APPLICATION_PORTAL))
    await eventually(lambda: rig.calls_to(number))  # tried once, refused
    row = await outbox_row(rig, resp.challenge_id, until=lambda r: r.last_error is not None)
    assert row.state == "pending" and row.attempts == 1 and "503" in row.last_error
    assert row.payload_ciphertext is not None
    assert b"503" not in row.payload_ciphertext

    rig.provider.status = 201 if "twilio" in str(rig.app.settings.phone_provider) else 200
    rig.clock.advance(61)  # past the backoff (at most 60 s in this rig)
    rig.app.dispatcher.wake()
    await eventually(lambda: len(rig.calls_to(number)) == 2)
    delivered = rig.calls_to(number)[-1]
    ok = await rig.stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id,
                                                code=code_in(phone_text(delivered))))
    assert ok.result == pb.VERIFY_RESULT_APPROVED

    row = await outbox_row(rig, resp.challenge_id, until=lambda r: r.state != "pending")
    assert (row.state, row.attempts) == ("sent", 2)
    assert row.payload_ciphertext is None  # wiped once sent
    for _ in range(3):  # nothing more goes out
        assert await rig.app.dispatcher.run_once() == 0
    assert len(rig.calls_to(number)) == 2


async def test_a_code_that_expired_in_the_outbox_is_never_sent(rig: Rig, user_id: str) -> None:
    rig.provider.status = 503
    number = unique_phone()
    await rig.stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_PHONE, phone_number=number,
        application=pb.APPLICATION_PORTAL))
    await eventually(lambda: rig.calls_to(number))
    rig.provider.status = 200
    rig.clock.advance(5 * 60 + 1)
    rig.app.dispatcher.wake()
    for _ in range(3):
        await rig.app.dispatcher.run_once()
    assert len(rig.calls_to(number)) == 1


async def test_restart_with_queued_messages_delivers_them_once(
        rig: Rig, user_id: str) -> None:
    await rig.app.stop(0)
    quiet = await rig.restart(outbox_dispatcher=False)
    numbers = [unique_phone() for _ in range(3)]
    async with aio.insecure_channel(f"127.0.0.1:{quiet.port}") as channel:
        stub: Stub = pb_grpc.TwoFactorServiceStub(channel)
        for i, number in enumerate(numbers):
            await stub.Enroll(pb.EnrollRequest(
                user_id=f"{user_id}-{i}", method=pb.METHOD_PHONE, phone_number=number,
                application=pb.APPLICATION_PORTAL))
    await quiet.stop(0)  # "crash" with three messages queued
    assert all(not rig.calls_to(n) for n in numbers)

    await rig.restart()
    await eventually(lambda: all(rig.calls_to(n) for n in numbers))
    await asyncio.sleep(0.2)  # several more dispatcher polls: nothing is sent twice
    assert [len(rig.calls_to(n)) for n in numbers] == [1, 1, 1]


async def test_two_dispatchers_never_send_a_message_twice(rig: Rig, user_id: str) -> None:
    await rig.app.stop(0)
    first = await rig.restart(outbox_dispatcher=False)
    second = await rig.restart(outbox_dispatcher=False, listen_addr="127.0.0.1:0")
    numbers = [unique_phone() for _ in range(12)]
    async with aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
        stub: Stub = pb_grpc.TwoFactorServiceStub(channel)
        for i, number in enumerate(numbers):
            await stub.Enroll(pb.EnrollRequest(
                user_id=f"{user_id}-{i}", method=pb.METHOD_PHONE, phone_number=number,
                application=pb.APPLICATION_PORTAL))

    async def drain(app: App) -> int:
        total = 0
        while (n := await app.dispatcher.run_once()) > 0:
            total += n
        return total

    claimed = await asyncio.gather(drain(first), drain(second), drain(first), drain(second))
    assert sum(claimed) >= len(numbers)
    assert [len(rig.calls_to(n)) for n in numbers] == [1] * len(numbers)
    keys = [r.headers.get("idempotency-key") or r.headers.get("i-twilio-idempotency-token")
            for n in numbers for r in rig.calls_to(n)]
    assert len(set(keys)) == len(numbers)


async def test_codes_in_the_outbox_are_encrypted(rig: Rig, user_id: str) -> None:
    await rig.app.stop(0)
    quiet = await rig.restart(outbox_dispatcher=False)
    async with aio.insecure_channel(f"127.0.0.1:{quiet.port}") as channel:
        stub: Stub = pb_grpc.TwoFactorServiceStub(channel)
        resp = await stub.Enroll(pb.EnrollRequest(
            user_id=user_id, method=pb.METHOD_EMAIL, email=unique_email(user_id),
            application=pb.APPLICATION_PORTAL))
    async with quiet.database.engine.connect() as conn:
        row = (await conn.execute(select(outbox).where(
            outbox.c.challenge_id == resp.challenge_id))).one()
    assert row.payload_ciphertext is not None
    subject, text = decode_payload(Keyring.parse(TEST_KEYRING), row.id, row.payload_key_id,
                                   row.payload_ciphertext)
    code = code_in(text)
    assert code.encode() not in row.payload_ciphertext
    assert b"Cloud Platform" not in row.payload_ciphertext
    assert subject  # an email has a subject; it is encrypted with the body


@pytest.mark.parametrize(("request_fields", "field"), [
    ({"method": pb.METHOD_EMAIL, "email": "not-an-address"}, "email"),
    ({"method": pb.METHOD_EMAIL}, "email"),
    ({"method": pb.METHOD_EMAIL, "email": "a@example.com", "channel": pb.CHANNEL_SMS},
     "channel"),
    ({"method": pb.METHOD_PHONE, "phone_number": "20123456"}, "phone_number"),
    ({"method": pb.METHOD_PHONE, "phone_number": "+45 1"}, "phone_number"),
    ({"method": pb.METHOD_PHONE, "phone_number": "+4520123456", "channel": pb.CHANNEL_EMAIL},
     "channel"),
    ({"method": pb.METHOD_PHONE}, "phone_number"),
])
async def test_destinations_are_validated(stub: Stub, user_id: str,
                                          request_fields: dict[str, Any], field: str) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Enroll(pb.EnrollRequest(user_id=user_id, application=pb.APPLICATION_PORTAL,
                                           **request_fields))
    e = rich_error(err.value)
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(e.field_violations) == {field}


async def test_security_notices_reach_the_user_by_email(rig: Rig, user_id: str) -> None:
    _, address = await enroll_email(rig, user_id)

    def notices() -> list[str]:
        return [m["Subject"] for m in rig.mails_to(address, notices=True)
                if not has_code(m.get_content())]

    # The factor that just proved itself gets no notice; the others hear of changes.
    await delivered_all(rig, user_id)
    assert notices() == []
    app = await rig.stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL,
        session_token=await step_up(rig, user_id)))
    confirmed = await rig.stub.Verify(pb.VerifyRequest(
        challenge_id=app.challenge_id, code=totp_at(app.totp_secret, rig.clock)))
    assert confirmed.result == pb.VERIFY_RESULT_APPROVED
    rig.clock.advance(30)
    await eventually(lambda: len(notices()) == 1)  # the app was added

    # Five wrong app codes lock the account: the user hears of it.
    listed = await rig.stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    recovery_id = next(f.factor_id for f in listed.factors
                       if f.method == pb.METHOD_RECOVERY_CODE)
    ch = await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=app.factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    right = totp_at(app.totp_secret, rig.clock)
    for _ in range(5):
        await rig.stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id,
                                               code=f"{(int(right) + 1) % 10**6:06d}"))
    await eventually(lambda: len(notices()) == 2)
    rig.clock.advance(60)

    # A recovery code is used: told, with how many are left.
    first_codes = rig.recovery_codes[user_id]  # they came with the first factor (email)
    assert not confirmed.recovery_codes  # not again with the second
    ch = await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=recovery_id, purpose=pb.PURPOSE_DISABLE,
        application=pb.APPLICATION_PORTAL))
    done = await rig.stub.Disable(pb.DisableRequest(
        user_id=user_id, factor_id=app.factor.factor_id, challenge_id=ch.challenge_id,
        code=first_codes[0]))
    assert done.result == pb.VERIFY_RESULT_APPROVED
    # ...and the app factor was removed.
    await eventually(lambda: len(notices()) == 4)
    texts = [m.get_content().lower() for m in rig.mails_to(address, notices=True)
             if not has_code(m.get_content())]
    assert any("added" in t for t in texts)
    assert any("locked" in t for t in texts)
    assert any("recovery code" in t and "9 left" in t for t in texts)
    assert any("removed" in t for t in texts)


async def test_messages_follow_the_factor_locale(rig: Rig, user_id: str) -> None:
    address = unique_email(user_id)
    await rig.stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_EMAIL, email=address, locale="da-DK",
        application=pb.APPLICATION_PORTAL))
    mail = (await eventually(lambda: rig.mails_to(address)))[-1]
    assert mail["Subject"] == "Din Cloud Platform-bekræftelseskode"
    assert "5 minutter" in mail.get_content()
    with pytest.raises(aio.AioRpcError) as err:
        await rig.stub.Enroll(pb.EnrollRequest(
            user_id=user_id, method=pb.METHOD_EMAIL, email=address, locale="not a locale!",
            application=pb.APPLICATION_PORTAL))
    assert set(rich_error(err.value).field_violations) == {"locale"}
