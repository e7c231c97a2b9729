"""Remembered browsers (trusted devices, issue #19): remember on a login, recognise without
a code, list and forget; every way trust is taken away, played through the RPCs; the
lifetime and idle limits on the fixed clock; the limits on unknown tokens; what a
remembered browser's session is worth (never fresh, no proof, not AAL2); and what
CheckSession says about how each session was established (amr, phishing_resistant,
aal2). On SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from pydantic import ValidationError
from sqlalchemy import func, select

from mfa_service.app import App
from mfa_service.clock import FixedClock
from mfa_service.service.admin import AdminService
from mfa_service.settings import Settings
from mfa_service.store.models import trusted_devices
from mfa_service.store.retention import Retention, purge
from tests.conftest import AppFactor, login, regenerate, rich_error, totp_at
from tests.support.rig import (
    SPOKEN_CODE_RE,
    Rig,
    code_in,
    enroll_email,
    enroll_phone,
    eventually,
    phone_text,
)
from tests.support.softauthn import SoftAuthenticator

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

PORTAL, BACKOFFICE = pb.APPLICATION_PORTAL, pb.APPLICATION_BACKOFFICE
DAY = 24 * 3600
LABEL = "Firefox on Linux"


@dataclass
class User:
    """A user with an authenticator app (and the recovery codes it came with)."""

    app: AppFactor
    codes: list[str]

    @property
    def user_id(self) -> str:
        return self.app.user_id


async def new_user(stub: Stub, user_id: str, clock: FixedClock) -> User:
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=PORTAL))
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id,
                                            code=totp_at(resp.totp_secret, clock)))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    clock.advance(30)
    return User(AppFactor(resp.factor.factor_id, resp.totp_secret, user_id),
                list(ok.recovery_codes))


async def remember(stub: Stub, user: User, clock: FixedClock, label: str = LABEL,
                   application: pb.Application.ValueType = PORTAL) -> pb.VerifyResponse:
    """A login with the app that also remembers the browser."""
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user.user_id, factor_id=user.app.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=application))
    ok = await stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, code=totp_at(user.app.secret, clock),
        remember_device=True, device_label=label))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    clock.advance(30)
    return ok


async def recognize(stub: Stub, user_id: str, token: str,
                    application: pb.Application.ValueType = PORTAL,
                    client_ip: str = "") -> pb.RecognizeDeviceResponse:
    resp: pb.RecognizeDeviceResponse = await stub.RecognizeDevice(pb.RecognizeDeviceRequest(
        user_id=user_id, device_token=token, application=application, client_ip=client_ip,
        user_agent="test-devices/1.0"))
    return resp


async def check(stub: Stub, token: str) -> pb.CheckSessionResponse:
    resp: pb.CheckSessionResponse = await stub.CheckSession(pb.CheckSessionRequest(
        session_token=token, application=BACKOFFICE))
    return resp


async def refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(aio.AioRpcError) as err:
        await call
    e = rich_error(err.value)
    return e.code, e.reason


def forged() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex[:11]  # 43 characters, like a real token


# -- remember, recognise, list ------------------------------------------------------------
async def test_a_remembered_browser_logs_in_without_a_code(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    user = await new_user(stub, user_id, fresh_clock)
    remembered_at = fresh_clock.now()
    ok = await remember(stub, user, fresh_clock)
    assert len(ok.device_token) >= 43 and ok.session.session_token  # 256 bits, base64url
    assert ok.device_token not in (ok.session.session_token, ok.device.device_id)
    assert (ok.device.label, ok.device.application, ok.device.method) == (
        LABEL, PORTAL, pb.METHOD_AUTHENTICATOR_APP)
    assert ok.device.expires_at.ToDatetime() - ok.device.created_at.ToDatetime() == (
        timedelta(days=30))
    assert ok.device.idle_expires_at.ToDatetime() - ok.device.created_at.ToDatetime() == (
        timedelta(days=14))

    fresh_clock.advance(3600)
    back = await recognize(stub, user_id, ok.device_token)
    assert back.recognized and back.session.session_token
    assert back.device.device_id == ok.device.device_id
    assert back.device.last_used_at.ToDatetime() > back.device.created_at.ToDatetime()
    # The session says it came from a remembered browser, and when a code last was typed.
    seen = await check(stub, back.session.session_token)
    assert seen.valid and seen.user_id == user_id and seen.trusted_device
    assert (list(seen.amr), seen.aal2, seen.phishing_resistant) == ([], False, False)
    assert seen.authenticated_at == ok.device.created_at
    assert ok.device.created_at.ToDatetime() == remembered_at.replace(tzinfo=None)
    listed = await stub.ListDevices(pb.ListDevicesRequest(user_id=user_id))
    assert [(d.device_id, d.label) for d in listed.devices] == [(ok.device.device_id, LABEL)]
    assert listed.devices[0].last_used_at == back.device.last_used_at
    # A login without remember_device remembers nothing.
    plain = await login(stub, user.app, fresh_clock)
    assert plain.session_token
    assert len((await stub.ListDevices(pb.ListDevicesRequest(user_id=user_id))).devices) == 1


async def test_a_browser_is_recognised_only_on_its_application_and_for_its_user(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    alice = await new_user(stub, user_id, fresh_clock)
    bob = await new_user(stub, f"{user_id}-b", fresh_clock)
    token = (await remember(stub, alice, fresh_clock)).device_token
    assert not (await recognize(stub, bob.user_id, token)).recognized
    assert not (await recognize(stub, user_id, token, application=BACKOFFICE)).recognized
    assert (await recognize(stub, user_id, token)).recognized
    # Bob's answer was a guess (counted); Alice's own token on the other application was
    # not: four more guesses at Bob lock him, five at Alice's other application do not.
    for _ in range(4):
        assert not (await recognize(stub, bob.user_id, forged())).recognized
    assert await refused(recognize(stub, bob.user_id, forged())) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "ERROR_REASON_USER_LOCKED_OUT")
    for _ in range(5):
        assert not (await recognize(stub, user_id, token, application=BACKOFFICE)).recognized
    assert (await recognize(stub, user_id, token)).recognized


# -- what it is worth ----------------------------------------------------------------------
async def test_a_remembered_browsers_session_is_never_fresh_and_proves_nothing(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    user = await new_user(stub, user_id, fresh_clock)
    token = (await remember(stub, user, fresh_clock)).device_token
    trusted = (await recognize(stub, user_id, token)).session.session_token
    step_up = (grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_RECENT_SESSION_REQUIRED")
    # Seconds old, and still no step-up: adding a factor asks for a code.
    enroll = pb.EnrollRequest(user_id=user_id, method=pb.METHOD_PASSKEY, application=PORTAL,
                              session_token=trusted)
    assert await refused(stub.Enroll(enroll)) == step_up
    # Nor does it renew a pending factor another session started.
    fresh = await login(stub, user.app, fresh_clock)
    enroll.session_token = fresh.session_token
    started = await stub.Enroll(enroll)
    assert await refused(stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=started.factor.factor_id,
        purpose=pb.PURPOSE_CONFIRM_ENROLLMENT, application=PORTAL,
        session_token=trusted))) == step_up
    # Nor does it regenerate recovery codes (a session never did).
    assert await refused(stub.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(
        user_id=user_id, session_token=trusted, application=PORTAL))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_PROOF_REQUIRED")
    assert (await check(stub, trusted)).valid  # refused, not ended


async def test_a_recovery_code_cannot_remember_a_browser(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    user = await new_user(stub, user_id, fresh_clock)
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    [recovery_id] = [f.factor_id for f in listed.factors
                     if f.method == pb.METHOD_RECOVERY_CODE]
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=recovery_id, purpose=pb.PURPOSE_LOGIN, application=PORTAL))
    asked = pb.VerifyRequest(challenge_id=ch.challenge_id, code=user.codes[0],
                             remember_device=True, device_label=LABEL)
    assert await refused(stub.Verify(asked)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_REMEMBER_DEVICE_NOT_ALLOWED")
    # Refused before the code was checked: the code is unused, and the approval below is
    # the challenge's first attempt (5 - 1 left, not 3).
    asked.remember_device, asked.device_label = False, ""
    ok = await stub.Verify(asked)
    assert (ok.result, ok.attempts_remaining, ok.device_token) == (
        pb.VERIFY_RESULT_APPROVED, 4, "")


async def test_only_a_login_remembers_a_browser(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    user = await new_user(stub, user_id, fresh_clock)
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=user.app.factor_id,
        purpose=pb.PURPOSE_REGENERATE_RECOVERY_CODES, application=PORTAL))
    assert await refused(stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, code=totp_at(user.app.secret, fresh_clock),
        remember_device=True, device_label=LABEL))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_REMEMBER_DEVICE_NOT_ALLOWED")
    # A wrong code on a login remembers nothing and counts as a wrong code.
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=user.app.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=PORTAL))
    wrong = f"{(int(totp_at(user.app.secret, fresh_clock)) + 1) % 10**6:06d}"
    no = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=wrong,
                                            remember_device=True, device_label=LABEL))
    assert (no.result, no.device_token, no.HasField("device")) == (
        pb.VERIFY_RESULT_INVALID_CODE, "", False)


async def test_validation_names_the_field(stub: Stub, user_id: str) -> None:
    async def bad(call: Any) -> dict[str, str]:
        with pytest.raises(aio.AioRpcError) as err:
            await call
        e = rich_error(err.value)
        assert (e.code, e.reason) == (grpc.StatusCode.INVALID_ARGUMENT,
                                      "ERROR_REASON_INVALID_REQUEST")
        return e.field_violations

    challenge_id = str(uuid.uuid4())
    assert set(await bad(stub.Verify(pb.VerifyRequest(
        challenge_id=challenge_id, code="123456", remember_device=True)))) == {
        "device_label"}
    assert set(await bad(stub.Verify(pb.VerifyRequest(
        challenge_id=challenge_id, code="123456", remember_device=True,
        device_label="x" * 65)))) == {"device_label"}
    assert set(await bad(stub.Verify(pb.VerifyRequest(
        challenge_id=challenge_id, code="123456", remember_device=True,
        device_label="Firefox\non Linux")))) == {"device_label"}
    assert set(await bad(stub.Verify(pb.VerifyRequest(
        challenge_id=challenge_id, code="123456", device_label=LABEL)))) == {"device_label"}
    assert set(await bad(stub.RecognizeDevice(pb.RecognizeDeviceRequest(
        user_id=user_id, application=PORTAL)))) == {"device_token"}
    assert set(await bad(stub.RecognizeDevice(pb.RecognizeDeviceRequest(
        user_id="", device_token="x" * 257, application=pb.APPLICATION_UNSPECIFIED,
        client_ip="not an address", user_agent="a" * 513)))) == {
        "user_id", "device_token", "application", "client_ip", "user_agent"}
    assert set(await bad(stub.ListDevices(pb.ListDevicesRequest(user_id=" x")))) == {
        "user_id"}
    assert set(await bad(stub.ForgetDevice(pb.ForgetDeviceRequest(
        user_id=user_id, device_id="not-a-uuid")))) == {"device_id"}
    assert set(await bad(stub.ForgetDevice(pb.ForgetDeviceRequest(user_id=user_id)))) == {
        "device_id"}


# -- unknown tokens ----------------------------------------------------------------------------
async def test_forged_tokens_count_against_the_users_lockout(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    user = await new_user(stub, user_id, fresh_clock)
    token = (await remember(stub, user, fresh_clock)).device_token
    for guess in (forged(), token[:-1], token + "A", token[::-1], forged()):
        assert not (await recognize(stub, user_id, guess)).recognized
    with pytest.raises(aio.AioRpcError) as err:
        await recognize(stub, user_id, forged())
    e = rich_error(err.value)
    assert (e.code, e.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  "ERROR_REASON_USER_LOCKED_OUT")
    assert e.retry_seconds is not None and 0 < e.retry_seconds <= 60
    # Locked out is locked out, the real token too; after the wait it works again.
    assert (await refused(recognize(stub, user_id, token)))[1] == "ERROR_REASON_USER_LOCKED_OUT"
    fresh_clock.advance(61)
    assert (await recognize(stub, user_id, token)).recognized
    events = await stub.ListAuditEvents(pb.ListAuditEventsRequest(user_id=user_id))
    misses = [e for e in events.events if e.event == "device_not_recognized"]
    assert len(misses) == 5 and {e.detail["reason"] for e in misses} == {"unknown"}
    assert any(e.event == "lockout" for e in events.events)


async def test_a_token_the_browser_kept_after_its_device_ended_is_not_a_guess(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    user = await new_user(stub, user_id, fresh_clock)
    ok = await remember(stub, user, fresh_clock)
    await stub.ForgetDevice(pb.ForgetDeviceRequest(user_id=user_id,
                                                   device_id=ok.device.device_id))
    for _ in range(8):
        assert not (await recognize(stub, user_id, ok.device_token)).recognized
    assert (await login(stub, user.app, fresh_clock)).session_token  # not locked out


async def test_unknown_tokens_from_one_address_are_limited(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """20 an hour per address (an IPv6 /64), whichever users they name."""
    net = f"2001:db8:{uuid.uuid4().int % 0xffff:x}:{uuid.uuid4().int % 0xffff:x}"
    for i in range(20):  # one guess per user: no user's lockout is reached
        assert not (await recognize(stub, f"{user_id}-{i}", forged(),
                                    client_ip=f"{net}::{i + 1:x}")).recognized
    with pytest.raises(aio.AioRpcError) as err:
        await recognize(stub, f"{user_id}-x", forged(), client_ip=f"{net}::ffff")
    e = rich_error(err.value)
    assert (e.code, e.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  "ERROR_REASON_UNRECOGNIZED_DEVICES_RATE_LIMITED")
    assert e.retry_seconds is not None and 3000 < e.retry_seconds <= 3600
    # Another /64 is another address; an hour later this one may try again.
    other = f"2001:db8:{uuid.uuid4().int % 0xffff:x}:1::1"
    assert not (await recognize(stub, f"{user_id}-y", forged(), client_ip=other)).recognized
    fresh_clock.advance(3600)
    assert not (await recognize(stub, f"{user_id}-z", forged(),
                                client_ip=f"{net}::1")).recognized


# -- lifetime ----------------------------------------------------------------------------------
async def test_a_remembered_browser_ends_after_30_days_however_often_it_is_used(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    user = await new_user(stub, user_id, fresh_clock)
    token = (await remember(stub, user, fresh_clock)).device_token
    for _ in range(2):
        fresh_clock.advance(13 * DAY)  # each use moves the idle deadline on
        assert (await recognize(stub, user_id, token)).recognized
    fresh_clock.advance(4 * DAY)  # 30 days and a minute after it was remembered
    assert not (await recognize(stub, user_id, token)).recognized
    assert not (await stub.ListDevices(pb.ListDevicesRequest(user_id=user_id))).devices


async def test_a_remembered_browser_left_unused_for_14_days_ends(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    user = await new_user(stub, user_id, fresh_clock)
    token = (await remember(stub, user, fresh_clock)).device_token
    fresh_clock.advance(14 * DAY - 31)  # remember() moved the clock on by 30 s
    assert len((await stub.ListDevices(pb.ListDevicesRequest(user_id=user_id))).devices) == 1
    fresh_clock.advance(1)
    assert not (await stub.ListDevices(pb.ListDevicesRequest(user_id=user_id))).devices
    assert not (await recognize(stub, user_id, token)).recognized


async def test_retention_deletes_a_remembered_browser_a_day_after_it_expired(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    user = await new_user(stub, user_id, fresh_clock)
    await remember(stub, user, fresh_clock)

    async def rows() -> int:
        async with app.database.transaction() as tx:
            await purge(tx, fresh_clock.now(), Retention())
            n = (await tx.execute(select(func.count()).select_from(trusted_devices)
                                       .where(trusted_devices.c.user_id == user_id))).scalar()
        return int(n or 0)

    fresh_clock.advance(31 * DAY - 60)
    assert await rows() == 1  # ended, but its browser may still present the token
    fresh_clock.advance(120)
    assert await rows() == 0


async def test_remembering_an_eleventh_browser_forgets_the_least_recently_used(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    user = await new_user(stub, user_id, fresh_clock)
    tokens = [(await remember(stub, user, fresh_clock, label=f"Browser {i}")).device_token
              for i in range(10)]
    assert (await recognize(stub, user_id, tokens[0])).recognized  # now the most recent
    fresh_clock.advance(1)
    await remember(stub, user, fresh_clock, label="Browser 10")
    listed = await stub.ListDevices(pb.ListDevicesRequest(user_id=user_id))
    assert len(listed.devices) == 10
    assert "Browser 1" not in {d.label for d in listed.devices}
    assert listed.devices[0].label == "Browser 10"  # most recently used first
    assert not (await recognize(stub, user_id, tokens[1])).recognized
    assert (await recognize(stub, user_id, tokens[0])).recognized


# -- every way trust is taken away -------------------------------------------------------------
async def add_passkey(stub: Stub, user: User, clock: FixedClock,
                      key: SoftAuthenticator) -> str:
    session = await login(stub, user.app, clock)
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user.user_id, method=pb.METHOD_PASSKEY, application=PORTAL,
        session_token=session.session_token))
    ok = await stub.Verify(pb.VerifyRequest(
        challenge_id=resp.challenge_id,
        webauthn_response=key.create(resp.webauthn_creation_options)))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    return resp.factor.factor_id


async def recovery_login(stub: Stub, user: User) -> None:
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user.user_id))
    [recovery_id] = [f.factor_id for f in listed.factors
                     if f.method == pb.METHOD_RECOVERY_CODE]
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user.user_id, factor_id=recovery_id, purpose=pb.PURPOSE_LOGIN,
        application=PORTAL))
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=user.codes[0]))
    assert ok.result == pb.VERIFY_RESULT_APPROVED


TRIGGERS = ["factor_added", "factor_disabled", "recovery_codes_regenerated",
            "recovery_code_used", "log_out_everywhere", "admin_reset"]


@pytest.mark.parametrize("trigger", TRIGGERS)
async def test_every_change_forgets_every_remembered_browser_and_ends_its_sessions(
        trigger: str, app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    user = await new_user(stub, user_id, fresh_clock)
    key = SoftAuthenticator()
    passkey_id = await add_passkey(stub, user, fresh_clock, key) if (
        trigger == "factor_disabled") else ""
    first = await remember(stub, user, fresh_clock, label="Laptop")
    second = await remember(stub, user, fresh_clock, label="Phone", application=BACKOFFICE)
    trusted = (await recognize(stub, user_id, first.device_token)).session.session_token
    plain = await login(stub, user.app, fresh_clock)
    assert (await check(stub, trusted)).valid

    if trigger == "factor_added":
        await add_passkey(stub, user, fresh_clock, SoftAuthenticator())
    elif trigger == "factor_disabled":
        ch = await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=passkey_id, purpose=pb.PURPOSE_DISABLE,
            application=PORTAL))
        done = await stub.Disable(pb.DisableRequest(
            user_id=user_id, factor_id=passkey_id, challenge_id=ch.challenge_id,
            webauthn_response=key.get(ch.webauthn_request_options)))
        assert done.result == pb.VERIFY_RESULT_APPROVED
    elif trigger == "recovery_codes_regenerated":
        assert len(await regenerate(stub, user.app, fresh_clock)) == 10
    elif trigger == "recovery_code_used":
        await recovery_login(stub, user)
    elif trigger == "log_out_everywhere":
        await stub.RevokeSession(pb.RevokeSessionRequest(user_id=user_id))
    else:
        report = await AdminService(app.database, fresh_clock).reset_user(
            user_id, "lost phone, identity checked")
        assert report.devices_forgotten == 2

    for token, application in ((first.device_token, PORTAL),
                               (second.device_token, BACKOFFICE)):
        assert not (await recognize(stub, user_id, token, application)).recognized
    assert not (await stub.ListDevices(pb.ListDevicesRequest(user_id=user_id))).devices
    assert not (await check(stub, trusted)).valid  # it stood on the browser's trust
    if trigger not in ("log_out_everywhere", "admin_reset"):
        assert (await check(stub, plain.session_token)).valid  # a code's session stays
    if trigger != "admin_reset":  # the reset is audited as one admin_reset event
        events = (await stub.ListAuditEvents(pb.ListAuditEventsRequest(
            user_id=user_id))).events
        scopes = [e.detail["scope"] for e in events if e.event == "device_forgotten"]
        expected = "all_sessions" if trigger == "log_out_everywhere" else "factor_changed"
        assert scopes == [expected, expected]
    # Remembering again works at once (a login with a code, as ever).
    again = await remember(stub, user, fresh_clock) if trigger != "admin_reset" else None
    if again is not None:
        assert (await recognize(stub, user_id, again.device_token)).recognized


async def test_forgetting_one_browser_forgets_only_it_and_ends_its_sessions(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    user = await new_user(stub, user_id, fresh_clock)
    laptop = await remember(stub, user, fresh_clock, label="Laptop")
    phone = await remember(stub, user, fresh_clock, label="Phone")
    on_laptop = (await recognize(stub, user_id, laptop.device_token)).session.session_token
    on_phone = (await recognize(stub, user_id, phone.device_token)).session.session_token
    assert (await check(stub, on_laptop)).valid  # (cached now, where there is a cache)
    done = await stub.ForgetDevice(pb.ForgetDeviceRequest(
        user_id=user_id, device_id=laptop.device.device_id, client_ip="198.51.100.4"))
    assert done.sessions_ended == 1
    assert not (await check(stub, on_laptop)).valid
    assert (await check(stub, on_phone)).valid
    assert not (await recognize(stub, user_id, laptop.device_token)).recognized
    assert (await recognize(stub, user_id, phone.device_token)).recognized
    listed = await stub.ListDevices(pb.ListDevicesRequest(user_id=user_id))
    assert [d.label for d in listed.devices] == ["Phone"]
    # Forgotten already, someone else's, or never there: "not found", all alike.
    other = await new_user(stub, f"{user_id}-other", fresh_clock)
    for who, device_id in ((user_id, laptop.device.device_id),
                           (other.user_id, phone.device.device_id),
                           (user_id, str(uuid.uuid4()))):
        assert await refused(stub.ForgetDevice(pb.ForgetDeviceRequest(
            user_id=who, device_id=device_id))) == (
            grpc.StatusCode.NOT_FOUND, "ERROR_REASON_DEVICE_NOT_FOUND")
    assert (await recognize(stub, user_id, phone.device_token)).recognized


async def test_a_lockout_forgets_no_browser(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """Wrong codes are someone guessing, not a change to the user's factors."""
    user = await new_user(stub, user_id, fresh_clock)
    token = (await remember(stub, user, fresh_clock)).device_token
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=user.app.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=PORTAL))
    wrong = f"{(int(totp_at(user.app.secret, fresh_clock)) + 1) % 10**6:06d}"
    for _ in range(5):
        await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=wrong))
    fresh_clock.advance(61)
    assert (await recognize(stub, user_id, token)).recognized


