"""The client package's channel options and error helper (mfa_client), against a real server.

The retry policy is judged by what a portal would notice: CheckSession calls made through
a channel with the shipped service config keep succeeding while the server restarts, and
the same calls on a channel without it fail.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from mfa_client import (
    ErrorReason,
    FieldViolation,
    channel_options,
    error_details,
)

from mfa_service.app import App, create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from tests.support.client import enroll_app, login
from tests.support.config import TEST_KEYRING, make_settings

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

# Each of these may have counted a guess, sent a code or changed a factor when an attempt
# fails on the way back: the channel must never repeat them on its own.


# -- the service config -------------------------------------------------------------------


# -- riding through a restart -------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _check_sessions_across_a_restart(
        database_url: str, clock: FixedClock,
        options: list[tuple[str, str | int]]) -> tuple[int, list[str]]:
    """CheckSession in a loop while the server on a fixed port stops and a new one starts
    on the same database; returns (calls that answered valid, codes of failed calls)."""
    # No drain period (MFA_SHUTDOWN_DRAIN_SECONDS): the
    # restart should be quick, and clients must cope with the stop itself.
    settings = make_settings(database_url, listen_addr=f"127.0.0.1:{_free_port()}",
                             shutdown_drain_seconds=0)
    keyring = Keyring.parse(TEST_KEYRING)
    servers: list[App] = [await create_server(settings, clock=clock, keyring=keyring)]
    valid, failures, done, counted = 0, [], asyncio.Event(), asyncio.Condition()
    try:
        async with aio.insecure_channel(settings.listen_addr, options=options) as channel:
            stub: Stub = pb_grpc.TwoFactorServiceStub(channel)
            factor = await enroll_app(stub, f"user-{uuid.uuid4().hex[:10]}", clock)
            session = await login(stub, factor, clock)
            check = pb.CheckSessionRequest(session_token=session.session_token,
                                           application=pb.APPLICATION_BACKOFFICE)

            async def keep_checking() -> None:
                nonlocal valid
                while not done.is_set():
                    try:
                        answer = await stub.CheckSession(check, timeout=5)
                    except aio.AioRpcError as err:
                        failures.append(err.code().name)
                    else:
                        assert answer.valid and answer.user_id == factor.user_id
                        async with counted:
                            valid += 1
                            counted.notify_all()
                    await asyncio.sleep(0.005)

            async def wait_for_valid(count: int) -> None:
                async with asyncio.timeout(10), counted:
                    await counted.wait_for(lambda: valid >= count)

            checker = asyncio.create_task(keep_checking())
            await wait_for_valid(5)
            await servers[0].stop(0.5)
            servers.append(await create_server(settings, clock=clock, keyring=keyring))
            before = valid
            await wait_for_valid(before + 5)  # the new server answers
            done.set()
            await checker
    finally:
        for server in servers:
            await server.stop(0)
    return valid, failures


async def test_the_shipped_retry_policy_rides_through_a_server_restart(
        sqlite_url: str, fresh_clock: FixedClock) -> None:
    valid, failures = await _check_sessions_across_a_restart(
        sqlite_url, fresh_clock, channel_options())
    assert failures == []
    assert valid >= 10


async def test_without_the_service_config_a_restart_fails_calls(
        sqlite_url: str, fresh_clock: FixedClock) -> None:
    """The control: the same loop on a bare channel sees the restart."""
    valid, failures = await _check_sessions_across_a_restart(
        sqlite_url, fresh_clock, channel_options(retries=False))
    # Refused while no server listens; now and then CANCELLED for a call the stopping
    # server had received but not started (grpc.aio cancels those on stop).
    assert failures and set(failures) <= {"UNAVAILABLE", "CANCELLED"}
    assert "UNAVAILABLE" in failures
    assert valid >= 10


# -- reading errors -----------------------------------------------------------------------
async def test_error_details_reads_the_reason_and_the_bad_fields(stub: Stub) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await stub.ListFactors(pb.ListFactorsRequest(user_id=""))
    details = error_details(err.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == ErrorReason.ERROR_REASON_INVALID_REQUEST
    assert details.reason_name == "ERROR_REASON_INVALID_REQUEST"
    assert details.field_violations == (FieldViolation("user_id", "is required"),)
    assert details.violations_by_field == {"user_id": "is required"}
    assert details.retry_delay is None


async def test_error_details_reads_the_retry_delay(stub: Stub, user_id: str) -> None:
    enrolled = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_EMAIL, email=f"{user_id}@example.com",
        application=pb.APPLICATION_PORTAL))
    with pytest.raises(aio.AioRpcError) as err:  # a second code at once: the cooldown
        await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=enrolled.factor.factor_id,
            purpose=pb.PURPOSE_CONFIRM_ENROLLMENT, application=pb.APPLICATION_PORTAL))
    details = error_details(err.value)
    assert (details.code, details.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                              ErrorReason.ERROR_REASON_RESEND_COOLDOWN)
    assert details.retry_delay == timedelta(seconds=30)
    assert details.field_violations == ()


async def test_an_error_not_from_the_service_has_no_reason() -> None:
    async with aio.insecure_channel(f"127.0.0.1:{_free_port()}") as channel:
        with pytest.raises(aio.AioRpcError) as err:
            await pb_grpc.TwoFactorServiceStub(channel).ListFactors(
                pb.ListFactorsRequest(user_id="alice"), timeout=2)
    details = error_details(err.value)
    assert details.code == grpc.StatusCode.UNAVAILABLE
    assert (details.reason, details.reason_name) == (ErrorReason.ERROR_REASON_UNSPECIFIED, "")
    assert details.retry_delay is None and details.field_violations == ()


