"""What a caller does through the generated client, shared by the tests that talk to a
server: enrol and confirm an authenticator app, log in, open a challenge, get new recovery
codes; and decoding an AIP-193 error (google.rpc.Status with its details)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import pyotp
from google.rpc import error_details_pb2
from grpc import aio
from grpc_status import rpc_status
from mfa.v1 import two_factor_service_pb2 as pb

from mfa_service.clock import FixedClock

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub


def totp_at(secret: str, clock: FixedClock, steps: int = 0) -> str:
    return pyotp.TOTP(secret).at(clock.now(), counter_offset=steps)


@dataclass
class AppFactor:
    factor_id: str
    secret: str
    user_id: str


async def enroll_app(stub: Stub, user_id: str,
                     clock: FixedClock) -> AppFactor:
    """Enrol and confirm an authenticator app; leaves the clock on the next step."""
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP,
        application=pb.APPLICATION_PORTAL, account_name=f"{user_id}@example.com"))
    result = await stub.Verify(pb.VerifyRequest(
        challenge_id=resp.challenge_id, code=totp_at(resp.totp_secret, clock)))
    assert result.result == pb.VERIFY_RESULT_APPROVED
    clock.advance(30)  # the next code is a new step, not a replay
    return AppFactor(resp.factor.factor_id, resp.totp_secret, user_id)


async def challenge(stub: Stub, factor: AppFactor,
                    purpose: pb.Purpose.ValueType = pb.PURPOSE_LOGIN,
                    application: pb.Application.ValueType = pb.APPLICATION_PORTAL,
                    ) -> pb.ChallengeResponse:
    """Open a challenge on an enrolled app factor."""
    return await stub.Challenge(pb.ChallengeRequest(
        user_id=factor.user_id, factor_id=factor.factor_id, purpose=purpose,
        application=application))


async def login(stub: Stub, factor: AppFactor, clock: FixedClock,
                application: pb.Application.ValueType = pb.APPLICATION_PORTAL) -> pb.Session:
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=factor.user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=application))
    result = await stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, code=totp_at(factor.secret, clock)))
    assert result.result == pb.VERIFY_RESULT_APPROVED, result
    clock.advance(30)
    return result.session


async def regenerate_proof(stub: Stub, factor: AppFactor, clock: FixedClock) -> str:
    """An approved PURPOSE_REGENERATE_RECOVERY_CODES challenge on an app factor (its id)."""
    ch = await challenge(stub, factor, pb.PURPOSE_REGENERATE_RECOVERY_CODES)
    result = await stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, code=totp_at(factor.secret, clock)))
    assert result.result == pb.VERIFY_RESULT_APPROVED, result
    clock.advance(30)
    return ch.challenge_id


async def regenerate(stub: Stub, factor: AppFactor, clock: FixedClock,
                     **extra: object) -> list[str]:
    """New recovery codes, proven with ``factor`` (which must be established)."""
    proof = await regenerate_proof(stub, factor, clock)
    resp = await stub.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(
        user_id=factor.user_id, proof_challenge_id=proof,
        application=pb.APPLICATION_PORTAL, **extra))  # type: ignore[arg-type]
    return list(resp.recovery_codes)


@dataclass
class RichError:
    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    field_violations: dict[str, str]
    retry_seconds: int | None
    error_infos: int


def rich_error(err: aio.AioRpcError) -> RichError:
    """Decode an AIP-193 error: google.rpc.Status with its details."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no google.rpc.Status in {err.code()}: {err.details()}"
    infos, violations, retry = [], {}, None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = {v.field: v.description for v in bad.field_violations}
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_r = error_details_pb2.RetryInfo()
            detail.Unpack(info_r)
            retry = info_r.retry_delay.seconds
    assert infos, "no ErrorInfo detail"
    return RichError(err.code(), status.message, infos[0].reason, infos[0].domain, violations,
                     retry, len(infos))
