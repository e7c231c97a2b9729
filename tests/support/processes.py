"""``mfa-service`` as an operator runs it: a real process on a free port of loopback, and
waiting until it answers SERVING; a real session made through the client, on the real
clock (a subprocess does not share the tests' fixed clock)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pyotp
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mfa.v1 import two_factor_service_pb2 as pb

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

CLI = str(Path(sys.executable).parent / "mfa-service")
STARTUP_SECONDS = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any MFA_ setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MFA_")}
    env.update(extra)
    return env


async def wait_serving(target: str, proc: subprocess.Popen[bytes],
                       timeout: float = STARTUP_SECONDS) -> None:
    """Until grpc.health.v1 at ``target`` answers SERVING; fails if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    async with aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            assert proc.poll() is None, "the server exited during start-up"
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, "the server never became SERVING"
            await asyncio.sleep(0.1)


async def session_token(stub: Stub) -> str:
    """A real session: enrol an app, confirm it, log in (the next step's code: the
    confirming one is spent, RFC 6238 5.2)."""
    user = f"user-{uuid.uuid4().hex[:10]}"
    enrolled = await stub.Enroll(pb.EnrollRequest(
        user_id=user, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL),
        timeout=10)
    totp = pyotp.TOTP(enrolled.totp_secret)
    now = time.time()
    confirmed = await stub.Verify(pb.VerifyRequest(
        challenge_id=enrolled.challenge_id, code=totp.at(now)), timeout=10)
    assert confirmed.result == pb.VERIFY_RESULT_APPROVED
    opened = await stub.Challenge(pb.ChallengeRequest(
        user_id=user, factor_id=enrolled.factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL), timeout=10)
    logged_in = await stub.Verify(pb.VerifyRequest(
        challenge_id=opened.challenge_id, code=totp.at(now, counter_offset=1)), timeout=10)
    assert logged_in.result == pb.VERIFY_RESULT_APPROVED, logged_in
    token: str = logged_in.session.session_token
    return token
