"""``mfa-service loadtest``: drive a local server through the generated async stubs.

It measures the service the way its callers use it, so every call goes through the
generated ``TwoFactorServiceStub`` on ``grpc.aio`` channels. The design follows from the
service's own rules and from shared/BASELINES.md:

- ``--connections`` separate channels (each with its own subchannel pool, so each is its
  own TCP connection): the kernel balances connections, not calls, between server
  processes, and one connection would pin every call to one of them.
- Setup is not measured: users are enrolled with the authenticator app, confirmed with a
  pyotp code and (for session scenarios) logged in once to hold a session token.
- TOTP replay protection accepts a time step once per factor. Correct-code scenarios
  therefore lease a user per operation and remember the last step each factor accepted;
  a user is only used again once a newer step is inside the server's +-1 step window.
- Five consecutive wrong codes lock a user. Wrong-code scenarios rotate over users, park
  a locked user for its RetryInfo delay and count RESOURCE_EXHAUSTED as an expected
  outcome, separate from errors.
- Latencies go into a fixed-size log-linear histogram, so memory does not grow with the
  length or rate of a run; the run is bounded by ``--duration`` (and ``--max-calls``).
- Traffic stays on this machine: a non-loopback ``--target`` needs ``--allow-remote``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import ipaddress
import itertools
import json
import math
import os
import platform
import random
import secrets
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import grpc
import pyotp
from google.protobuf import __version__ as protobuf_version
from google.rpc import error_details_pb2
from grpc import aio
from grpc_status import rpc_status
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

T = TypeVar("T")

PERIOD_SECONDS = 30  # RFC 6238 time step, as the service uses it
SCENARIOS = ("mixed", "check-session", "list-factors", "challenge-verify-wrong", "login")
# Production shape: sessions are checked on every page, factors listed on the profile page,
# and wrong codes are what an attacker (or a clumsy user) sends.
MIXED: tuple[tuple[str, float], ...] = (
    ("check-session", 0.8), ("list-factors", 0.1), ("challenge-verify-wrong", 0.1))
SETUP_TIMEOUT_SECONDS = 30.0
STALL_SECONDS = 0.05  # how long a worker waits when no user can be used right now
EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_SETUP = 0, 1, 2, 3
RESOURCE_EXHAUSTED = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})
NOTHING_EXPECTED: frozenset[grpc.StatusCode] = frozenset()


class LoadTestError(Exception):
    """The run could not start or its setup failed (not: errors under load)."""


# -- configuration --------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadConfig:
    """One run's parameters; the CLI flags map one to one."""

    target: str
    connections: int = 8
    concurrency: int = 16
    duration: float = 10.0
    warmup: float = 2.0
    users: int = 200
    scenario: str = "mixed"
    token: str | None = None
    plaintext: bool = False
    ca_file: Path | None = None
    allow_remote: bool = False
    max_calls: int | None = None
    rpc_timeout: float = 10.0
    seed: int | None = None

    def check(self) -> None:
        """Refuse what would leave the machine or is not a bounded run."""
        host = target_host(self.target)
        if not self.allow_remote and not is_loopback(host):
            raise LoadTestError(
                f"{self.target} is not a loopback address; load stays on this machine "
                "unless --allow-remote is given")
        if self.scenario not in SCENARIOS:
            raise LoadTestError(f"unknown scenario {self.scenario!r}; one of {SCENARIOS}")
        for name, value, low, high in (
                ("connections", self.connections, 1, 256),
                ("concurrency", self.concurrency, 1, 4096),
                ("users", self.users, 1, 100_000),
                ("duration", self.duration, 0.1, 3600),
                ("warmup", self.warmup, 0, 600),
                ("rpc_timeout", self.rpc_timeout, 0.1, 120)):
            if not low <= value <= high:
                raise LoadTestError(f"{name} must be between {low} and {high}, not {value}")
        if self.max_calls is not None and self.max_calls < 1:
            raise LoadTestError("max_calls must be at least 1")


