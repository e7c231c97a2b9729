"""Passkeys through the generated client, with the software authenticator as the browser
and its key (tests/support/softauthn.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mfa.v1 import two_factor_service_pb2 as pb

from tests.support.softauthn import SoftAuthenticator

if TYPE_CHECKING:  # the async stub class exists only in the typed stubs (.pyi)
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub


async def enroll_passkey(stub: Stub, user_id: str, key: SoftAuthenticator,
                         session_token: str = "") -> tuple[pb.EnrollResponse, pb.VerifyResponse]:
    enrolled = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_PASSKEY, application=pb.APPLICATION_PORTAL,
        account_name=f"{user_id}@example.com", session_token=session_token))
    confirmed = await stub.Verify(pb.VerifyRequest(
        challenge_id=enrolled.challenge_id,
        webauthn_response=key.create(enrolled.webauthn_creation_options)))
    return enrolled, confirmed


async def passkey_challenge(stub: Stub, user_id: str, factor_id: str,
                            purpose: pb.Purpose.ValueType = pb.PURPOSE_LOGIN,
                            ) -> pb.ChallengeResponse:
    return await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=factor_id, purpose=purpose,
        application=pb.APPLICATION_PORTAL))


async def passkey_login(stub: Stub, user_id: str, factor_id: str,
                        key: SoftAuthenticator, **get_args: Any) -> pb.VerifyResponse:
    ch = await passkey_challenge(stub, user_id, factor_id)
    return await stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, webauthn_response=key.get(ch.webauthn_request_options,
                                                                **get_args)))
