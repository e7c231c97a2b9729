"""The longest value validation accepts is one the store keeps, on both databases.

PostgreSQL enforces VARCHAR lengths and refuses NUL in text; SQLite does neither. A value
validation let through but the column could not hold answered INTERNAL on PostgreSQL only
(found by tests/test_fuzz.py): a 129-character email address, a 21-character locale, an
IPv6 client address with a long (or NUL) scope id. Each limit is tried at its length and
one past it.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb

from mfa_service.clock import FixedClock
from tests.conftest import challenge, enroll_app, rich_error

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


async def test_a_locale_of_the_longest_accepted_length_is_kept(
        stub: Stub, user_id: str) -> None:
    locale = "abc-abcdef-abcde"  # 16
    await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL,
        locale=locale))
    await expect_invalid(stub.Enroll(pb.EnrollRequest(
        user_id=f"{user_id}-2", method=pb.METHOD_AUTHENTICATOR_APP,
        application=pb.APPLICATION_PORTAL, locale="abc-abcdefg-abcde")), "locale")


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
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    long_user = (user_id + "-" + "u" * 128)[:128]
    enrolled = await stub.Enroll(pb.EnrollRequest(
        user_id=long_user, method=pb.METHOD_AUTHENTICATOR_APP,
        application=pb.APPLICATION_PORTAL, account_name="a" * 128))
    assert enrolled.factor.user_id == long_user
    factor = await enroll_app(stub, user_id, fresh_clock)
    opened = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL, request_id="r" * 64))
    assert opened.challenge_id
