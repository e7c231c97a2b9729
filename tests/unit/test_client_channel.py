"""The client package's shipped service config and channel options (mfa_client), read
without a server: only the read RPCs are retried, the keepalive fits the server's minimum,
and error_details refuses what is not a call's error. (Against a real server:
tests/api/test_client_channel.py.)"""

from __future__ import annotations

import json

import grpc
import pytest
from mfa.v1 import two_factor_service_pb2 as pb
from mfa_client import (
    RETRIED_METHODS,
    channel_options,
    error_details,
    service_config,
)
from mfa_client import channel as client_channel

from mfa_service.app import connection_options
from mfa_service.settings import Settings
from tests.support.config import REPO

SERVICE = "mfa.v1.TwoFactorService"


NEVER_RETRIED = {"Enroll", "Challenge", "Verify", "Disable", "RevokeSession",
                 "RegenerateRecoveryCodes", "RecognizeDevice", "ForgetDevice"}


def _method_configs() -> dict[str, dict[str, object]]:
    by_method: dict[str, dict[str, object]] = {}
    for config in service_config()["methodConfig"]:
        for name in config["name"]:
            assert name["service"] == SERVICE
            by_method[name["method"]] = config
    return by_method


def test_only_the_read_rpcs_are_retried_and_only_on_unavailable() -> None:
    configs = _method_configs()
    assert set(configs) == set(RETRIED_METHODS) == {"CheckSession", "ListFactors"}
    rpcs = {m.name for m in pb.DESCRIPTOR.services_by_name["TwoFactorService"].methods}
    # A new RPC is a decision: retried (add it to the config) or not (add it here).
    assert rpcs == set(configs) | NEVER_RETRIED | {"ListAuditEvents", "ListDevices"}
    for config in configs.values():
        policy = config["retryPolicy"]
        assert isinstance(policy, dict)
        # UNAVAILABLE: no connection, or the database briefly away. CANCELLED: a call the
        # stopping server received but never started (grpc.aio cancels those on stop);
        # safe to repeat for these reads only.
        assert policy["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
        assert 2 <= policy["maxAttempts"] <= 5  # gRPC caps attempts at 5
        assert policy["backoffMultiplier"] > 1  # exponential
        assert config["waitForReady"] is True


def test_channel_options_carry_the_shipped_file_and_keepalive_the_server_accepts() -> None:
    options = dict(channel_options())
    shipped = (REPO / "generated/mfa_client/service_config.json").read_text("utf-8")
    assert json.loads(str(options["grpc.service_config"])) == json.loads(shipped)
    assert options["grpc.enable_retries"] == 1
    # The server closes connections that ping more often than its minimum interval.
    # (MFA_KEEPALIVE_MIN_CLIENT_PING_SECONDS, by default, as the server's option.)
    default = Settings.model_fields["keepalive_min_client_ping_seconds"].default
    server_min = dict(connection_options(Settings.model_validate(
        {"keepalive_min_client_ping_seconds": default})))
    assert server_min["grpc.http2.min_ping_interval_without_data_ms"] == (
        client_channel.SERVER_MIN_PING_INTERVAL_MS)
    assert int(options["grpc.keepalive_time_ms"]) >= client_channel.SERVER_MIN_PING_INTERVAL_MS
    assert "grpc.service_config" not in dict(channel_options(retries=False))


def test_a_bare_rpc_error_is_refused() -> None:
    with pytest.raises(TypeError, match="RpcError"):
        error_details(grpc.RpcError())
