"""The authenticator-app lifecycle through the generated client, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlparse

import grpc
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from sqlalchemy import select

from mfa_service.app import App
from mfa_service.clock import FixedClock
from mfa_service.store.models import factors, sessions
from tests.support.client import challenge, enroll_app, login, rich_error, totp_at
from tests.support.qr import read_png, read_svg

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub



async def test_enroll_returns_pending_factor_with_secret_uri_and_qr(
        stub: Stub, user_id: str) -> None:
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP,
        application=pb.APPLICATION_PORTAL, account_name="alice@example.com"))

    assert resp.factor.status == pb.FACTOR_STATUS_PENDING
    assert resp.factor.method == pb.METHOD_AUTHENTICATOR_APP
    assert resp.factor.user_id == user_id
    assert resp.factor.HasField("created_at") and not resp.factor.HasField("confirmed_at")
    assert resp.challenge_id and resp.code_length == 6
    secret = base64.b32decode(resp.totp_secret + "=" * (-len(resp.totp_secret) % 8))
    assert len(secret) * 8 >= 160
    uri = urlparse(resp.otpauth_uri)
    assert (uri.scheme, uri.netloc) == ("otpauth", "totp")
    assert unquote(uri.path) == "/Cloud Platform:alice@example.com"
    query = parse_qs(uri.query)
    assert query["secret"] == [resp.totp_secret]
    assert query["issuer"] == ["Cloud Platform"]
    assert ET.fromstring(resp.qr_svg).tag.endswith("svg")
    assert resp.qr_png.startswith(b"\x89PNG\r\n\x1a\n")


async def test_qr_code_encodes_the_otpauth_uri(stub: Stub, user_id: str) -> None:
    """Both images, read back as a camera would, give the otpauth URI, secret included."""
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL))
    assert resp.totp_secret in resp.otpauth_uri
    assert read_png(resp.qr_png) == resp.otpauth_uri
    assert read_svg(resp.qr_svg) == resp.otpauth_uri


@pytest.mark.parametrize(("asked", "svg", "png"), [
    (pb.QR_IMAGE_SVG, True, False), (pb.QR_IMAGE_PNG, False, True),
    (pb.QR_IMAGE_NONE, False, False)])
async def test_only_the_qr_image_asked_for_is_drawn(
        stub: Stub, user_id: str, asked: pb.QrImage.ValueType, svg: bool, png: bool) -> None:
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL,
        qr_image=asked))
    assert resp.otpauth_uri and resp.totp_secret  # what the app needs is always there
    assert bool(resp.qr_svg) == svg and bool(resp.qr_png) == png


async def test_an_unknown_qr_image_is_invalid(stub: Stub, user_id: str) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Enroll(pb.EnrollRequest(
            user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP,
            application=pb.APPLICATION_PORTAL, qr_image=99))  # type: ignore[arg-type]
    assert "qr_image" in rich_error(err.value).field_violations


async def test_confirming_with_a_current_code_activates_the_factor(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL))

    wrong = await stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id, code="000000"
                                               if totp_at(resp.totp_secret, fresh_clock)
                                               != "000000" else "111111"))
    assert wrong.result == pb.VERIFY_RESULT_INVALID_CODE
    assert wrong.attempts_remaining == 4
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    assert [f.status for f in listed.factors] == [pb.FACTOR_STATUS_PENDING]

    ok = await stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id,
                                            code=totp_at(resp.totp_secret, fresh_clock)))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    assert ok.factor.status == pb.FACTOR_STATUS_ACTIVE
    assert ok.factor.HasField("confirmed_at")
    assert not ok.HasField("session")
    # The first active factor comes with 10 recovery codes, shown once.
    assert len(ok.recovery_codes) == 10
    assert len(set(ok.recovery_codes)) == 10

    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    first = listed.factors[0]
    assert (first.factor_id, first.method, first.status) == (
        resp.factor.factor_id, pb.METHOD_AUTHENTICATOR_APP, pb.FACTOR_STATUS_ACTIVE)
    assert [(f.method, f.status) for f in listed.factors][1:] == [
        (pb.METHOD_RECOVERY_CODE, pb.FACTOR_STATUS_ACTIVE)]
    assert listed.recovery_codes_remaining == 10


async def test_spaces_in_a_typed_code_are_ignored(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL))
    code = totp_at(resp.totp_secret, fresh_clock)
    typed = f" {code[:3]} {code[3:]} "
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id, code=typed))
    assert ok.result == pb.VERIFY_RESULT_APPROVED


async def test_login_session_is_honoured_by_both_applications(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    session = await login(stub, factor, fresh_clock, pb.APPLICATION_PORTAL)

    assert len(session.session_token) >= 43  # 256 bits, base64url
    assert session.user_id == user_id
    assert session.method == pb.METHOD_AUTHENTICATOR_APP
    assert session.application == pb.APPLICATION_PORTAL
    for asking in (pb.APPLICATION_PORTAL, pb.APPLICATION_BACKOFFICE):
        check = await stub.CheckSession(pb.CheckSessionRequest(
            session_token=session.session_token, application=asking))
        assert check.valid
        assert check.user_id == user_id
        assert check.application == pb.APPLICATION_PORTAL  # where 2FA was passed
        assert check.method == pb.METHOD_AUTHENTICATOR_APP


async def test_backoffice_login_is_honoured_by_portal(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    session = await login(stub, factor, fresh_clock, pb.APPLICATION_BACKOFFICE)
    check = await stub.CheckSession(pb.CheckSessionRequest(
        session_token=session.session_token, application=pb.APPLICATION_PORTAL))
    assert check.valid and check.application == pb.APPLICATION_BACKOFFICE


async def test_unknown_token_is_not_valid_and_not_an_error(stub: Stub) -> None:
    check = await stub.CheckSession(pb.CheckSessionRequest(
        session_token="not-a-real-token", application=pb.APPLICATION_PORTAL))
    assert check.valid is False and check.user_id == ""


async def test_a_code_is_accepted_once_replay_is_refused(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    code = totp_at(factor.secret, fresh_clock)
    first = await challenge(stub, factor)
    assert (await stub.Verify(pb.VerifyRequest(challenge_id=first.challenge_id, code=code))
            ).result == pb.VERIFY_RESULT_APPROVED

    second = await challenge(stub, factor, pb.PURPOSE_LOGIN, pb.APPLICATION_BACKOFFICE)
    replay = await stub.Verify(pb.VerifyRequest(challenge_id=second.challenge_id, code=code))
    assert replay.result == pb.VERIFY_RESULT_INVALID_CODE
    # An older step (still inside the +-1 window) is a replay too (RFC 6238 5.2).
    older = await stub.Verify(pb.VerifyRequest(
        challenge_id=second.challenge_id, code=totp_at(factor.secret, fresh_clock, -1)))
    assert older.result == pb.VERIFY_RESULT_INVALID_CODE

    fresh_clock.advance(30)
    fresh = await stub.Verify(pb.VerifyRequest(
        challenge_id=second.challenge_id, code=totp_at(factor.secret, fresh_clock)))
    assert fresh.result == pb.VERIFY_RESULT_APPROVED


async def test_window_is_one_step_each_way(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    fresh_clock.advance(120)  # well past the confirmation step

    async def try_code(steps: int) -> int:
        ch = await challenge(stub, factor)
        resp = await stub.Verify(pb.VerifyRequest(
            challenge_id=ch.challenge_id, code=totp_at(factor.secret, fresh_clock, steps)))
        return resp.result

    assert await try_code(-2) == pb.VERIFY_RESULT_INVALID_CODE
    assert await try_code(-1) == pb.VERIFY_RESULT_APPROVED  # one step of drift behind
    assert await try_code(+2) == pb.VERIFY_RESULT_INVALID_CODE
    assert await try_code(+1) == pb.VERIFY_RESULT_APPROVED  # one step ahead


async def test_five_wrong_codes_end_the_challenge(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    ch = await challenge(stub, factor)
    right = totp_at(factor.secret, fresh_clock)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    seen = []
    for _ in range(5):
        resp = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=wrong))
        seen.append((resp.result, resp.attempts_remaining))
    assert seen == [(pb.VERIFY_RESULT_INVALID_CODE, 4), (pb.VERIFY_RESULT_INVALID_CODE, 3),
                    (pb.VERIFY_RESULT_INVALID_CODE, 2), (pb.VERIFY_RESULT_INVALID_CODE, 1),
                    (pb.VERIFY_RESULT_MAX_ATTEMPTS_REACHED, 0)]
    # Five consecutive failures also lock the user out for a minute (all challenges)...
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=right))
    e = rich_error(err.value)
    assert (e.code, e.reason, e.retry_seconds) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "ERROR_REASON_USER_LOCKED_OUT", 60)
    fresh_clock.advance(60)
    # ...and the challenge itself stays closed for good.
    after = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=right))
    assert (after.result, after.attempts_remaining) == (pb.VERIFY_RESULT_MAX_ATTEMPTS_REACHED, 0)
    assert not after.HasField("session")


async def test_expired_challenge(stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    ch = await challenge(stub, factor)
    assert ch.expires_at.ToDatetime().timestamp() - fresh_clock.now().timestamp() == 300
    fresh_clock.advance(301)
    resp = await stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, code=totp_at(factor.secret, fresh_clock)))
    assert resp.result == pb.VERIFY_RESULT_EXPIRED


async def test_approved_or_replaced_challenge_reports_already_used(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    old = await challenge(stub, factor)
    new = await challenge(stub, factor)
    code = totp_at(factor.secret, fresh_clock)
    replaced = await stub.Verify(pb.VerifyRequest(challenge_id=old.challenge_id, code=code))
    assert replaced.result == pb.VERIFY_RESULT_ALREADY_USED
    assert (await stub.Verify(pb.VerifyRequest(challenge_id=new.challenge_id, code=code))
            ).result == pb.VERIFY_RESULT_APPROVED
    fresh_clock.advance(30)
    again = await stub.Verify(pb.VerifyRequest(
        challenge_id=new.challenge_id, code=totp_at(factor.secret, fresh_clock)))
    assert again.result == pb.VERIFY_RESULT_ALREADY_USED


async def test_request_id_makes_challenge_idempotent(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    req = pb.ChallengeRequest(user_id=user_id, factor_id=factor.factor_id,
                              purpose=pb.PURPOSE_LOGIN, application=pb.APPLICATION_PORTAL,
                              request_id="retry-1")
    first, second = await stub.Challenge(req), await stub.Challenge(req)
    assert first.challenge_id == second.challenge_id
    req.purpose = pb.PURPOSE_DISABLE
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Challenge(req)
    assert rich_error(err.value).reason == "ERROR_REASON_REQUEST_ID_REUSED"


async def test_session_idle_timeout_slides_and_expires(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    session = await login(stub, factor, fresh_clock)
    token = session.session_token
    check = pb.CheckSessionRequest(session_token=token, application=pb.APPLICATION_BACKOFFICE)
    # Checked every 29 minutes, it stays alive past the first idle deadline...
    for _ in range(3):
        fresh_clock.advance(29 * 60)
        assert (await stub.CheckSession(check)).valid
    # ...and dies after 30 idle minutes.
    fresh_clock.advance(30 * 60 + 1)
    assert not (await stub.CheckSession(check)).valid


async def test_check_session_reports_the_idle_deadline_as_it_slides(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """Each answer says when the session idles out now, not when it did at an earlier
    check: CheckSession keeps built answers (transport/servicer.py), and one kept from
    before a slide must not be served after it."""
    factor = await enroll_app(stub, user_id, fresh_clock)
    session = await login(stub, factor, fresh_clock)
    check = pb.CheckSessionRequest(session_token=session.session_token,
                                   application=pb.APPLICATION_PORTAL)
    seen = []
    for _ in range(3):
        first = await stub.CheckSession(check)
        again = await stub.CheckSession(check)  # the same answer, from memory or not
        assert first == again
        assert first.idle_expires_at.ToDatetime().timestamp() == pytest.approx(
            fresh_clock.now().timestamp() + 30 * 60, abs=60)
        seen.append(first.idle_expires_at.ToDatetime())
        fresh_clock.advance(5 * 60)
    assert seen == sorted(set(seen))  # it moved at every check five minutes apart


async def test_session_absolute_lifetime_is_twelve_hours(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    session = await login(stub, factor, fresh_clock)
    authenticated = session.authenticated_at.ToDatetime().timestamp()
    assert session.expires_at.ToDatetime().timestamp() - authenticated == 12 * 3600
    assert session.idle_expires_at.ToDatetime().timestamp() - authenticated == 30 * 60
    check = pb.CheckSessionRequest(session_token=session.session_token,
                                   application=pb.APPLICATION_PORTAL)
    last = None
    while fresh_clock.now().timestamp() < authenticated + 12 * 3600 - 20 * 60:
        fresh_clock.advance(20 * 60)
        last = await stub.CheckSession(check)
        assert last.valid
    assert last is not None
    # The idle deadline is never pushed past the absolute one.
    assert last.idle_expires_at.ToDatetime() <= last.expires_at.ToDatetime()
    fresh_clock.set(session.expires_at.ToDatetime().replace(tzinfo=fresh_clock.now().tzinfo))
    assert not (await stub.CheckSession(check)).valid


async def test_revoke_one_session_then_all(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    one = await login(stub, factor, fresh_clock, pb.APPLICATION_PORTAL)
    two = await login(stub, factor, fresh_clock, pb.APPLICATION_BACKOFFICE)
    three = await login(stub, factor, fresh_clock, pb.APPLICATION_PORTAL)

    revoked = await stub.RevokeSession(pb.RevokeSessionRequest(session_token=one.session_token))
    assert revoked.revoked_count == 1
    assert not (await stub.CheckSession(pb.CheckSessionRequest(
        session_token=one.session_token, application=pb.APPLICATION_BACKOFFICE))).valid
    again = await stub.RevokeSession(pb.RevokeSessionRequest(session_token=one.session_token))
    assert again.revoked_count == 0

    everything = await stub.RevokeSession(pb.RevokeSessionRequest(user_id=user_id))
    assert everything.revoked_count == 2
    for s in (two, three):
        assert not (await stub.CheckSession(pb.CheckSessionRequest(
            session_token=s.session_token, application=pb.APPLICATION_PORTAL))).valid


async def test_log_out_everywhere_else_keeps_the_session_asking(
        stub: Stub, user_id: str, fresh_clock: FixedClock, app: App) -> None:
    """ASVS V7.4.3: after changing a factor the user ends every other session and stays
    logged in where they are. Another user's token keeps nothing."""
    factor = await enroll_app(stub, user_id, fresh_clock)
    here = await login(stub, factor, fresh_clock, pb.APPLICATION_PORTAL)
    others = [await login(stub, factor, fresh_clock, application)
              for application in (pb.APPLICATION_PORTAL, pb.APPLICATION_BACKOFFICE)]
    stranger = await login(stub, await enroll_app(stub, user_id + "-x", fresh_clock),
                           fresh_clock, pb.APPLICATION_PORTAL)

    ended = await stub.RevokeSession(pb.RevokeSessionRequest(
        user_id=user_id, keep_session_token=here.session_token))

    assert ended.revoked_count == 2

    async def valid(token: str) -> bool:
        return (await stub.CheckSession(pb.CheckSessionRequest(
            session_token=token, application=pb.APPLICATION_PORTAL))).valid
    assert await valid(here.session_token)
    assert not any([await valid(o.session_token) for o in others])
    async with app.database.transaction() as tx:
        [event, *_] = await tx.audit.page(user_id)
    assert (event.event, event.detail["scope"]) == ("session_revoked", "all_other_sessions")
    # A token that is not one of this user's sessions keeps nothing of theirs.
    last = await stub.RevokeSession(pb.RevokeSessionRequest(
        user_id=user_id, keep_session_token=stranger.session_token))
    assert last.revoked_count == 1 and not await valid(here.session_token)
    assert await valid(stranger.session_token)
    with pytest.raises(aio.AioRpcError) as err:
        await stub.RevokeSession(pb.RevokeSessionRequest(
            session_token=stranger.session_token, keep_session_token=here.session_token))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "keep_session_token" in rich_error(err.value).field_violations


