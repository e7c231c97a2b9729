"""Channel options for calling mfa.v1.TwoFactorService: the retry policy and keepalive.

The gRPC service config (``service_config.json``, shipped beside this module) covers the
read-only RPCs only, ``CheckSession`` and ``ListFactors``, so that a server restart, a
rolling update or a dropped connection costs the caller a short wait instead of an error:

- ``waitForReady``: while the channel has no connection (the server is restarting), the
  call waits for one instead of failing at once with ``UNAVAILABLE``;
- ``timeout`` 5 s: the longest such a call waits (a call's own shorter ``timeout=`` wins);
- ``retryPolicy``: an attempt that fails with ``UNAVAILABLE`` (connection lost mid-call,
  database briefly unreachable) or ``CANCELLED`` by the server (a stopping grpc.aio server
  cancels calls it received but had not started yet) is sent again, up to 5 attempts, after
  a random wait below 0.2 s, 0.4 s, 0.8 s, 1.6 s (exponential backoff with full jitter);
- ``retryThrottling``: retries stop while most attempts fail, so a down service is not
  hammered by every client at once.

``Verify``, ``Disable``, ``Enroll`` and ``Challenge`` are never retried or held by the
channel: an attempt the server received may have counted a guess or sent a code, so the
caller decides (``Challenge`` has ``request_id`` for a safe retry). Always pass a deadline.

Keepalive: the client pings an idle connection every 30 s so a dead peer or a dropped NAT
entry is noticed; the server accepts pings every 20 s at most
(``grpc.http2.min_ping_interval_without_data_ms`` in ``mfa_service.app``) and closes the
connection of a client that pings more often, so do not lower ``KEEPALIVE_TIME_MS`` below it.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

SERVICE = "mfa.v1.TwoFactorService"
#: The only RPCs safe to repeat: they read (CheckSession at most slides an idle deadline).
RETRIED_METHODS = ("CheckSession", "ListFactors")
#: The server's ``grpc.http2.min_ping_interval_without_data_ms``.
SERVER_MIN_PING_INTERVAL_MS = 20_000
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
# After a lost connection, try again soon (gRPC's default first wait is 1 s), at most every 5 s.
INITIAL_RECONNECT_BACKOFF_MS = 200
MAX_RECONNECT_BACKOFF_MS = 5_000

ChannelOption = tuple[str, str | int]


def service_config() -> dict[str, Any]:
    """The shipped gRPC service config (retry policy), parsed from ``service_config.json``."""
    text = resources.files(__package__).joinpath("service_config.json").read_text("utf-8")
    config: dict[str, Any] = json.loads(text)
    return config


def channel_options(*, retries: bool = True,
                    extra: list[ChannelOption] | None = None) -> list[ChannelOption]:
    """Options for ``grpc.aio.secure_channel(target, creds, options=...)`` (or any channel).

    Args:
        retries: apply the shipped service config (wait-for-ready, timeout, retries);
            ``False`` leaves it out and turns retries off, e.g. for a load test that
            counts raw errors.
        extra: further options, appended (e.g. ``grpc.ssl_target_name_override``).
    """
    options: list[ChannelOption] = [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # 0 = keep pinging an idle connection (the default stops after two pings).
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]
    if retries:
        options += [("grpc.enable_retries", 1),
                    ("grpc.service_config", json.dumps(service_config()))]
    else:
        options += [("grpc.enable_retries", 0)]
    return options + list(extra or [])
