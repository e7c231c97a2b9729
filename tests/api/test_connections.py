"""Keepalive and connection age: clients move between workers and replicas.

The kernel (SO_REUSEPORT) and a Kubernetes Service balance connections, not calls. With
``MFA_MAX_CONNECTION_AGE_SECONDS`` the server ends each connection after that long
(GOAWAY, calls in flight finish within the grace period) and the client's next call opens
a new one, which the balancer may send elsewhere.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc

from mfa_service.app import connection_options, create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from tests.support.config import TEST_KEYRING, make_settings


def test_connection_settings_become_server_options(sqlite_url: str) -> None:
    options = dict(connection_options(make_settings(
        sqlite_url, max_connection_age_seconds=120, max_connection_age_grace_seconds=15,
        keepalive_time_seconds=45, keepalive_timeout_seconds=10)))
    assert options["grpc.max_connection_age_ms"] == 120_000
    assert options["grpc.max_connection_age_grace_ms"] == 15_000
    assert options["grpc.keepalive_time_ms"] == 45_000
    assert options["grpc.keepalive_timeout_ms"] == 10_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 20_000
    off = dict(connection_options(make_settings(sqlite_url, max_connection_age_seconds=0)))
    assert "grpc.max_connection_age_ms" not in off


async def test_an_old_connection_is_ended_and_the_next_call_reconnects(
        sqlite_url: str, clock: FixedClock) -> None:
    app = await create_server(
        make_settings(sqlite_url, max_connection_age_seconds=1,
                      max_connection_age_grace_seconds=1),
        clock=clock, keyring=Keyring.parse(TEST_KEYRING))
    try:
        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb_grpc.TwoFactorServiceStub(channel)
            request = pb.ListFactorsRequest(user_id="nobody")
            await stub.ListFactors(request)
            assert channel.get_state() is grpc.ChannelConnectivity.READY
            deadline = time.monotonic() + 10
            # GOAWAY after ~1 s (+-10 %): the channel leaves READY with no call failing.
            while channel.get_state() is grpc.ChannelConnectivity.READY:
                assert time.monotonic() < deadline, "the connection was never aged out"
                await asyncio.sleep(0.1)
            await stub.ListFactors(request)  # a new connection
            assert channel.get_state() is grpc.ChannelConnectivity.READY
    finally:
        await app.stop(0)