async def test_disable_needs_a_current_code_from_the_app(
        stub: Stub, user_id: str, fresh_clock: FixedClock, app: App) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    ch = await challenge(stub, factor, pb.PURPOSE_DISABLE)
    assert ch.channel == pb.CHANNEL_NONE and ch.code_length == 6
    right = totp_at(factor.secret, fresh_clock)
    wrong = f"{(int(right) + 7) % 1_000_000:06d}"
    refused = await stub.Disable(pb.DisableRequest(
        user_id=user_id, factor_id=factor.factor_id, challenge_id=ch.challenge_id, code=wrong))
    assert refused.result == pb.VERIFY_RESULT_INVALID_CODE and refused.attempts_remaining == 4
    assert not refused.HasField("factor")

    done = await stub.Disable(pb.DisableRequest(
        user_id=user_id, factor_id=factor.factor_id, challenge_id=ch.challenge_id, code=right))
    assert done.result == pb.VERIFY_RESULT_APPROVED
    assert done.factor.status == pb.FACTOR_STATUS_DISABLED
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    # The last real factor took the recovery codes with it: 2FA is off.
    assert [(f.method, f.status) for f in listed.factors] == [
        (pb.METHOD_AUTHENTICATOR_APP, pb.FACTOR_STATUS_DISABLED),
        (pb.METHOD_RECOVERY_CODE, pb.FACTOR_STATUS_DISABLED)]
    assert listed.factors[0].HasField("disabled_at")
    assert listed.recovery_codes_remaining == 0

    # The secret is gone from the database (crypto-shredded), and the factor is dead.
    async with app.database.engine.connect() as conn:
        row = (await conn.execute(select(factors).where(
            factors.c.id == factor.factor_id))).one()
    assert row.secret_ciphertext is None
    with pytest.raises(aio.AioRpcError) as err:
        await challenge(stub, factor)
    e = rich_error(err.value)
    assert (e.code, e.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                  "ERROR_REASON_FACTOR_DISABLED")