@pytest.mark.parametrize("rig", ["webhook"], indirect=True)
async def test_a_phone_change_forgets_every_remembered_browser(rig: Rig, user_id: str) -> None:
    stub, clock = rig.stub, rig.clock
    phone_id, number = await enroll_phone(rig, user_id)
    before = len(rig.calls_to(number))
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=phone_id, purpose=pb.PURPOSE_LOGIN, application=PORTAL))
    text = phone_text((await eventually(lambda: rig.calls_to(number)[before:]))[-1])
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=code_in(text),
                                            remember_device=True, device_label=LABEL))
    assert ok.device.method == pb.METHOD_PHONE
    clock.advance(31)
    assert (await recognize(stub, user_id, ok.device_token)).recognized
    before = len(rig.calls_to(number))
    proof = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=phone_id, purpose=pb.PURPOSE_CHANGE_PHONE,
        application=PORTAL))
    text = phone_text((await eventually(lambda: rig.calls_to(number)[before:]))[-1])
    assert (await stub.Verify(pb.VerifyRequest(challenge_id=proof.challenge_id,
                                               code=code_in(text)))).result == (
        pb.VERIFY_RESULT_APPROVED)
    clock.advance(31)
    await enroll_phone(rig, user_id, proof=proof.challenge_id)
    assert not (await recognize(stub, user_id, ok.device_token)).recognized
    # Forgotten by the change itself (not only unusable because its phone is gone).
    events = (await stub.ListAuditEvents(pb.ListAuditEventsRequest(user_id=user_id))).events
    assert [e.detail["scope"] for e in events if e.event == "device_forgotten"] == [
        "factor_changed"]


