"""Domain errors -> google.rpc.Status (AIP-193), decided once, by exception class."""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from mfa.v1.error_reason_pb2 import ErrorReason

from mfa_service.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MfaError,
    NotFound,
    NotSupported,
    PermissionDenied,
    ResourceExhausted,
    StoreConflict,
    StoreError,
    StoreUnavailable,
    Unauthenticated,
)

DOMAIN = "mfa.v1"

# Walked along the exception's MRO, so a subclass inherits its parent's status.
_STATUS_BY_CLASS: dict[type[MfaError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    NotSupported: grpc.StatusCode.UNIMPLEMENTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    StoreConflict: grpc.StatusCode.ABORTED,
    StoreError: grpc.StatusCode.INTERNAL,
}


def status_code_for(exc: MfaError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in _STATUS_BY_CLASS:
            return _STATUS_BY_CLASS[cls]
    return grpc.StatusCode.INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_grpc_status(exc: MfaError) -> grpc.Status:
    """A grpc.Status carrying google.rpc.Status with ErrorInfo (+ BadRequest / RetryInfo)."""
    code = status_code_for(exc)
    details = [_pack(error_details_pb2.ErrorInfo(
        reason=exc.reason_name, domain=DOMAIN, metadata=exc.metadata))]
    if isinstance(exc, InvalidArgument):
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in exc.violations])))
    if isinstance(exc, ResourceExhausted):
        details.append(_pack(error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=math.ceil(exc.retry_after_seconds)))))
    message = exc.message
    if isinstance(exc, InvalidArgument):
        message = "; ".join(f"{v.field}: {v.description}" for v in exc.violations)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message,
                               details=details)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def internal_status() -> grpc.Status:
    """What a caller sees for a fault of ours: no detail of the cause leaks."""
    status = status_pb2.Status(
        code=code_pb2.INTERNAL, message="internal error; it has been logged",
        details=[_pack(error_details_pb2.ErrorInfo(
            reason=ErrorReason.Name(ErrorReason.ERROR_REASON_INTERNAL), domain=DOMAIN))])
    result: grpc.Status = rpc_status.to_status(status)
    return result
