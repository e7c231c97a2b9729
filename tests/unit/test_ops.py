"""Error reasons, without a server: every reason an error class states is a value of the
proto's ErrorReason, and a deadline the server hit names its reason. (Health and reflection
through the real server: tests/api/test_ops.py.)"""

from __future__ import annotations

import pytest
from mfa.v1 import error_reason_pb2

from mfa_service import errors


def test_every_error_reason_is_a_value_of_the_proto_enum() -> None:
    """Reasons are ErrorReason values, so a reason the proto lacks cannot be raised; every
    class that states one states a named value, and the two whose reason depends on the
    situation have no default."""
    pending: list[type[errors.MfaError]] = [errors.MfaError]
    named = set()
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "reason" in vars(cls):
            named.add(error_reason_pb2.ErrorReason.Name(vars(cls)["reason"]))
    assert {"ERROR_REASON_INVALID_REQUEST", "ERROR_REASON_FACTOR_NOT_FOUND",
            "ERROR_REASON_STORE_UNAVAILABLE", "ERROR_REASON_INTERNAL"} <= named
    with pytest.raises(TypeError):
        errors.FailedPrecondition("no reason given")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        errors.MfaError("no reason given")


def test_a_deadline_the_server_hit_names_its_reason() -> None:
    """What a caller reads when the server, not its own timer, ended the call."""
    from google.rpc import error_details_pb2, status_pb2

    from mfa_service.transport.status import status_code_for, to_grpc_status

    exc = errors.DeadlineExceeded()
    assert status_code_for(exc).name == "DEADLINE_EXCEEDED"
    [(_, blob)] = [m for m in to_grpc_status(exc).trailing_metadata
                   if m[0] == "grpc-status-details-bin"]
    info = error_details_pb2.ErrorInfo()
    status_pb2.Status.FromString(blob).details[0].Unpack(info)
    assert info.reason == "ERROR_REASON_DEADLINE_EXCEEDED"