async def test_disable_refuses_a_login_challenge_and_other_users(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    login_ch = await challenge(stub, factor)
    code = totp_at(factor.secret, fresh_clock)
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Disable(pb.DisableRequest(user_id=user_id, factor_id=factor.factor_id,
                                             challenge_id=login_ch.challenge_id, code=code))
    e = rich_error(err.value)
    assert (e.code, e.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                  "ERROR_REASON_CHALLENGE_MISMATCH")
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Disable(pb.DisableRequest(user_id="someone-else", factor_id=factor.factor_id,
                                             challenge_id=login_ch.challenge_id, code=code))
    assert rich_error(err.value).code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Challenge(pb.ChallengeRequest(
            user_id="someone-else", factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_PORTAL))
    assert rich_error(err.value).reason == "ERROR_REASON_FACTOR_NOT_FOUND"


async def test_login_on_a_pending_factor_is_refused(stub: Stub, user_id: str) -> None:
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL))
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=resp.factor.factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_PORTAL))
    e = rich_error(err.value)
    assert (e.code, e.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                  "ERROR_REASON_FACTOR_STATUS_FORBIDS")


async def test_second_app_while_one_is_active_is_refused(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    session = await login(stub, factor, fresh_clock)
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Enroll(pb.EnrollRequest(user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP,
                                           application=pb.APPLICATION_PORTAL,
                                           session_token=session.session_token))
    e = rich_error(err.value)
    assert (e.code, e.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                  "ERROR_REASON_ALREADY_ENROLLED")


async def test_reenrolling_replaces_an_unconfirmed_factor(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    first = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL))
    second = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL))
    assert first.totp_secret != second.totp_secret
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Verify(pb.VerifyRequest(challenge_id=first.challenge_id,
                                           code=totp_at(first.totp_secret, fresh_clock)))
    assert rich_error(err.value).reason == "ERROR_REASON_FACTOR_DISABLED"
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    assert {f.factor_id: f.status for f in listed.factors} == {
        first.factor.factor_id: pb.FACTOR_STATUS_DISABLED,
        second.factor.factor_id: pb.FACTOR_STATUS_PENDING}


