"""Revocations cross real processes: two `mfa-service serve` on one PostgreSQL database,
a logout through one is seen by the other's CheckSession cache within a second. (The
listener's heartbeat, in-process: tests/api/test_revocation_listener.py.)"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc

from tests.support.config import TEST_KEYRING
from tests.support.processes import CLI, clean_env, free_port, session_token, wait_serving


@pytest.mark.postgres
async def test_a_revocation_is_seen_by_another_server_process_within_1_s(
        postgres_url: str, tmp_path: Path) -> None:
    """Two real `mfa-service serve` processes on one database: the session is cached by
    the second; a logout through the first is invalid there within a second."""
    env = clean_env(MFA_DATABASE_URL=postgres_url, MFA_KEYRING=TEST_KEYRING,
                    MFA_LOG_LEVEL="WARNING", MFA_PURGE_INTERVAL_SECONDS="0",
                    MFA_SHUTDOWN_DRAIN_SECONDS="0")
    procs, targets = [], []
    try:
        for i in range(2):
            target = f"127.0.0.1:{free_port()}"
            with (tmp_path / f"server-{i}.log").open("wb") as log:
                procs.append(subprocess.Popen([CLI, "serve"], cwd=tmp_path,
                                              env={**env, "MFA_LISTEN_ADDR": target},
                                              stderr=log))
            targets.append(target)
        for proc, target in zip(procs, targets, strict=True):
            await wait_serving(target, proc)
        async with aio.insecure_channel(targets[0]) as first, \
                aio.insecure_channel(targets[1]) as second:
            a, b = pb_grpc.TwoFactorServiceStub(first), pb_grpc.TwoFactorServiceStub(second)
            token = await session_token(a)
            check = pb.CheckSessionRequest(session_token=token,
                                           application=pb.APPLICATION_BACKOFFICE)
            await asyncio.sleep(1.5)  # the second process's listener hears a heartbeat
            for _ in range(3):
                assert (await b.CheckSession(check)).valid  # now answered from its cache
            started = time.monotonic()
            await a.RevokeSession(pb.RevokeSessionRequest(session_token=token))
            while (await b.CheckSession(check)).valid:
                assert time.monotonic() - started < 1.0, "revocation not seen within 1 s"
                await asyncio.sleep(0.005)
            latency = time.monotonic() - started
            print(f"revocation seen by the other process in {latency * 1000:.1f} ms")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