# -- CheckSession: how each session was established -------------------------------------------
async def test_check_session_says_how_a_code_or_passkey_session_was_established(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    user = await new_user(stub, user_id, fresh_clock)
    app_session = await check(stub, (await login(stub, user.app, fresh_clock)).session_token)
    assert (list(app_session.amr), app_session.aal2, app_session.phishing_resistant,
            app_session.trusted_device) == (["otp", "mfa"], True, False, False)
    key = SoftAuthenticator()
    passkey_id = await add_passkey(stub, user, fresh_clock, key)
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=passkey_id, purpose=pb.PURPOSE_LOGIN, application=PORTAL))
    ok = await stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, webauthn_response=key.get(ch.webauthn_request_options),
        remember_device=True, device_label=LABEL))
    passkey_session = await check(stub, ok.session.session_token)
    assert (list(passkey_session.amr), passkey_session.aal2,
            passkey_session.phishing_resistant) == (["swk", "mfa"], True, True)
    # A browser remembered with a passkey is still only a remembered browser.
    trusted = await check(stub, (await recognize(stub, user_id, ok.device_token))
                          .session.session_token)
    assert (list(trusted.amr), trusted.aal2, trusted.phishing_resistant,
            trusted.trusted_device, trusted.method) == (
        [], False, False, True, pb.METHOD_PASSKEY)
    await recovery_login(stub, user)
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    [recovery_id] = [f.factor_id for f in listed.factors
                     if f.method == pb.METHOD_RECOVERY_CODE]
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=recovery_id, purpose=pb.PURPOSE_LOGIN, application=PORTAL))
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=user.codes[1]))
    recovery = await check(stub, ok.session.session_token)
    assert (list(recovery.amr), recovery.aal2) == (["recovery_code", "mfa"], True)


