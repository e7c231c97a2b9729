"""The scenarios: what one operation of each sends, and which answers it expects.

Each operation returns a ``Result``: COMPLETED when it did what it is for (a valid
session, an approved login, a confirmed enrolment, a wrong code refused), FAILED when an
RPC failed or answered otherwise (the recorder has counted why), NO_USER when no user may
be used right now (the worker waits a moment; the report counts those worker-seconds).

Two rules of the service shape the user handling:

- RFC 6238 section 5.2: a factor accepts each 30 s time step once, and the server accepts
  +-1 step of drift. ``login`` leases a user per operation from a pool keyed by the last
  step the server accepted for that user, and uses a user again only once a newer step is
  inside the window. So a user logs in at most about once per step, never with a replay.
- Five consecutive wrong codes lock a user. ``challenge-verify-wrong`` rotates over users,
  parks a locked user for its RetryInfo delay and counts RESOURCE_EXHAUSTED as expected.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

import grpc
import pyotp
from google.rpc import error_details_pb2
from grpc import aio
from grpc_status import rpc_status
from mfa.v1 import two_factor_service_pb2 as pb

from mfa_service.loadtest.config import ECHO, MIXED
from mfa_service.loadtest.recorder import RESOURCE_EXHAUSTED, Outcome, Recorder
from mfa_service.loadtest.softauthn import SoftAuthenticator
from mfa_service.loadtest.users import LeasePool, User, time_step

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

USER_AGENT = "mfa-service-loadtest"
# The origin the passkey scenario's authenticator claims: the server's development default
# (settings.py DEV_ORIGINS, the reference portal).
PASSKEY_ORIGIN = "http://localhost:8080"


class Result(Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    NO_USER = "no_user"


# What each scenario needs from the setup: (users with a confirmed app, a live session each).
NEEDS: dict[str, tuple[bool, bool]] = {
    "mixed": (True, True),
    "check-session": (True, True),
    "list-factors": (True, False),
    "challenge-verify-wrong": (True, False),
    # No session for login users: logging them in during setup would spend a TOTP step.
    "login": (True, False),
    "enroll": (False, False),
    "passkey": (False, False),
    ECHO: (False, False),
}


def wrong_code(user: User, step: int, rng: random.Random) -> str:
    """Six digits that match none of the steps the server would accept now."""
    valid = {user.code(s) for s in (step - 1, step, step + 1)}
    while True:
        code = f"{rng.randrange(1_000_000):06d}"
        if code not in valid:
            return code


def retry_after(exc: aio.AioRpcError, default: float = 60.0) -> float:
    """The RetryInfo delay of an AIP-193 error (the lockout's remaining wait)."""
    status = rpc_status.from_call(exc)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return max(float(info.retry_delay.seconds), 1.0)
    return default


def _wrong_outcome(resp: pb.VerifyResponse) -> Outcome:
    name = pb.VerifyResult.Name(resp.result)
    return name, resp.result in (pb.VERIFY_RESULT_INVALID_CODE,
                                 pb.VERIFY_RESULT_MAX_ATTEMPTS_REACHED)


def _approved_outcome(resp: pb.VerifyResponse) -> Outcome:
    return pb.VerifyResult.Name(resp.result), resp.result == pb.VERIFY_RESULT_APPROVED


def _session_outcome(resp: pb.CheckSessionResponse) -> Outcome:
    return ("valid", True) if resp.valid else ("invalid", False)


Operation = Callable[["Stub", random.Random], Coroutine[Any, Any, Result]]


class Scenarios:
    """One operation of each scenario, over the run's users and recorder."""

    def __init__(self, rec: Recorder, *, users: Sequence[User], rpc_timeout: float,
                 metadata: tuple[tuple[str, str], ...] | None, now: Callable[[], datetime],
                 prefix: str) -> None:
        self.rec = rec
        self.users = list(users)
        self.session_users = [u for u in self.users if u.token]
        self.now = now
        self._kw: dict[str, Any] = {"timeout": rpc_timeout, "metadata": metadata}
        self._prefix = prefix
        self._fresh = itertools.count()
        self._portal = True
        self.wrong_pool = LeasePool(self.users, lambda u: 0.0)
        # Ready once the next step (last + 1) is inside the server's window: last <= now.
        self.login_pool = LeasePool(self.users, lambda u: float(u.last_step))
        self.table: dict[str, Operation] = {
            "check-session": self.check_session, "list-factors": self.list_factors,
            "challenge-verify-wrong": self.challenge_verify_wrong, "login": self.login,
            "enroll": self.enroll, "passkey": self.passkey, ECHO: self.echo,
        }

    def pick(self, scenario: str, rng: random.Random) -> str:
        """The scenario of the next operation (mixed draws one by its share)."""
        if scenario != "mixed":
            return scenario
        x = rng.random()
        for name, share in MIXED:
            x -= share
            if x < 0:
                return name
        return MIXED[-1][0]

    def _application(self) -> pb.Application.ValueType:
        # One login, both applications: sessions are checked from either, alternately.
        self._portal = not self._portal
        return pb.APPLICATION_PORTAL if self._portal else pb.APPLICATION_BACKOFFICE

    # ---- one operation each
    async def check_session(self, stub: Stub, rng: random.Random) -> Result:
        user = rng.choice(self.session_users)
        request = pb.CheckSessionRequest(session_token=user.token,
                                         application=self._application())
        answer = await self.rec.call("CheckSession", lambda: stub.CheckSession(
            request, **self._kw), outcome=_session_outcome)
        return Result.COMPLETED if getattr(answer, "valid", False) else Result.FAILED

    async def echo(self, stub: Stub, rng: random.Random) -> Result:
        """check-session's call against the bare server of --baseline (no setup: any
        token; that server answers every CheckSession with a constant valid=true)."""
        request = pb.CheckSessionRequest(session_token=f"echo-{rng.getrandbits(128):032x}",
                                         application=self._application())
        answer = await self.rec.call("CheckSession", lambda: stub.CheckSession(
            request, **self._kw), outcome=_session_outcome)
        return Result.COMPLETED if getattr(answer, "valid", False) else Result.FAILED

    async def list_factors(self, stub: Stub, rng: random.Random) -> Result:
        request = pb.ListFactorsRequest(user_id=rng.choice(self.users).user_id)
        answer = await self.rec.call("ListFactors", lambda: stub.ListFactors(
            request, **self._kw))
        return Result.FAILED if isinstance(answer, aio.AioRpcError) else Result.COMPLETED

    async def challenge_verify_wrong(self, stub: Stub, rng: random.Random) -> Result:
        """Challenge LOGIN, then a wrong code: attempt counting and the lockout path.

        A user locked out is parked for its RetryInfo delay; only when every user is
        parked is a locked one used anyway (its RESOURCE_EXHAUSTED is expected).
        """
        op = time.perf_counter()
        user = self.wrong_pool.lease(op, or_earliest=True)
        if user is None:
            return Result.NO_USER
        park = 0.0
        try:
            challenge = await self.rec.call("Challenge", lambda: stub.Challenge(
                pb.ChallengeRequest(user_id=user.user_id, factor_id=user.factor_id,
                                    purpose=pb.PURPOSE_LOGIN, application=pb.APPLICATION_PORTAL),
                **self._kw), expected=RESOURCE_EXHAUSTED, operation_start=op)
            if isinstance(challenge, aio.AioRpcError):
                if challenge.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    park = retry_after(challenge)
                return Result.FAILED
            code = wrong_code(user, time_step(self.now()), rng)
            verified = await self.rec.call("Verify", lambda: stub.Verify(
                pb.VerifyRequest(challenge_id=challenge.challenge_id, code=code,
                                 client_ip="127.0.0.1", user_agent=USER_AGENT),
                **self._kw), expected=RESOURCE_EXHAUSTED, outcome=_wrong_outcome,
                operation_start=op)
            if isinstance(verified, aio.AioRpcError):
                if verified.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    park = retry_after(verified)
                return Result.FAILED
            return Result.COMPLETED if _wrong_outcome(verified)[1] else Result.FAILED
        finally:
            self.wrong_pool.release(user, time.perf_counter() + park)

    async def login(self, stub: Stub, rng: random.Random) -> Result:
        """Challenge LOGIN + Verify with the right code: at most once per user and step."""
        op = time.perf_counter()
        current = time_step(self.now())
        user = self.login_pool.lease(float(current))
        if user is None:
            return Result.NO_USER
        step = max(user.last_step + 1, current)  # <= current + 1: inside the window
        try:
            challenge = await self.rec.call("Challenge", lambda: stub.Challenge(
                pb.ChallengeRequest(user_id=user.user_id, factor_id=user.factor_id,
                                    purpose=pb.PURPOSE_LOGIN, application=pb.APPLICATION_PORTAL),
                **self._kw), operation_start=op)
            if isinstance(challenge, aio.AioRpcError):
                return Result.FAILED
            verified = await self.rec.call("Verify", lambda: stub.Verify(
                pb.VerifyRequest(challenge_id=challenge.challenge_id, code=user.code(step),
                                 client_ip="127.0.0.1", user_agent=USER_AGENT),
                **self._kw), outcome=_approved_outcome, operation_start=op)
            # Whatever the answer (even a timeout: the server may have accepted it), this
            # step is spent for this user.
            user.last_step = step
            if isinstance(verified, aio.AioRpcError) or not _approved_outcome(verified)[1]:
                return Result.FAILED
            if verified.session.session_token:
                user.token = verified.session.session_token
            return Result.COMPLETED
        finally:
            self.login_pool.release(user, float(user.last_step))

    async def passkey(self, stub: Stub, rng: random.Random) -> Result:
        """A user never seen before enrols a passkey (a software authenticator answering
        the server's creation options as a browser would), then logs in with it.

        The origin is the first the server allows by default (the reference portal's);
        a server configured for other origins needs ``MFA_WEBAUTHN_ORIGINS`` to list it."""
        op = time.perf_counter()
        user_id = f"{self._prefix}-passkey-{next(self._fresh):07d}"
        key = SoftAuthenticator(origin=PASSKEY_ORIGIN)
        enrolled = await self.rec.call("Enroll", lambda: stub.Enroll(pb.EnrollRequest(
            user_id=user_id, method=pb.METHOD_PASSKEY, application=pb.APPLICATION_PORTAL),
            **self._kw), operation_start=op)
        if isinstance(enrolled, aio.AioRpcError):
            return Result.FAILED
        registered = await self.rec.call("Verify", lambda: stub.Verify(pb.VerifyRequest(
            challenge_id=enrolled.challenge_id, client_ip="127.0.0.1", user_agent=USER_AGENT,
            webauthn_response=key.create(enrolled.webauthn_creation_options)), **self._kw),
            outcome=_approved_outcome, operation_start=op)
        if isinstance(registered, aio.AioRpcError) or not _approved_outcome(registered)[1]:
            return Result.FAILED
        challenge = await self.rec.call("Challenge", lambda: stub.Challenge(
            pb.ChallengeRequest(user_id=user_id, factor_id=enrolled.factor.factor_id,
                                purpose=pb.PURPOSE_LOGIN, application=pb.APPLICATION_PORTAL),
            **self._kw), operation_start=op)
        if isinstance(challenge, aio.AioRpcError):
            return Result.FAILED
        verified = await self.rec.call("Verify", lambda: stub.Verify(pb.VerifyRequest(
            challenge_id=challenge.challenge_id, client_ip="127.0.0.1", user_agent=USER_AGENT,
            webauthn_response=key.get(challenge.webauthn_request_options)), **self._kw),
            outcome=_approved_outcome, operation_start=op)
        if isinstance(verified, aio.AioRpcError) or not _approved_outcome(verified)[1]:
            return Result.FAILED
        return Result.COMPLETED

    async def enroll(self, stub: Stub, rng: random.Random) -> Result:
        """Enroll an authenticator app for a user never seen before, then Verify the first
        code (the factor becomes ACTIVE and the user's recovery codes are issued).

        Always a first factor, which needs no 2FA session (SPEC: only adding a factor
        next to an ACTIVE one needs EnrollRequest.session_token)."""
        op = time.perf_counter()
        user_id = f"{self._prefix}-enroll-{next(self._fresh):07d}"
        enrolled = await self.rec.call("Enroll", lambda: stub.Enroll(pb.EnrollRequest(
            user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP,
            application=pb.APPLICATION_PORTAL, account_name=user_id,
            qr_image=pb.QR_IMAGE_SVG), **self._kw),  # what a portal page shows
            operation_start=op)
        if isinstance(enrolled, aio.AioRpcError):
            return Result.FAILED
        code = pyotp.TOTP(enrolled.totp_secret).generate_otp(time_step(self.now()))
        verified = await self.rec.call("Verify", lambda: stub.Verify(pb.VerifyRequest(
            challenge_id=enrolled.challenge_id, code=code, client_ip="127.0.0.1",
            user_agent=USER_AGENT), **self._kw), outcome=_approved_outcome,
            operation_start=op)
        if isinstance(verified, aio.AioRpcError) or not _approved_outcome(verified)[1]:
            return Result.FAILED
        return Result.COMPLETED