async def test_secrets_and_tokens_are_not_stored_in_plaintext(
        stub: Stub, user_id: str, fresh_clock: FixedClock, app: App) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    session = await login(stub, factor, fresh_clock)
    raw_secret = base64.b32decode(factor.secret + "=" * (-len(factor.secret) % 8))
    async with app.database.engine.connect() as conn:
        f = (await conn.execute(select(factors).where(factors.c.id == factor.factor_id))).one()
        s = (await conn.execute(select(sessions).where(sessions.c.user_id == user_id))).one()
    dumped = repr(tuple(f)) + repr(tuple(s))
    assert factor.secret not in dumped and session.session_token not in dumped
    assert raw_secret not in f.secret_ciphertext
    assert session.session_token.encode() not in s.token_hash
    assert len(s.token_hash) == 32  # HMAC-SHA256


async def test_concurrent_verifies_approve_a_code_once(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """Ten parallel Verify calls with the right code: exactly one session."""
    factor = await enroll_app(stub, user_id, fresh_clock)
    ch = await challenge(stub, factor)
    code = totp_at(factor.secret, fresh_clock)
    results = await asyncio.gather(*[
        stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=code))
        for _ in range(10)])
    approved = [r for r in results if r.result == pb.VERIFY_RESULT_APPROVED]
    assert len(approved) == 1
    assert {r.result for r in results} - {pb.VERIFY_RESULT_APPROVED} <= {
        pb.VERIFY_RESULT_ALREADY_USED}


