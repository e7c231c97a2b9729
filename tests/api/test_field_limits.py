"""The longest value validation accepts is one the store keeps, on both databases.

PostgreSQL enforces VARCHAR lengths and refuses NUL in text; SQLite does neither. A value
validation let through but the column could not hold answered INTERNAL on PostgreSQL only
(found by tests/api/test_fuzz.py): a 129-character email address, a 21-character locale, an
IPv6 client address with a long (or NUL) scope id. Each limit is tried at its length and
one past it.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import grpc
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from sqlalchemy import select

from mfa_service.app import App
from mfa_service.clock import FixedClock
from mfa_service.store.models import challenges, factors
from tests.support.client import challenge, enroll_app, rich_error

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub


def email_of_length(n: int) -> str:
    """A valid, unique address of exactly ``n`` characters (at least 40)."""
    domain = "example.com"
    local = uuid.uuid4().hex + "x" * (n - 32 - 1 - len(domain))
    address = f"{local}@{domain}"
    assert len(address) == n
    return address


async def expect_invalid(call: object, field: str) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    e = rich_error(err.value)
    assert (e.code, set(e.field_violations)) == (grpc.StatusCode.INVALID_ARGUMENT, {field})


async def test_an_email_address_of_the_longest_accepted_length_is_kept(
        stub: Stub, user_id: str) -> None:
    address = email_of_length(125)
    enrolled = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_EMAIL, email=address,
        application=pb.APPLICATION_PORTAL))
    assert enrolled.factor.masked_destination.endswith("@example.com")
    await expect_invalid(stub.Enroll(pb.EnrollRequest(
        user_id=f"{user_id}-2", method=pb.METHOD_EMAIL, email=email_of_length(126),
        application=pb.APPLICATION_PORTAL)), "email")


async def factor_row(app: App, factor_id: str) -> Any:
    async with app.database.engine.connect() as conn:
        return (await conn.execute(select(factors).where(factors.c.id == factor_id))).one()


async def test_a_locale_of_the_longest_accepted_length_is_kept(
        app: App, stub: Stub, user_id: str) -> None:
    locale = "abc-abcdef-abcde"  # 16
    enrolled = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL,
        locale=locale))
    assert (await factor_row(app, enrolled.factor.factor_id)).locale == locale
    await expect_invalid(stub.Enroll(pb.EnrollRequest(
        user_id=f"{user_id}-2", method=pb.METHOD_AUTHENTICATOR_APP,
        application=pb.APPLICATION_PORTAL, locale="abc-abcdefg-abcde")), "locale")
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=f"{user_id}-2"))
    assert list(listed.factors) == []


@pytest.mark.parametrize(("client_ip", "accepted"), [
    pytest.param("fe80::1%" + "e" * 56, True, id="scoped-ipv6-64-chars"),
    pytest.param("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", True, id="longest-plain"),
    pytest.param("fe80::1%" + "e" * 57, False, id="scoped-ipv6-65-chars"),
    pytest.param("fe80::1%\x00", False, id="scope-with-nul"),
    pytest.param("fe80::1%\u202e", False, id="scope-with-rtl-override"),
])
async def test_client_ip_is_an_address_the_audit_trail_can_hold(
        stub: Stub, user_id: str, fresh_clock: FixedClock, client_ip: str,
        accepted: bool) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    opened = await challenge(stub, factor)
    request = pb.VerifyRequest(challenge_id=opened.challenge_id, code="000000",
                               client_ip=client_ip, user_agent="u" * 512)
    if accepted:
        answer = await stub.Verify(request)
        assert answer.result in (pb.VERIFY_RESULT_INVALID_CODE, pb.VERIFY_RESULT_APPROVED)
    else:
        await expect_invalid(stub.Verify(request), "client_ip")


async def test_the_other_stored_fields_at_their_limits(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """user_id (128), account_name (128) and request_id (64) are stored whole, and one
    character more is INVALID_ARGUMENT on that field."""
    long_user = (user_id + "-" + "u" * 128)[:128]
    enrolled = await stub.Enroll(pb.EnrollRequest(
        user_id=long_user, method=pb.METHOD_AUTHENTICATOR_APP,
        application=pb.APPLICATION_PORTAL, account_name="a" * 128))
    assert enrolled.factor.user_id == long_user
    row = await factor_row(app, enrolled.factor.factor_id)
    assert (row.user_id, row.label) == (long_user, "a" * 128)
    assert "a" * 128 in unquote(enrolled.otpauth_uri)
    await expect_invalid(stub.Enroll(pb.EnrollRequest(
        user_id=long_user + "u", method=pb.METHOD_AUTHENTICATOR_APP,
        application=pb.APPLICATION_PORTAL)), "user_id")
    await expect_invalid(stub.Enroll(pb.EnrollRequest(
        user_id=f"{user_id}-3", method=pb.METHOD_AUTHENTICATOR_APP,
        application=pb.APPLICATION_PORTAL, account_name="a" * 129)), "account_name")

    factor = await enroll_app(stub, user_id, fresh_clock)
    request = pb.ChallengeRequest(
        user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL, request_id="r" * 64)
    opened = await stub.Challenge(request)
    async with app.database.engine.connect() as conn:
        stored = await conn.scalar(select(challenges.c.request_id).where(
            challenges.c.id == opened.challenge_id))
    assert stored == "r" * 64
    # The retry that the whole id exists for finds the same challenge.
    assert (await stub.Challenge(request)).challenge_id == opened.challenge_id
    request.request_id = "r" * 65
    await expect_invalid(stub.Challenge(request), "request_id")


async def test_a_device_label_of_the_longest_accepted_length_is_kept(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """64 characters, non-ASCII ones too (a VARCHAR(64) counts characters, not bytes)."""
    from tests.conftest import totp_at

    factor = await enroll_app(stub, user_id, fresh_clock)
    label = ("Safari på iPhone – Ærøskøbing " * 3)[:64]
    ch = await challenge(stub, factor)
    ok = await stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, code=totp_at(factor.secret, fresh_clock),
        remember_device=True, device_label=label))
    assert ok.device.label == label
    listed = await stub.ListDevices(pb.ListDevicesRequest(user_id=user_id))
    assert [d.label for d in listed.devices] == [label]
    fresh_clock.advance(30)
    ch = await challenge(stub, factor)
    await expect_invalid(stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, code=totp_at(factor.secret, fresh_clock),
        remember_device=True, device_label=label + "x")), "device_label")