def target_host(target: str) -> str:
    """The host of HOST:PORT or [V6]:PORT; the form is checked, the name is not resolved."""
    if target.startswith("["):
        host, sep, rest = target[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else ""
    else:
        host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LoadTestError(f"--target must be HOST:PORT (e.g. 127.0.0.1:50051), not {target!r}")
    return host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost could resolve anywhere


# -- latency histogram ----------------------------------------------------------------------
class Histogram:
    """Latencies in microseconds, HDR-style: exact below 128 µs, then 64 buckets per power
    of two (under 1.6 % bucket width, 0.8 % error at the midpoint) in a fixed-size list,
    so recording is O(1) and memory does not depend on the number of calls."""

    SUB_BITS = 6
    _HALF = 1 << SUB_BITS  # 64 buckets per power of two
    _EXACT = _HALF * 2  # values below 128 µs have their own bucket
    _MAX_US = (1 << 40) - 1  # ~12 days; anything longer is clamped
    SLOTS = _HALF * (40 - SUB_BITS) + _EXACT

    def __init__(self) -> None:
        self.counts = [0] * self.SLOTS
        self.count = 0
        self.total_us = 0
        self.max_us = 0

    @classmethod
    def index(cls, micros: int) -> int:
        if micros < cls._EXACT:
            return micros
        shift = micros.bit_length() - (cls.SUB_BITS + 1)
        return cls._HALF * shift + (micros >> shift)

    @classmethod
    def midpoint(cls, index: int) -> float:
        if index < cls._EXACT:
            return float(index)
        shift = index // cls._HALF - 1
        top = index - cls._HALF * shift
        return ((top << shift) + ((top + 1) << shift) - 1) / 2

    def record(self, seconds: float) -> None:
        micros = min(max(int(seconds * 1e6), 0), self._MAX_US)
        self.counts[self.index(micros)] += 1
        self.count += 1
        self.total_us += micros
        if micros > self.max_us:
            self.max_us = micros

    def merge(self, other: Histogram) -> None:
        for i, n in enumerate(other.counts):
            if n:
                self.counts[i] += n
        self.count += other.count
        self.total_us += other.total_us
        self.max_us = max(self.max_us, other.max_us)

    def percentile(self, q: float) -> float:
        """The q-quantile (0 < q <= 1) in microseconds, never above the recorded maximum."""
        if self.count == 0:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(self.midpoint(i), float(self.max_us))
        return float(self.max_us)  # pragma: no cover - the counts add up to count

    def summary_ms(self) -> dict[str, float]:
        mean = self.total_us / self.count if self.count else 0.0
        return {"p50": _ms(self.percentile(0.50)), "p90": _ms(self.percentile(0.90)),
                "p99": _ms(self.percentile(0.99)), "max": _ms(self.max_us),
                "mean": _ms(mean)}


def _ms(micros: float) -> float:
    return round(micros / 1000, 3)


# -- recording ------------------------------------------------------------------------------
@dataclass
class RpcStats:
    """What happened to one RPC during the measured window."""

    latency: Histogram = field(default_factory=Histogram)
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    expected_errors: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    unexpected_outcomes: int = 0

    def as_report(self, seconds: float) -> dict[str, Any]:
        count = self.latency.count
        return {
            "count": count, "ok": self.ok, "rps": round(count / seconds, 1) if seconds else 0.0,
            "errors": dict(sorted(self.errors.items())),
            "expected_errors": dict(sorted(self.expected_errors.items())),
            "outcomes": dict(sorted(self.outcomes.items())),
            "unexpected_outcomes": self.unexpected_outcomes,
            "latency_ms": self.latency.summary_ms(),
        }


Outcome = tuple[str, bool]  # (label, whether this answer is what the scenario expects)


class Recorder:
    """Times every call; only calls that start inside the measured window are recorded."""

    def __init__(self) -> None:
        self.rpcs: dict[str, RpcStats] = {}
        self.measure_from = math.inf  # perf_counter() at which measuring starts
        self.calls = 0  # finished calls, warm-up included (for the progress line)
        self.unexpected = 0  # unexpected errors and outcomes, warm-up included
        self.expected = 0  # expected errors (RESOURCE_EXHAUSTED of a locked user)
        self.measured = 0

    async def call(self, rpc: str, start_call: Callable[[], Awaitable[T]], *,
                   expected: frozenset[grpc.StatusCode] = NOTHING_EXPECTED,
                   outcome: Callable[[T], Outcome] | None = None,
                   operation_start: float | None = None) -> T | aio.AioRpcError:
        """Make one call; an RPC error is returned (and counted), never raised.

        Whether it is measured follows ``operation_start`` when given, so both calls of a
        Challenge + Verify pair fall on the same side of the warm-up line.
        """
        start = time.perf_counter()
        origin = start if operation_start is None else operation_start
        try:
            response = await start_call()
        except aio.AioRpcError as exc:
            self._finish(rpc, start, origin, exc.code(), exc.code() in expected, None)
            return exc
        self._finish(rpc, start, origin, None, False, outcome(response) if outcome else None)
        return response

    def _finish(self, rpc: str, start: float, origin: float, code: grpc.StatusCode | None,
                expected: bool, outcome: Outcome | None) -> None:
        elapsed = time.perf_counter() - start
        self.calls += 1
        bad = (code is not None and not expected) or (outcome is not None and not outcome[1])
        self.unexpected += bad
        self.expected += expected
        if origin < self.measure_from:
            return
        self.measured += 1
        stats = self.rpcs.get(rpc)
        if stats is None:
            stats = self.rpcs[rpc] = RpcStats()
        stats.latency.record(elapsed)  # every finished call, errors included: honest tails
        if code is None:
            stats.ok += 1
        elif expected:
            stats.expected_errors[code.name] += 1
        else:
            stats.errors[code.name] += 1
        if outcome is not None:
            stats.outcomes[outcome[0]] += 1
            stats.unexpected_outcomes += not outcome[1]


# -- users ----------------------------------------------------------------------------------
@dataclass(eq=False)
class User:
    """An enrolled user with a confirmed authenticator app."""

    user_id: str
    factor_id: str
    totp: pyotp.TOTP
    last_step: int  # the newest TOTP step the server accepted for this factor
    token: str = ""  # a live session token, when setup logged the user in


class LeasePool:
    """Users handed out one at a time, each ready from a key (a time or a TOTP step).

    One operation per user at a time: a second Challenge on the same factor would
    supersede the first one's open challenge, and two logins would race for one step.
    """

    def __init__(self, users: Sequence[User], key: Callable[[User], float]) -> None:
        self._order = itertools.count()
        self._heap = [(key(u), next(self._order), u) for u in users]
        heapq.heapify(self._heap)

    def lease(self, now_key: float, *, or_earliest: bool = False) -> User | None:
        """A user ready at ``now_key``; with ``or_earliest``, else the soonest-ready one."""
        if not self._heap or (self._heap[0][0] > now_key and not or_earliest):
            return None
        return heapq.heappop(self._heap)[2]

    def release(self, user: User, ready_at: float) -> None:
        heapq.heappush(self._heap, (ready_at, next(self._order), user))


def time_step(at: datetime) -> int:
    return int(at.timestamp()) // PERIOD_SECONDS


def wrong_code(user: User, step: int, rng: random.Random) -> str:
    """Six digits that match none of the steps the server would accept now."""
    valid = {user.totp.generate_otp(s) for s in (step - 1, step, step + 1)}
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


def _login_outcome(resp: pb.VerifyResponse) -> Outcome:
    return pb.VerifyResult.Name(resp.result), resp.result == pb.VERIFY_RESULT_APPROVED


def _session_outcome(resp: pb.CheckSessionResponse) -> Outcome:
    return ("valid", True) if resp.valid else ("invalid", False)


# -- the run --------------------------------------------------------------------------------
class Run:
    """Shared state of one run: channels, users, the recorder and the clock."""

    def __init__(self, config: LoadConfig, now: Callable[[], datetime]) -> None:
        self.config = config
        self.now = now
        self.rec = Recorder()
        self.metadata: tuple[tuple[str, str], ...] | None = (
            (("authorization", f"Bearer {config.token}"),) if config.token else None)
        self.channels: list[aio.Channel] = []
        self.stubs: list[Stub] = []
        self.users: list[User] = []
        self.session_users: list[User] = []
        self.wrong_pool = LeasePool([], lambda u: 0.0)
        self.login_pool = LeasePool([], lambda u: 0.0)
        self.prefix = f"lt-{secrets.token_hex(4)}"
        self.setup_done = 0
        self.phase = "connect"
        self.end = math.inf
        self.operations: Counter[str] = Counter()
        # Worker-seconds spent waiting because no user could be used (login, lockouts).
        self.stalled: defaultdict[str, float] = defaultdict(float)
        self._portal = True

    # ---- connections
    async def connect(self) -> None:
        config = self.config
        options = [
            # A channel of its own subchannel pool is a TCP connection of its own; with
            # the global pool, identical channels would share one connection.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.primary_user_agent", "mfa-service-loadtest"),
        ]
        credentials = None
        if not config.plaintext:
            roots = config.ca_file.read_bytes() if config.ca_file else None
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        for _ in range(config.connections):
            channel = (aio.insecure_channel(config.target, options=options)
                       if credentials is None
                       else aio.secure_channel(config.target, credentials, options=options))
            self.channels.append(channel)
            self.stubs.append(pb_grpc.TwoFactorServiceStub(channel))
        try:
            await asyncio.wait_for(
                asyncio.gather(*(ch.channel_ready() for ch in self.channels)), timeout=10)
        except TimeoutError:
            raise LoadTestError(f"cannot connect to {config.target} within 10 s") from None

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    # ---- setup (not measured)
    async def setup(self) -> None:
        self.phase = "setup"
        with_sessions = self.config.scenario != "login"  # a login spends the next TOTP step
        indexes = iter(range(self.config.users))
        users: list[User | None] = [None] * self.config.users

        async def enrol_some(stub: Stub) -> None:
            for i in indexes:
                users[i] = await self._enrol(stub, i, with_sessions)
                self.setup_done += 1

        workers = min(self.config.concurrency, self.config.users)
        tasks = [asyncio.create_task(enrol_some(self.stubs[w % len(self.stubs)]))
                 for w in range(workers)]
        try:
            await asyncio.gather(*tasks)
        except aio.AioRpcError as exc:
            raise LoadTestError(f"setup failed: {exc.code().name}: {exc.details()}") from None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.users = [u for u in users if u is not None]
        self.session_users = [u for u in self.users if u.token]
        self.wrong_pool = LeasePool(self.users, lambda u: 0.0)
        # Ready once the next step (last + 1) is inside the server's window: last <= now.
        self.login_pool = LeasePool(self.users, lambda u: float(u.last_step))

    async def _enrol(self, stub: Stub, index: int, with_session: bool) -> User:
        user_id = f"{self.prefix}-{index:06d}"
        kw: dict[str, Any] = {"timeout": SETUP_TIMEOUT_SECONDS, "metadata": self.metadata}
        enrolled = await stub.Enroll(pb.EnrollRequest(
            user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP,
            application=pb.APPLICATION_PORTAL, account_name=user_id), **kw)
        totp = pyotp.TOTP(enrolled.totp_secret)
        step = time_step(self.now())
        confirmed = await stub.Verify(pb.VerifyRequest(
            challenge_id=enrolled.challenge_id, code=totp.generate_otp(step),
            client_ip="127.0.0.1", user_agent="mfa-service-loadtest"), **kw)
        if confirmed.result != pb.VERIFY_RESULT_APPROVED:
            raise LoadTestError(f"setup: confirming {user_id} gave "
                                f"{pb.VerifyResult.Name(confirmed.result)}")
        user = User(user_id, enrolled.factor.factor_id, totp, step)
        if with_session:
            application = pb.APPLICATION_PORTAL if index % 2 else pb.APPLICATION_BACKOFFICE
            challenge = await stub.Challenge(pb.ChallengeRequest(
                user_id=user_id, factor_id=user.factor_id, purpose=pb.PURPOSE_LOGIN,
                application=application), **kw)
            # The confirmation spent this step: log in with the next one (the server
            # accepts +-1 step of drift), which needs no 30 s wait.
            login_step = max(step + 1, time_step(self.now()))
            verified = await stub.Verify(pb.VerifyRequest(
                challenge_id=challenge.challenge_id, code=totp.generate_otp(login_step),
                client_ip="127.0.0.1", user_agent="mfa-service-loadtest"), **kw)
            if verified.result != pb.VERIFY_RESULT_APPROVED:
                raise LoadTestError(f"setup: logging {user_id} in gave "
                                    f"{pb.VerifyResult.Name(verified.result)}")
            user.last_step = login_step
            user.token = verified.session.session_token
        return user

    # ---- scenarios (one operation each)
    async def check_session(self, stub: Stub, rng: random.Random) -> None:
        user = rng.choice(self.session_users)
        self._portal = not self._portal
        request = pb.CheckSessionRequest(
            session_token=user.token,
            application=pb.APPLICATION_PORTAL if self._portal else pb.APPLICATION_BACKOFFICE)
        await self.rec.call("CheckSession", lambda: stub.CheckSession(
            request, timeout=self.config.rpc_timeout, metadata=self.metadata),
            outcome=_session_outcome)

    async def list_factors(self, stub: Stub, rng: random.Random) -> None:
        request = pb.ListFactorsRequest(user_id=rng.choice(self.users).user_id)
        await self.rec.call("ListFactors", lambda: stub.ListFactors(
            request, timeout=self.config.rpc_timeout, metadata=self.metadata))

    async def challenge_verify_wrong(self, stub: Stub, rng: random.Random) -> bool:
        """Challenge LOGIN, then a wrong code: attempt counting and the lockout path.

        A user locked out is parked for its RetryInfo delay; only when every user is
        parked is a locked one used anyway (its RESOURCE_EXHAUSTED is expected).
        """
        op = time.perf_counter()
        user = self.wrong_pool.lease(op, or_earliest=True)
        if user is None:
            return False
        park = 0.0
        try:
            challenge = await self.rec.call("Challenge", lambda: stub.Challenge(
                pb.ChallengeRequest(user_id=user.user_id, factor_id=user.factor_id,
                                    purpose=pb.PURPOSE_LOGIN, application=pb.APPLICATION_PORTAL),
                timeout=self.config.rpc_timeout, metadata=self.metadata),
                expected=RESOURCE_EXHAUSTED, operation_start=op)
            if isinstance(challenge, aio.AioRpcError):
                if challenge.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    park = retry_after(challenge)
                return True
            code = wrong_code(user, time_step(self.now()), rng)
            verified = await self.rec.call("Verify", lambda: stub.Verify(
                pb.VerifyRequest(challenge_id=challenge.challenge_id, code=code,
                                 client_ip="127.0.0.1", user_agent="mfa-service-loadtest"),
                timeout=self.config.rpc_timeout, metadata=self.metadata),
                expected=RESOURCE_EXHAUSTED, outcome=_wrong_outcome,
                operation_start=op)
            if isinstance(verified, aio.AioRpcError) and \
                    verified.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                park = retry_after(verified)
            return True
        finally:
            self.wrong_pool.release(user, time.perf_counter() + park)

    async def login(self, stub: Stub, rng: random.Random) -> bool:
        """Challenge LOGIN + Verify with the right code: at most once per user and step."""
        op = time.perf_counter()
        current = time_step(self.now())
        user = self.login_pool.lease(float(current))
        if user is None:
            return False
        step = max(user.last_step + 1, current)
        try:
            challenge = await self.rec.call("Challenge", lambda: stub.Challenge(
                pb.ChallengeRequest(user_id=user.user_id, factor_id=user.factor_id,
                                    purpose=pb.PURPOSE_LOGIN, application=pb.APPLICATION_PORTAL),
                timeout=self.config.rpc_timeout, metadata=self.metadata), operation_start=op)
            if isinstance(challenge, aio.AioRpcError):
                return True
            verified = await self.rec.call("Verify", lambda: stub.Verify(
                pb.VerifyRequest(challenge_id=challenge.challenge_id,
                                 code=user.totp.generate_otp(step), client_ip="127.0.0.1",
                                 user_agent="mfa-service-loadtest"),
                timeout=self.config.rpc_timeout, metadata=self.metadata),
                outcome=_login_outcome, operation_start=op)
            # Whatever the answer, this step is not tried again for this user.
            user.last_step = step
            if not isinstance(verified, aio.AioRpcError) and verified.session.session_token:
                user.token = verified.session.session_token
            return True
        finally:
            self.login_pool.release(user, float(user.last_step))

    # ---- the load itself
    def _pick(self, rng: random.Random) -> str:
        if self.config.scenario != "mixed":
            return self.config.scenario
        x = rng.random()
        for name, share in MIXED:
            x -= share
            if x < 0:
                return name
        return MIXED[-1][0]

    def _stopping(self) -> bool:
        limit = self.config.max_calls
        return time.perf_counter() >= self.end or (
            limit is not None and self.rec.measured >= limit)

    async def worker(self, index: int, seed: int) -> None:
        stub = self.stubs[index % len(self.stubs)]
        rng = random.Random(seed + index)  # noqa: S311 - load shape, not security
        ops: dict[str, Callable[[Stub, random.Random], Coroutine[Any, Any, bool | None]]] = {
            "check-session": self.check_session, "list-factors": self.list_factors,
            "challenge-verify-wrong": self.challenge_verify_wrong, "login": self.login,
        }
        while not self._stopping():
            name = self._pick(rng)
            started = time.perf_counter()
            if await ops[name](stub, rng) is False:  # no user may be used right now
                await asyncio.sleep(STALL_SECONDS)
                if started >= self.rec.measure_from:
                    self.stalled[name] += time.perf_counter() - started
            elif started >= self.rec.measure_from:
                self.operations[name] += 1

    async def load(self, seed: int) -> tuple[float, float]:
        """Warm up, then measure; returns (measure start, measure end) in perf_counter time."""
        config = self.config
        if config.scenario in ("check-session", "mixed") and not self.session_users:
            raise LoadTestError("setup produced no session to check")
        start = time.perf_counter()
        self.rec.measure_from = start + config.warmup
        self.end = self.rec.measure_from + config.duration
        self.phase = "run"
        workers = [asyncio.create_task(self.worker(i, seed)) for i in range(config.concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        return self.rec.measure_from, time.perf_counter()

    def status_line(self, rps: float) -> str:
        if self.phase == "connect":
            return f"loadtest connecting to {self.config.target}"
        if self.phase == "setup":
            return f"loadtest setup: {self.setup_done}/{self.config.users} users enrolled"
        now = time.perf_counter()
        phase = "warmup" if now < self.rec.measure_from else "measure"
        elapsed = now - (self.rec.measure_from - self.config.warmup)
        total = self.config.warmup + self.config.duration
        return (f"loadtest {phase:7s} {min(elapsed, total):6.1f}/{total:.0f}s  "
                f"{rps:7.0f} rps  calls {self.rec.calls}  errors {self.rec.unexpected}  "
                f"expected {self.rec.expected}")


async def _progress(run: Run, out: TextIO, interval: float) -> None:
    """Every ``interval`` (1 s): phase, elapsed time, RPS since the last line, errors."""
    tty = out.isatty()
    last_calls, last_t = 0, time.perf_counter()
    try:
        while True:
            await asyncio.sleep(interval)
            now = time.perf_counter()
            rps = (run.rec.calls - last_calls) / (now - last_t)
            last_calls, last_t = run.rec.calls, now
            line = run.status_line(rps)
            out.write(f"\r\x1b[K{line}" if tty else f"{line}\n")
            out.flush()
    finally:
        if tty:
            out.write("\n")
            out.flush()


async def run_loadtest(config: LoadConfig, *, now: Callable[[], datetime] | None = None,
                       progress: TextIO | None = None,
                       progress_interval: float = 1.0) -> dict[str, Any]:
    """Run the whole thing and return the report. ``now`` is the clock TOTP codes are
    computed from (the server's clock: tests pass their fixed clock)."""
    config.check()
    run = Run(config, now or (lambda: datetime.now(UTC)))
    seed = config.seed if config.seed is not None else secrets.randbits(32)
    ticker = (asyncio.create_task(_progress(run, progress, progress_interval))
              if progress else None)
    setup_seconds = 0.0
    try:
        await run.connect()
        t0 = time.perf_counter()
        await run.setup()
        setup_seconds = time.perf_counter() - t0
        # The measured window opens `warmup` seconds after the load starts.
        started_at = datetime.fromtimestamp(time.time() + config.warmup, UTC)
        measure_start, measure_end = await run.load(seed)
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        await run.close()
    return build_report(run, seed, started_at, setup_seconds,
                        max(measure_end - measure_start, 1e-9))


def build_report(run: Run, seed: int, started_at: datetime, setup_seconds: float,
                 seconds: float) -> dict[str, Any]:
    config = run.config
    overall = RpcStats()
    for stats in run.rec.rpcs.values():
        overall.latency.merge(stats.latency)
        overall.ok += stats.ok
        overall.errors.update(stats.errors)
        overall.expected_errors.update(stats.expected_errors)
        overall.unexpected_outcomes += stats.unexpected_outcomes
    unexpected = sum(overall.errors.values()) + overall.unexpected_outcomes
    scenarios = [config.scenario] if config.scenario != "mixed" else [n for n, _ in MIXED]
    try:
        loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    except RuntimeError:
        loop_name = "asyncio"
    return {
        "tool": "mfa-service loadtest",
        "report_version": 1,
        "started_at": started_at.isoformat(),
        "duration_seconds": round(seconds, 3),
        "parameters": {
            "target": config.target, "connections": config.connections,
            "concurrency": config.concurrency, "duration_seconds": config.duration,
            "warmup_seconds": config.warmup, "users": config.users,
            "scenario": config.scenario,
            "mix": dict(MIXED) if config.scenario == "mixed" else {config.scenario: 1.0},
            "plaintext": config.plaintext, "bearer_token": config.token is not None,
            "max_calls": config.max_calls, "rpc_timeout_seconds": config.rpc_timeout,
            "seed": seed,
        },
        "environment": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "grpcio": grpc.__version__, "protobuf": protobuf_version,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "event_loop": loop_name,
        },
        "setup": {"users": len(run.users), "sessions": len(run.session_users),
                  "seconds": round(setup_seconds, 3)},
        "overall": overall.as_report(seconds),
        "rpcs": {name: stats.as_report(seconds) for name, stats in sorted(run.rec.rpcs.items())},
        "scenarios": {name: {"operations": run.operations[name],
                             "ops_per_second": round(run.operations[name] / seconds, 1),
                             # > 0: the users, not the server, limited this scenario
                             "stalled_worker_seconds": round(run.stalled[name], 2)}
                      for name in scenarios},
        "unexpected": unexpected,
    }


def summary(report: dict[str, Any]) -> str:
    """A short human table of the report, for the terminal."""
    lines = [f"{'rpc':14s} {'count':>8s} {'rps':>8s} {'p50 ms':>8s} {'p90 ms':>8s} "
             f"{'p99 ms':>8s} {'max ms':>8s}  errors / expected"]
    rows = [*report["rpcs"].items(), ("overall", report["overall"])]
    for name, r in rows:
        lat = r["latency_ms"]
        lines.append(f"{name:14s} {r['count']:8d} {r['rps']:8.1f} {lat['p50']:8.2f} "
                     f"{lat['p90']:8.2f} {lat['p99']:8.2f} {lat['max']:8.2f}  "
                     f"{r['errors'] or '-'} / {r['expected_errors'] or '-'}")
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mfa-service loadtest",
        description="Drive a local mfa-service through the generated async stubs and report "
                    "RPS and latency percentiles per RPC as JSON.")
    parser.add_argument("--target", required=True, help="HOST:PORT of the server (loopback)")
    parser.add_argument("--connections", type=int, default=8,
                        help="separate channels (TCP connections) to spread calls over")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--users", type=int, default=200, help="users enrolled during setup")
    parser.add_argument("--scenario", choices=SCENARIOS, default="mixed",
                        help="mixed = 80%% check-session, 10%% list-factors, "
                             "10%% challenge-verify-wrong")
    parser.add_argument("--report", type=Path, help="write the JSON report here "
                                                   "(default: stdout)")
    parser.add_argument("--token", help="bearer token for the authorization metadata")
    parser.add_argument("--plaintext", action="store_true", help="no TLS")
    parser.add_argument("--ca-file", type=Path, help="CA to verify the server with (TLS)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a non-loopback target")
    parser.add_argument("--max-calls", type=int, help="stop after this many measured calls")
    parser.add_argument("--rpc-timeout", type=float, default=10.0, help="deadline per call (s)")
    parser.add_argument("--seed", type=int, help="seed for the random choices")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = LoadConfig(
        target=args.target, connections=args.connections, concurrency=args.concurrency,
        duration=args.duration, warmup=args.warmup, users=args.users, scenario=args.scenario,
        token=args.token, plaintext=args.plaintext, ca_file=args.ca_file,
        allow_remote=args.allow_remote, max_calls=args.max_calls,
        rpc_timeout=args.rpc_timeout, seed=args.seed)
    try:
        config.check()
    except LoadTestError as exc:
        print(f"mfa-service loadtest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    run: Callable[[Coroutine[Any, Any, dict[str, Any]]], dict[str, Any]] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop  # the client is CPU-bound too (BASELINES: ~0.7 core at 4-5k RPS)

        run = uvloop.run
    try:
        report = run(run_loadtest(config, progress=sys.stderr))
    except LoadTestError as exc:
        print(f"mfa-service loadtest: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        return 130
    text = json.dumps(report, indent=2)
    if args.report is not None:
        args.report.write_text(text + "\n")
    else:
        print(text)
    print(summary(report), file=sys.stderr)
    return EXIT_UNEXPECTED if report["unexpected"] else EXIT_OK
