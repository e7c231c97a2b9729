"""Users for a run, not measured: enrolled through the API, or read from a users file.

Through the API each user is enrolled with the authenticator app, confirmed with a pyotp
code and (for session scenarios) logged in once to hold a session token. That costs the
server ~26 ms of CPU per user (docs/BENCHMARKS.md); ``loadtest seed`` writes a population
of any size straight into the database instead, and ``--users-file`` reads it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pyotp
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb

from mfa_service.loadtest.config import LoadTestError
from mfa_service.loadtest.scenarios import USER_AGENT
from mfa_service.loadtest.users import User, time_step

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

SETUP_TIMEOUT_SECONDS = 30.0


class Enroller:
    """Enrols ``count`` users over the run's stubs, ``concurrency`` at a time."""

    def __init__(self, stubs: Sequence[Stub], *, prefix: str, now: Callable[[], datetime],
                 metadata: tuple[tuple[str, str], ...] | None) -> None:
        self._stubs = stubs
        self._prefix = prefix
        self._now = now
        self._kw: dict[str, Any] = {"timeout": SETUP_TIMEOUT_SECONDS, "metadata": metadata}
        self.done = 0  # for the progress line

    async def enrol(self, count: int, concurrency: int, with_sessions: bool) -> list[User]:
        indexes = iter(range(count))
        users: list[User | None] = [None] * count

        async def enrol_some(stub: Stub) -> None:
            for i in indexes:
                users[i] = await self._enrol(stub, i, with_sessions)
                self.done += 1

        tasks = [asyncio.create_task(enrol_some(self._stubs[w % len(self._stubs)]))
                 for w in range(min(concurrency, count))]
        try:
            await asyncio.gather(*tasks)
        except aio.AioRpcError as exc:
            raise LoadTestError(f"setup failed: {exc.code().name}: {exc.details()}") from None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return [u for u in users if u is not None]

    async def _enrol(self, stub: Stub, index: int, with_session: bool) -> User:
        user_id = f"{self._prefix}-{index:06d}"
        enrolled = await stub.Enroll(pb.EnrollRequest(
            user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP,
            application=pb.APPLICATION_PORTAL, account_name=user_id), **self._kw)
        totp = pyotp.TOTP(enrolled.totp_secret)
        step = time_step(self._now())
        confirmed = await stub.Verify(pb.VerifyRequest(
            challenge_id=enrolled.challenge_id, code=totp.generate_otp(step),
            client_ip="127.0.0.1", user_agent=USER_AGENT), **self._kw)
        if confirmed.result != pb.VERIFY_RESULT_APPROVED:
            raise LoadTestError(f"setup: confirming {user_id} gave "
                                f"{pb.VerifyResult.Name(confirmed.result)}")
        user = User(user_id, enrolled.factor.factor_id, enrolled.totp_secret, step)
        if with_session:
            application = pb.APPLICATION_PORTAL if index % 2 else pb.APPLICATION_BACKOFFICE
            challenge = await stub.Challenge(pb.ChallengeRequest(
                user_id=user_id, factor_id=user.factor_id, purpose=pb.PURPOSE_LOGIN,
                application=application), **self._kw)
            # The confirmation spent this step: log in with the next one (the server
            # accepts +-1 step of drift), which needs no 30 s wait.
            login_step = max(step + 1, time_step(self._now()))
            verified = await stub.Verify(pb.VerifyRequest(
                challenge_id=challenge.challenge_id, code=totp.generate_otp(login_step),
                client_ip="127.0.0.1", user_agent=USER_AGENT), **self._kw)
            if verified.result != pb.VERIFY_RESULT_APPROVED:
                raise LoadTestError(f"setup: logging {user_id} in gave "
                                    f"{pb.VerifyResult.Name(verified.result)}")
            user.last_step = login_step
            user.token = verified.session.session_token
        return user