async def test_concurrent_replay_across_challenges_is_accepted_once(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """One code raced on the open LOGIN and DISABLE challenges: the database lets one through."""
    factor = await enroll_app(stub, user_id, fresh_clock)
    targets = [await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=factor.factor_id, purpose=p,
        application=pb.APPLICATION_PORTAL)) for p in (pb.PURPOSE_LOGIN, pb.PURPOSE_DISABLE)]
    code = totp_at(factor.secret, fresh_clock)
    results = await asyncio.gather(*[
        stub.Verify(pb.VerifyRequest(challenge_id=c.challenge_id, code=code))
        for _ in range(4) for c in targets], return_exceptions=True)
    approved = [r for r in results
                if isinstance(r, pb.VerifyResponse) and r.result == pb.VERIFY_RESULT_APPROVED]
    assert len(approved) == 1
    for r in results:  # the losers saw a used code, or a factor disabled under them
        if isinstance(r, aio.AioRpcError):
            assert rich_error(r).reason == "ERROR_REASON_FACTOR_DISABLED"


async def test_concurrent_wrong_guesses_never_exceed_the_limit(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    ch = await challenge(stub, factor)
    right = totp_at(factor.secret, fresh_clock)
    wrongs = [f"{(int(right) + i) % 1_000_000:06d}" for i in range(1, 21)]
    results = await asyncio.gather(*[
        stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=w)) for w in wrongs],
        return_exceptions=True)
    answers = [r for r in results if isinstance(r, pb.VerifyResponse)]
    refused = [rich_error(r).reason for r in results if isinstance(r, aio.AioRpcError)]
    counted = [r for r in answers if r.result == pb.VERIFY_RESULT_INVALID_CODE]
    assert sorted(r.attempts_remaining for r in counted) == [1, 2, 3, 4]
    assert [r.result for r in answers if r not in counted] == [
        pb.VERIFY_RESULT_MAX_ATTEMPTS_REACHED]
    # The fifth failure locked the user: every other guess was refused outright.
    assert refused == ["ERROR_REASON_USER_LOCKED_OUT"] * 15
