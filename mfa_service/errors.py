"""The exception tree of mfa-service, translated to gRPC once, in the transport layer.

::

    MfaError                     reason (ErrorReason name)            gRPC status
     ├── InvalidArgument         ERROR_REASON_INVALID_REQUEST         INVALID_ARGUMENT+BadRequest
     ├── NotFound
     │    ├── FactorNotFound     ERROR_REASON_FACTOR_NOT_FOUND        NOT_FOUND
     │    ├── ChallengeNotFound  ERROR_REASON_CHALLENGE_NOT_FOUND     NOT_FOUND
     │    └── DeviceNotFound     ERROR_REASON_DEVICE_NOT_FOUND        NOT_FOUND
     ├── FailedPrecondition      (reason required at each raise)      FAILED_PRECONDITION
     ├── ResourceExhausted       (reason required at each raise)      RESOURCE_EXHAUSTED+RetryInfo
     ├── Unauthenticated         ERROR_REASON_CALLER_UNAUTHENTICATED  UNAUTHENTICATED
     ├── PermissionDenied        ERROR_REASON_APPLICATION_NOT_ALLOWED PERMISSION_DENIED
     ├── NotSupported            ERROR_REASON_NOT_SUPPORTED           UNIMPLEMENTED
     ├── DeadlineExceeded        ERROR_REASON_DEADLINE_EXCEEDED       DEADLINE_EXCEEDED
     └── StoreError              ERROR_REASON_INTERNAL                INTERNAL
          ├── StoreUnavailable   ERROR_REASON_STORE_UNAVAILABLE       UNAVAILABLE
          └── StoreConflict      ERROR_REASON_INTERNAL                ABORTED
               └── GuardLost     ERROR_REASON_INTERNAL                ABORTED
                    └── NeedsLock    (never reaches a caller: the use case runs again)

Messages are written for the caller and never carry a code, secret or token. Reasons are
values of the generated ``mfa.v1.ErrorReason`` enum (the contract callers branch on), so a
reason that is not in the proto cannot be written. FailedPrecondition and
ResourceExhausted name theirs at every raise: there is no default reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from mfa.v1.error_reason_pb2 import ErrorReason


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


class MfaError(Exception):
    """Base of every error this service raises on purpose."""

    reason: ErrorReason.ValueType

    def __init__(self, message: str, *, reason: ErrorReason.ValueType | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        if not hasattr(self, "reason"):
            raise TypeError(f"{type(self).__name__} needs a reason")
        self.metadata: dict[str, str] = dict(metadata or {})

    @property
    def reason_name(self) -> str:
        """The reason as callers see it in ErrorInfo (``ERROR_REASON_...``)."""
        return ErrorReason.Name(self.reason)


class InvalidArgument(MfaError):
    """The request is malformed; ``violations`` names every bad field."""

    reason = ErrorReason.ERROR_REASON_INVALID_REQUEST

    def __init__(self, violations: list[FieldViolation]) -> None:
        fields = ", ".join(v.field for v in violations)
        super().__init__(f"invalid request: {fields}")
        self.violations = violations

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])


class NotFound(MfaError):
    """The named resource does not exist (or is not the caller's to see)."""


class FactorNotFound(NotFound):
    reason = ErrorReason.ERROR_REASON_FACTOR_NOT_FOUND

    def __init__(self) -> None:
        super().__init__("factor not found")


class ChallengeNotFound(NotFound):
    reason = ErrorReason.ERROR_REASON_CHALLENGE_NOT_FOUND

    def __init__(self) -> None:
        super().__init__("challenge not found")


class DeviceNotFound(NotFound):
    """A remembered browser that is not (or no longer) the user's."""

    reason = ErrorReason.ERROR_REASON_DEVICE_NOT_FOUND

    def __init__(self) -> None:
        super().__init__("remembered browser not found")


class FailedPrecondition(MfaError):
    """The current state forbids the call; ``reason`` says which state."""

    def __init__(self, message: str, *, reason: ErrorReason.ValueType,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message, reason=reason, metadata=metadata)


class ResourceExhausted(MfaError):
    """A rate limit or lockout; the caller may retry after ``retry_after_seconds``."""

    def __init__(self, message: str, *, retry_after_seconds: float, reason: ErrorReason.ValueType,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after_seconds = max(0.0, retry_after_seconds)


class Unauthenticated(MfaError):
    reason = ErrorReason.ERROR_REASON_CALLER_UNAUTHENTICATED


class PermissionDenied(MfaError):
    reason = ErrorReason.ERROR_REASON_APPLICATION_NOT_ALLOWED


class NotSupported(MfaError):
    """Part of the contract that this server does not offer (yet)."""

    reason = ErrorReason.ERROR_REASON_NOT_SUPPORTED


class DeadlineExceeded(MfaError):
    """The caller's deadline passed before the work was done; the transaction rolled back.

    (A DEADLINE_EXCEEDED that the client's own timer produces carries no ErrorInfo.)
    """

    reason = ErrorReason.ERROR_REASON_DEADLINE_EXCEEDED

    def __init__(self) -> None:
        super().__init__("the deadline passed before the request was done; nothing was "
                         "changed")


class StoreError(MfaError):
    """The store failed; raised by the store layer with the driver error as ``__cause__``."""

    reason = ErrorReason.ERROR_REASON_INTERNAL


class StoreUnavailable(StoreError):
    """The database cannot be reached or refused the connection; retryable."""

    reason = ErrorReason.ERROR_REASON_STORE_UNAVAILABLE

    def __init__(self, message: str = "the database is unavailable, retry later") -> None:
        super().__init__(message)


class StoreConflict(StoreError):
    """A concurrent write won (unique or serialization conflict); retryable."""

    def __init__(self, message: str = "a concurrent request changed the same data, retry") -> None:
        super().__init__(message)


class GuardLost(StoreConflict):
    """A guarded write matched no row: a concurrent transaction changed what this one had
    read (a TOTP step accepted, a passkey counter moved, a factor disabled). The
    transaction rolls back; the use case runs again and now sees the winner's state."""

    def __init__(self, guard: str) -> None:
        super().__init__()
        self.guard = guard


class NeedsLock(GuardLost):
    """An optimistic unit of work (store/unit.py) met what it cannot do without the
    user's lock: a statement other than its one read and its writes at the end. Nothing
    was written; the use case runs again under the lock (service/attempts.py,
    ``again_if_guard_lost``)."""

    def __init__(self, why: str) -> None:
        super().__init__("user lock")
        self.why = why


class ConfigurationError(Exception):
    """Settings that cannot work; raised at start-up, never at request time."""
