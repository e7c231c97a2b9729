"""Helpers for calling mfa.v1.TwoFactorService from Python (the portal, the backoffice).

The generated stubs are the ``mfa.v1`` package of this same distribution::

    from grpc import aio
    from mfa.v1 import two_factor_service_pb2 as pb, two_factor_service_pb2_grpc as pb_grpc
    from mfa_client import channel_options, error_details

    channel = aio.secure_channel(target, credentials, options=channel_options())
    stub = pb_grpc.TwoFactorServiceStub(channel)

``channel_options()`` carries the retry policy (``service_config.json``) and keepalive;
``error_details(err)`` turns an ``AioRpcError`` into the ``ErrorReason``, the ``RetryInfo``
delay and the ``BadRequest`` field violations.
"""

from mfa_client.channel import (
    RETRIED_METHODS,
    SERVICE,
    ChannelOption,
    channel_options,
    service_config,
)
from mfa_client.errors import ErrorDetails, ErrorReason, FieldViolation, error_details

__all__ = [
    "RETRIED_METHODS",
    "SERVICE",
    "ChannelOption",
    "ErrorDetails",
    "ErrorReason",
    "FieldViolation",
    "channel_options",
    "error_details",
    "service_config",
]