@pytest.mark.parametrize("rig", ["webhook"], indirect=True)
async def test_check_session_names_the_channel_and_holds_email_below_aal2(
        rig: Rig, user_id: str) -> None:
    stub = rig.stub
    email_id, address = await enroll_email(rig, user_id)
    phone_id, number = await enroll_phone(rig, user_id)

    async def session_by(factor_id: str, channel: pb.Channel.ValueType,
                         using: Stub = stub) -> pb.CheckSessionResponse:
        if channel == pb.CHANNEL_EMAIL:
            before = len(rig.mails_to(address))
        else:
            before = len(rig.calls_to(number))
        ch = await using.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=factor_id, purpose=pb.PURPOSE_LOGIN,
            channel=pb.CHANNEL_UNSPECIFIED if channel == pb.CHANNEL_EMAIL else channel,
            application=PORTAL))
        if channel == pb.CHANNEL_EMAIL:
            text = (await eventually(lambda: rig.mails_to(address)[before:]))[-1]\
                .get_content()
        else:
            text = phone_text((await eventually(lambda: rig.calls_to(number)[before:]))[-1])
        spoken = SPOKEN_CODE_RE.search(text)  # a call reads the digits out
        code = spoken.group(0).replace(", ", "") if spoken else code_in(text)
        ok = await using.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=code))
        rig.clock.advance(31)
        resp: pb.CheckSessionResponse = await using.CheckSession(pb.CheckSessionRequest(
            session_token=ok.session.session_token, application=PORTAL))
        return resp

    email = await session_by(email_id, pb.CHANNEL_EMAIL)
    assert (list(email.amr), email.aal2, email.phishing_resistant) == (
        ["email", "mfa"], False, False)
    sms = await session_by(phone_id, pb.CHANNEL_SMS)
    assert (list(sms.amr), sms.aal2) == (["sms", "mfa"], True)
    call = await session_by(phone_id, pb.CHANNEL_VOICE)
    assert (list(call.amr), call.aal2) == (["tel", "mfa"], True)
    # An operator whose policy accepts email says so.
    relaxed = await rig.restart(email_counts_for_aal2=True)
    async with aio.insecure_channel(f"127.0.0.1:{relaxed.port}") as channel:
        from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc

        other: Stub = pb_grpc.TwoFactorServiceStub(channel)
        email = await session_by(email_id, pb.CHANNEL_EMAIL, other)
    assert (list(email.amr), email.aal2) == (["email", "mfa"], True)


# -- settings ------------------------------------------------------------------------------------
def test_the_lifetimes_are_bounded() -> None:
    assert Settings().trusted_device_days == 30
    assert Settings().trusted_device_idle_days == 14
    assert Settings().email_counts_for_aal2 is False
    for bad in ({"trusted_device_days": 91}, {"trusted_device_days": 0},
                {"trusted_device_idle_days": 0},
                {"trusted_device_days": 10, "trusted_device_idle_days": 11},
                {"trusted_device_misses_per_ip": 0}):
        with pytest.raises(ValidationError):
            Settings.model_validate(bad)
    assert Settings.model_validate({"trusted_device_days": 90,
                                    "trusted_device_idle_days": 90}).trusted_device_days == 90
