"""Graceful shutdown: SIGTERM to a real `mfa-service serve` under load loses no call.

64 callers run CheckSession in a loop (on 8 connections, so that with two workers both
get some) against a server process; SIGTERM arrives mid-stream. Every call sent before
the signal succeeds; a call sent after it succeeds or fails with UNAVAILABLE, nothing
else (grpc.aio's own stop would CANCEL the calls it had queued: transport/gate.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pyotp
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy import select

from mfa_service.app import create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.store.models import outbox
from tests.conftest import TEST_KEYRING, make_settings
from tests.rig import unique_phone

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

CLI = str(Path(sys.executable).parent / "mfa-service")
CALLERS = 64
CONNECTIONS = 8
DRAIN, GRACE = 1.0, 3.0
LOAD_BEFORE_SIGNAL = 1.0  # seconds of calls before SIGTERM
STARTUP_SECONDS = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Tally:
    """Outcomes of calls, split by whether they were sent before the signal."""

    signal_at: float | None = None
    before: Counter[str] = field(default_factory=Counter)
    after: Counter[str] = field(default_factory=Counter)

    def record(self, sent_at: float, outcome: str) -> None:
        before = self.signal_at is None or sent_at < self.signal_at
        (self.before if before else self.after)[outcome] += 1


async def _wait_serving(target: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
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


async def _session_token(stub: Stub) -> str:
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


@pytest.mark.postgres
@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
async def test_sigterm_under_load_fails_no_call_sent_before_it(
        postgres_url: str, tmp_path: Path, workers: int) -> None:
    port = _free_port()
    target = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MFA_")}
    env.update(MFA_LISTEN_ADDR=target, MFA_DATABASE_URL=postgres_url, MFA_KEYRING=TEST_KEYRING,
               MFA_WORKERS=str(workers), MFA_SHUTDOWN_DRAIN_SECONDS=str(DRAIN),
               MFA_SHUTDOWN_GRACE_SECONDS=str(GRACE), MFA_LOG_LEVEL="WARNING",
               MFA_PURGE_INTERVAL_SECONDS="0", MFA_HEALTH_PROBE_SECONDS="1")
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([CLI, "serve"], cwd=tmp_path, env=env, stderr=log)
    tally = Tally()
    try:
        await _wait_serving(target, proc)
        # Separate channels (options differ) so each is its own connection.
        channels = [aio.insecure_channel(target, options=[("mfa.test.connection", i)])
                    for i in range(CONNECTIONS)]
        stubs: list[Stub] = [pb_grpc.TwoFactorServiceStub(c) for c in channels]
        request = pb.CheckSessionRequest(session_token=await _session_token(stubs[0]),
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


async def test_stop_lets_the_dispatcher_finish_the_message_it_is_sending(
        database_url: str, fresh_clock: FixedClock) -> None:
    """The provider is mid-request when the server stops: the message is still settled
    as sent (not left claimed until its lease runs out, and not sent twice)."""
    received, answer = asyncio.Event(), asyncio.Event()

    async def slow_provider(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        received.set()
        await answer.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()

    provider = await asyncio.start_server(slow_provider, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{provider.sockets[0].getsockname()[1]}/send"
    app = await create_server(
        make_settings(database_url, outbox_dispatcher=True, outbox_poll_seconds=0.05,
                      phone_provider="webhook", phone_webhook_url=url),
        clock=fresh_clock, keyring=Keyring.parse(TEST_KEYRING))
    try:
        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            enrolled = await pb_grpc.TwoFactorServiceStub(channel).Enroll(pb.EnrollRequest(
                user_id=f"user-{uuid.uuid4().hex[:10]}", method=pb.METHOD_PHONE,
                phone_number=unique_phone(), channel=pb.CHANNEL_SMS,
                application=pb.APPLICATION_PORTAL), timeout=10)
        await asyncio.wait_for(received.wait(), timeout=5)
        stopping = asyncio.create_task(app.stop(2))
        await asyncio.sleep(0.3)
        assert not stopping.done()  # waiting for the message being sent
        answer.set()
        await asyncio.wait_for(stopping, timeout=10)
    finally:
        answer.set()
        provider.close()
        if not app._stopping.is_set():
            await app.stop(0)
    engine_app = await create_server(make_settings(database_url), clock=fresh_clock,
                                     keyring=Keyring.parse(TEST_KEYRING))
    try:
        async with engine_app.database.transaction(readonly=True) as tx:
            states = (await tx.execute(select(outbox.c.state).where(
                outbox.c.challenge_id == enrolled.challenge_id))).scalars().all()
    finally:
        await engine_app.stop(0)
    assert states == ["sent"]


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
            env = {k: v for k, v in os.environ.items() if not k.startswith("MFA_")}
            env.update(MFA_LISTEN_ADDR=f"127.0.0.1:{_free_port()}",
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
