"""One run: connect, set up users, warm up, measure, and (with --baseline) the same
against a bare server first.

- ``--connections`` separate channels, each with its own subchannel pool and so its own
  TCP connection: the kernel balances connections, not calls, between server processes
  (MFA_WORKERS), and one connection would pin every call to one of them.
- ``--concurrency`` workers, each making one operation at a time in a closed loop.
- Only calls that start after the warm-up are recorded; the run is bounded by
  ``--duration`` (and ``--max-calls``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

import grpc
from grpc import aio
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc

from mfa_service.loadtest import report
from mfa_service.loadtest.baseline import echo_server
from mfa_service.loadtest.config import ECHO, LoadConfig, LoadTestError
from mfa_service.loadtest.recorder import Recorder
from mfa_service.loadtest.scenarios import NEEDS, Result, Scenarios
from mfa_service.loadtest.setup import Enroller
from mfa_service.loadtest.users import User, read_users_file, write_back_steps

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

STALL_SECONDS = 0.05  # how long a worker waits when no user can be used right now
CONNECT_TIMEOUT_SECONDS = 10.0


class Run:
    """Shared state of one run: channels, users, the recorder and the clock."""

    def __init__(self, config: LoadConfig, now: Callable[[], datetime],
                 label: str = "loadtest") -> None:
        self.config = config
        self.now = now
        self.label = label
        self.rec = Recorder()
        self.metadata: tuple[tuple[str, str], ...] | None = (
            (("authorization", f"Bearer {config.token}"),) if config.token else None)
        self.channels: list[aio.Channel] = []
        self.stubs: list[Stub] = []
        self.prefix = f"lt-{secrets.token_hex(4)}"
        self.scenarios = self._scenarios([])
        self.enroller: Enroller | None = None
        self.phase = "connect"
        self.end = math.inf
        self.operations: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        # Worker-seconds spent waiting because no user could be used (login, lockouts).
        self.stalled: defaultdict[str, float] = defaultdict(float)

    def _scenarios(self, users: list[User]) -> Scenarios:
        return Scenarios(self.rec, users=users, rpc_timeout=self.config.rpc_timeout,
                         metadata=self.metadata, now=self.now, prefix=self.prefix)

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
                asyncio.gather(*(ch.channel_ready() for ch in self.channels)),
                timeout=CONNECT_TIMEOUT_SECONDS)
        except TimeoutError:
            raise LoadTestError(f"cannot connect to {config.target} within "
                                f"{CONNECT_TIMEOUT_SECONDS:.0f} s") from None

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    # ---- setup (not measured)
    async def setup(self) -> None:
        self.phase = "setup"
        config = self.config
        needs_users, needs_sessions = NEEDS[config.scenario]
        users: list[User] = []
        if needs_users and config.users_file is not None:
            users = read_users_file(config.users_file, config.wanted_users)
        elif needs_users:
            self.enroller = Enroller(self.stubs, prefix=self.prefix, now=self.now,
                                     metadata=self.metadata)
            users = await self.enroller.enrol(config.wanted_users or 0, config.concurrency,
                                              with_sessions=needs_sessions)
        self.scenarios = self._scenarios(users)
        if needs_sessions and not self.scenarios.session_users:
            raise LoadTestError("no user has a session to check (seed with --sessions)")

    # ---- the load itself
    def _stopping(self) -> bool:
        limit = self.config.max_calls
        return time.perf_counter() >= self.end or (
            limit is not None and self.rec.measured >= limit)

    async def worker(self, index: int, seed: int) -> None:
        stub = self.stubs[index % len(self.stubs)]
        rng = random.Random(seed + index)  # noqa: S311 - load shape, not security
        scenarios = self.scenarios
        while not self._stopping():
            name = scenarios.pick(self.config.scenario, rng)
            started = time.perf_counter()
            result = await scenarios.table[name](stub, rng)
            measured = started >= self.rec.measure_from
            if result is Result.NO_USER:
                await asyncio.sleep(STALL_SECONDS)
                if measured:
                    self.stalled[name] += time.perf_counter() - started
            elif measured:
                self.operations[name] += 1
                self.completed[name] += result is Result.COMPLETED

    async def load(self, seed: int) -> tuple[float, float]:
        """Warm up, then measure; returns (measure start, measure end) in perf_counter time."""
        config = self.config
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
            return f"{self.label} connecting to {self.config.target}"
        if self.phase == "setup":
            done = self.enroller.done if self.enroller else 0
            return f"{self.label} setup: {done}/{self.config.wanted_users} users enrolled"
        now = time.perf_counter()
        phase = "warmup" if now < self.rec.measure_from else "measure"
        elapsed = now - (self.rec.measure_from - self.config.warmup)
        total = self.config.warmup + self.config.duration
        return (f"{self.label} {phase:7s} {min(elapsed, total):6.1f}/{total:.0f}s  "
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


@dataclass(frozen=True)
class Measured:
    """A finished run, for the report."""

    run: Run
    seed: int
    started_at: datetime
    setup_seconds: float
    seconds: float  # the measured window


async def measure(config: LoadConfig, seed: int, now: Callable[[], datetime], *,
                  label: str = "loadtest", progress: TextIO | None = None,
                  progress_interval: float = 1.0) -> Measured:
    """Connect, set up, warm up and measure one scenario against one target."""
    run = Run(config, now, label)
    ticker = (asyncio.create_task(_progress(run, progress, progress_interval))
              if progress else None)
    try:
        await run.connect()
        t0 = time.perf_counter()
        await run.setup()
        setup_seconds = time.perf_counter() - t0
        # The measured window opens `warmup` seconds after the load starts.
        started_at = datetime.fromtimestamp(time.time() + config.warmup, UTC)
        try:
            measure_start, measure_end = await run.load(seed)
        finally:
            if config.users_file is not None and config.scenario == "login":
                # The steps this run spent must not be offered to the server again.
                write_back_steps(config.users_file, run.scenarios.users)
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        await run.close()
    return Measured(run, seed, started_at, setup_seconds,
                    max(measure_end - measure_start, 1e-9))


async def run_loadtest(config: LoadConfig, *, now: Callable[[], datetime] | None = None,
                       progress: TextIO | None = None,
                       progress_interval: float = 1.0) -> dict[str, Any]:
    """Run the whole thing and return the report. ``now`` is the clock TOTP codes are
    computed from (the server's clock: tests pass their fixed clock).

    With ``config.baseline`` the bare server is measured first, with the same
    connections, concurrency, warm-up and duration, and the report gives every RPC and
    scenario as a ratio to it.
    """
    config.check()
    clock = now or (lambda: datetime.now(UTC))
    seed = config.seed if config.seed is not None else secrets.randbits(32)
    kw: dict[str, Any] = {"progress": progress, "progress_interval": progress_interval}
    baseline: Measured | None = None
    if config.baseline:
        async with echo_server() as target:
            # Plaintext: the bare server has no certificate. Same metadata, so the client
            # does the same work per call.
            echo = replace(config, target=target, scenario=ECHO, plaintext=True,
                           ca_file=None, users=None, users_file=None, baseline=False)
            baseline = await measure(echo, seed, clock, label="baseline", **kw)
    measured = await measure(config, seed, clock, **kw)
    return report.build_report(measured, baseline)
