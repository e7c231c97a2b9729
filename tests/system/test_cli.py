"""The entry points as an operator runs them: real processes, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

CLI = str(Path(sys.executable).parent / "mfa-service")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MFA_")}
    env.update(extra)
    return env


async def _wait_serving(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                resp = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except aio.AioRpcError:
                pass
            assert asyncio.get_running_loop().time() < deadline, "server never became SERVING"
            await asyncio.sleep(0.1)


async def _wait_scrapable(ports: list[int], proc: subprocess.Popen[bytes],
                          timeout: float = 20) -> None:
    """Until each port answers an HTTP scrape (each worker's metrics endpoint)."""
    import httpx

    deadline = asyncio.get_running_loop().time() + timeout
    async with httpx.AsyncClient() as client:
        for port in ports:
            while True:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/metrics")).is_success:
                        break
                except httpx.TransportError:
                    pass
                assert asyncio.get_running_loop().time() < deadline, f"{port} never answered"
                await asyncio.sleep(0.1)


async def test_serve_with_no_configuration_then_graceful_stop(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen([CLI, "serve"], cwd=tmp_path, stderr=subprocess.PIPE,
                            env=_env(MFA_LISTEN_ADDR=f"127.0.0.1:{port}"))
    try:
        await _wait_serving(port, proc)
        assert (tmp_path / "mfa-service.db").exists()  # created and migrated on first start
        probe = await asyncio.to_thread(
            subprocess.run, [CLI, "health"], cwd=tmp_path, capture_output=True, text=True,
            timeout=30, env=_env(MFA_LISTEN_ADDR=f"127.0.0.1:{port}"))
        assert (probe.returncode, probe.stdout.strip()) == (0, "SERVING")
        keys = tmp_path / "mfa-service.keys"
        assert stat.S_IMODE(keys.stat().st_mode) == 0o600
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
        log = proc.stderr.read().decode() if proc.stderr else ""
        assert "development keys" in log and "shutting down" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


async def test_postgres_needs_migrate_before_serve(tmp_path: Path, empty_postgres: str) -> None:
    env = _env(MFA_DATABASE_URL=empty_postgres, MFA_LISTEN_ADDR=f"127.0.0.1:{_free_port()}",
               MFA_KEY_FILE=str(tmp_path / "k.keys"))
    refused = await asyncio.to_thread(subprocess.run, [CLI, "serve"], cwd=tmp_path, env=env,
                                      capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "run `mfa-service migrate` first" in refused.stderr

    migrated = await asyncio.to_thread(subprocess.run, [CLI, "migrate"], cwd=tmp_path, env=env,
                                       capture_output=True, text=True, timeout=60)
    assert migrated.returncode == 0, migrated.stderr
    assert "schema at revision" in migrated.stdout


async def test_invalid_settings_are_refused_with_a_message(tmp_path: Path) -> None:
    result = await asyncio.to_thread(
        subprocess.run, [CLI, "serve"], cwd=tmp_path, capture_output=True, text=True,
        timeout=60, env=_env(MFA_CODE_TTL_SECONDS="3600"))
    assert result.returncode == 2
    assert "code_ttl_seconds" in result.stderr


def test_health_fails_when_nothing_listens(tmp_path: Path) -> None:
    probe = subprocess.run([CLI, "health", "--timeout", "1"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=30,
                           env=_env(MFA_LISTEN_ADDR=f"127.0.0.1:{_free_port()}"))
    assert probe.returncode == 1
    assert "unhealthy: UNAVAILABLE" in probe.stderr


def test_keys_generate_prints_a_usable_entry() -> None:
    from mfa_service.crypto import Keyring

    out = subprocess.run([CLI, "keys", "generate", "--id", "prod-1"], capture_output=True,
                         text=True, check=True, timeout=60).stdout.strip()
    assert Keyring.parse(out).primary_id == "prod-1"


def test_callers_new_token_prints_a_token_and_its_hash() -> None:
    import hashlib

    out = subprocess.run([CLI, "callers", "new-token"], capture_output=True, text=True,
                         check=True, timeout=60).stdout.splitlines()
    token = out[0].rsplit(" ", 1)[1]
    digest = out[1].rsplit(" ", 1)[1].strip('"')
    assert len(token) >= 43
    assert hashlib.sha256(token.encode()).hexdigest() == digest


def _two_free_ports() -> int:
    """A port p with p + 1 free as well (worker i serves metrics on p + i)."""
    while True:
        port = _free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


async def test_several_workers_share_one_port_and_stop_together(tmp_path: Path) -> None:
    import httpx
    from mfa.v1 import two_factor_service_pb2 as pb
    from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc

    port, metrics = _free_port(), _two_free_ports()
    proc = subprocess.Popen([CLI, "serve", "--workers", "2"], cwd=tmp_path,
                            stderr=subprocess.PIPE,
                            env=_env(MFA_LISTEN_ADDR=f"127.0.0.1:{port}",
                                     MFA_METRICS_ADDR=f"127.0.0.1:{metrics}"))
    try:
        await _wait_serving(port, proc)
        children_file = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        workers = [pid for pid in children_file.read_text().split()
                   if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2
        # Health answered from one worker; the other may still be starting (a loaded box
        # took long enough that its scrape endpoint refused): wait until both are up.
        await _wait_scrapable([metrics, metrics + 1], proc)
        # Many connections, as the kernel balances connections: every call is served.
        for i in range(8):
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.TwoFactorServiceStub(channel)
                listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=f"nobody-{i}"))
                assert list(listed.factors) == []
        # Each worker has its own scrape endpoint (MFA_METRICS_ADDR's port + its index);
        # together they counted every call.
        served = 0.0
        async with httpx.AsyncClient() as client:
            for p in (metrics, metrics + 1):
                text = (await client.get(f"http://127.0.0.1:{p}/metrics")).text
                served += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                              if line.startswith("rpc_server_call_duration_seconds_count{")
                              and 'rpc_method="ListFactors"' in line)
        assert served == 8
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
                f"/proc/{pid}/status").read_text().lower()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
