"""Graceful shutdown: SIGTERM to a real `mfa-service serve` under load loses no call; the
health-only listener answers `mfa-service health`. (A stop that waits for the message being
sent is in tests/api/test_shutdown.py.)

64 callers run CheckSession in a loop (on 8 connections, so that with two workers both
get some) against a server process; SIGTERM arrives mid-stream. Every call sent before
the signal succeeds; a call sent after it succeeds or fails with UNAVAILABLE, nothing
else (grpc.aio's own stop would CANCEL the calls it had queued: transport/gate.py).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc

from mfa_service.app import create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from tests.support.config import TEST_KEYRING, make_settings
from tests.support.processes import CLI, clean_env, free_port, session_token, wait_serving

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

CALLERS = 64
CONNECTIONS = 8
DRAIN, GRACE = 1.0, 3.0
LOAD_BEFORE_SIGNAL = 1.0  # seconds of calls before SIGTERM


@dataclass
class Tally:
    """Outcomes of calls, split by whether they were sent before the signal."""

    signal_at: float | None = None
    before: Counter[str] = field(default_factory=Counter)
    after: Counter[str] = field(default_factory=Counter)

    def record(self, sent_at: float, outcome: str) -> None:
        before = self.signal_at is None or sent_at < self.signal_at
        (self.before if before else self.after)[outcome] += 1


@pytest.mark.postgres
@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
async def test_sigterm_under_load_fails_no_call_sent_before_it(
        postgres_url: str, tmp_path: Path, workers: int) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = clean_env(MFA_LISTEN_ADDR=target, MFA_DATABASE_URL=postgres_url,
                    MFA_KEYRING=TEST_KEYRING, MFA_WORKERS=str(workers),
                    MFA_SHUTDOWN_DRAIN_SECONDS=str(DRAIN), MFA_SHUTDOWN_GRACE_SECONDS=str(GRACE),
                    MFA_LOG_LEVEL="WARNING", MFA_PURGE_INTERVAL_SECONDS="0",
                    MFA_HEALTH_PROBE_SECONDS="1")
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([CLI, "serve"], cwd=tmp_path, env=env, stderr=log)
    tally = Tally()
    try:
        await wait_serving(target, proc)
        # Separate channels (options differ) so each is its own connection.
        channels = [aio.insecure_channel(target, options=[("mfa.test.connection", i)])
                    for i in range(CONNECTIONS)]
        stubs: list[Stub] = [pb_grpc.TwoFactorServiceStub(c) for c in channels]
        request = pb.CheckSessionRequest(session_token=await session_token(stubs[0]),
                                         application=pb.APPLICATION_BACKOFFICE)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        async def caller(stub: Stub) -> None:
            while not stop.is_set():
                sent_at = loop.time()
                try:
                    answer = await stub.CheckSession(request, timeout=10)
                except aio.AioRpcError as err:
                    tally.record(sent_at, err.code().name)
                    await asyncio.sleep(0.01)  # the server is gone: do not spin
                else:
                    tally.record(sent_at, "OK" if answer.valid else "INVALID")

        callers = [asyncio.create_task(caller(stubs[i % CONNECTIONS]))
                   for i in range(CALLERS)]
        await asyncio.sleep(LOAD_BEFORE_SIGNAL)
        tally.signal_at = loop.time()
        proc.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(asyncio.to_thread(proc.wait),
                                           timeout=DRAIN + GRACE + 10)
        exit_seconds = loop.time() - tally.signal_at
        await asyncio.sleep(0.2)  # a few calls against the closed port
        stop.set()
        await asyncio.wait_for(asyncio.gather(*callers), timeout=15)
        for channel in channels:
            await channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"workers={workers}: before SIGTERM {dict(tally.before)}, "
          f"after {dict(tally.after)}, exit {exit_seconds:.2f} s")
    assert exit_code == 0, log_path.read_text("utf-8", "replace")[-3000:]
    assert set(tally.before) == {"OK"}, tally.before
    assert tally.before["OK"] > CALLERS  # the load was real
    assert set(tally.after) <= {"OK", "UNAVAILABLE"}, tally.after
    assert tally.after["OK"] > 0  # served through the drain period
    assert exit_seconds < DRAIN + GRACE + 1.5  # + the interpreter's own exit


async def test_health_only_listener_answers_plaintext(
        sqlite_url: str, fresh_clock: FixedClock) -> None:
    """MFA_HEALTH_LISTEN_ADDR: grpc.health.v1 on a port of its own, nothing else there."""
    app = await create_server(make_settings(sqlite_url, health_listen_addr="127.0.0.1:0"),
                              clock=fresh_clock, keyring=Keyring.parse(TEST_KEYRING))
    try:
        assert app.health_port and app.health_port != app.port
        async with aio.insecure_channel(f"127.0.0.1:{app.health_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "mfa.v1.TwoFactorService"):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service),
                                          timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(aio.AioRpcError) as err:
                await pb_grpc.TwoFactorServiceStub(channel).ListFactors(
                    pb.ListFactorsRequest(user_id="alice"), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # `mfa-service health` asks the health listener (plaintext, no client
            # certificate), not MFA_LISTEN_ADDR (here a port where nothing listens).
            env = clean_env(MFA_LISTEN_ADDR=f"127.0.0.1:{free_port()}",
                            MFA_HEALTH_LISTEN_ADDR=f"127.0.0.1:{app.health_port}")
            probe = await asyncio.to_thread(
                subprocess.run, [CLI, "health", "--timeout", "5"], capture_output=True,
                text=True, timeout=30, env=env)
            assert (probe.returncode, probe.stdout.strip()) == (0, "SERVING"), probe.stderr
            stopping = asyncio.create_task(app.stop(0, drain=0.5))
            await asyncio.sleep(0.1)  # draining: NOT_SERVING here too
            resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await stopping
    finally:
        if not app._stopping.is_set():
            await app.stop(0)
