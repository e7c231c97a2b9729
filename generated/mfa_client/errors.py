"""Read the service's errors: AIP-193 ``google.rpc.Status`` details as one small value.

Every error the service raises carries exactly one ``google.rpc.ErrorInfo`` (domain
``mfa.v1``, ``reason`` a name from ``mfa.v1.ErrorReason``), plus ``BadRequest`` field
violations for ``INVALID_ARGUMENT`` and ``RetryInfo`` for ``RESOURCE_EXHAUSTED``. Errors that
did not come from the service (no connection, deadline exceeded, a proxy) have none of them:
their ``reason`` is ``ERROR_REASON_UNSPECIFIED``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from mfa.v1 import error_reason_pb2

DOMAIN = "mfa.v1"
ErrorReason = error_reason_pb2.ErrorReason


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field (``BadRequest.FieldViolation``): ``user_id``, ``is required``."""

    field: str
    description: str


@dataclass(frozen=True)
class ErrorDetails:
    """What a caller needs from an error to decide what to do.

    Attributes:
        code: the gRPC status code.
        message: the status message (uniform text: decide on ``reason``, not on this).
        reason: the ``mfa.v1.ErrorReason`` value; ``ERROR_REASON_UNSPECIFIED`` when the
            error has no ``ErrorInfo`` from this service or names a reason this client
            version does not know (``reason_name`` still has it).
        reason_name: ``ErrorInfo.reason`` as sent, e.g. ``"ERROR_REASON_RESEND_COOLDOWN"``.
        metadata: ``ErrorInfo.metadata``.
        retry_delay: from ``RetryInfo``: wait this long before trying again; ``None`` if
            the error does not say.
        field_violations: from ``BadRequest``, in the order the server listed them.
    """

    code: grpc.StatusCode
    message: str
    reason: error_reason_pb2.ErrorReason.ValueType = ErrorReason.ERROR_REASON_UNSPECIFIED
    reason_name: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    retry_delay: timedelta | None = None
    field_violations: tuple[FieldViolation, ...] = ()

    @property
    def violations_by_field(self) -> dict[str, str]:
        """``{field: description}`` (the last one wins if a field is named twice)."""
        return {v.field: v.description for v in self.field_violations}


def _rich_status(err: Any) -> Any:
    try:
        return rpc_status.from_call(err)
    except ValueError:  # code or message rewritten on the way (a proxy): details untrusted
        return None


def error_details(err: grpc.RpcError) -> ErrorDetails:
    """Decode an error raised by a call (``grpc.aio.AioRpcError`` or a sync ``grpc.RpcError``).

    Example::

        try:
            await stub.ListFactors(request, timeout=2)
        except grpc.aio.AioRpcError as err:
            details = error_details(err)
            if details.reason == ErrorReason.ERROR_REASON_INVALID_REQUEST:
                show(details.violations_by_field)
    """
    # A bare grpc.RpcError (raised by hand, or by an interceptor) carries no status.
    if not callable(getattr(err, "code", None)):
        raise TypeError(f"not an RPC error with a status: {type(err).__name__}")
    code, message = err.code(), err.details() or ""
    status = _rich_status(err)
    if status is None:
        return ErrorDetails(code=code, message=message)
    reason = ErrorReason.ERROR_REASON_UNSPECIFIED
    reason_name, metadata = "", {}
    retry_delay: timedelta | None = None
    violations: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and not reason_name:
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason_name, metadata = info.reason, dict(info.metadata)
            known = ErrorReason.DESCRIPTOR.values_by_name
            if info.domain == DOMAIN and info.reason in known:
                reason = ErrorReason.Value(info.reason)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToTimedelta()
    return ErrorDetails(code=code, message=status.message or message, reason=reason,
                        reason_name=reason_name, metadata=metadata, retry_delay=retry_delay,
                        field_violations=tuple(violations))
