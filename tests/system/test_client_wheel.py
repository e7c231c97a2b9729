"""The client distribution (generated/ -> mfa-service-client) works on its own.

What the portal gets: a wheel built from generated/, installed alone into a clean virtual
environment (its declared dependencies resolved by pip, pinned to the versions this suite
runs), calling a real server through the stubs and the mfa_client helpers.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import subprocess
import sys
import venv
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc

from mfa_service.app import App, create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from tests.support.client import enroll_app, login
from tests.support.config import REPO, TEST_KEYRING, make_settings
from tests.support.packaging import CLIENT_DEPENDENCIES, requirement_name

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub


# Runs inside the clean environment: only the wheel and its dependencies are importable.
PORTAL = '''
import asyncio, json, sys

import grpc
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from mfa_client import ErrorReason, channel_options, error_details

async def main(target: str, token: str, user: str) -> dict[str, object]:
    out: dict[str, object] = {}
    async with aio.insecure_channel(target, options=channel_options()) as channel:
        stub = pb_grpc.TwoFactorServiceStub(channel)
        enrolled = await stub.Enroll(pb.EnrollRequest(
            user_id=user, method=pb.METHOD_AUTHENTICATOR_APP,
            application=pb.APPLICATION_PORTAL, account_name=user + "@example.com"), timeout=5)
        out["enrolled"] = [pb.FactorStatus.Name(enrolled.factor.status),
                           enrolled.otpauth_uri.startswith("otpauth://totp/")]
        check = await stub.CheckSession(pb.CheckSessionRequest(
            session_token=token, application=pb.APPLICATION_BACKOFFICE), timeout=5)
        out["check"] = [check.valid, check.user_id, pb.Application.Name(check.application)]
        try:
            await stub.ListFactors(pb.ListFactorsRequest(user_id=""), timeout=5)
        except grpc.aio.AioRpcError as err:
            details = error_details(err)
            out["error"] = [details.code.name, ErrorReason.Name(details.reason),
                            details.violations_by_field, details.retry_delay]
    try:
        import mfa_service  # noqa: F401
    except ModuleNotFoundError:
        out["server_importable"] = False
    else:
        out["server_importable"] = True
    return out

print(json.dumps(asyncio.run(main(*sys.argv[1:]))))
'''


@pytest.fixture(scope="module")
def client_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean virtual environment with only the client wheel and what it declares."""
    root = tmp_path_factory.mktemp("client")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(root), str(REPO / "generated")],
        capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = root.glob("mfa_service_client-*.whl")
    requires = [line.split(":", 1)[1].strip() for line in zipfile.ZipFile(wheel).read(
        next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA"))
    ).decode().splitlines() if line.startswith("Requires-Dist:")]
    assert {requirement_name(r) for r in requires} == CLIENT_DEPENDENCIES

    venv.create(root / "venv", with_pip=False, clear=True)  # pip comes from this suite
    python = root / "venv/bin/python"
    # The versions this suite runs (already in the local cache), so pip resolves quickly.
    (root / "pins.txt").write_text("".join(
        f"{d}=={importlib.metadata.version(d)}\n" for d in sorted(CLIENT_DEPENDENCIES)))
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
         "--disable-pip-version-check", "-c", str(root / "pins.txt"), str(wheel)],
        capture_output=True, text=True, timeout=300, check=False)
    assert install.returncode == 0, install.stderr[-2000:]
    return python


@pytest.fixture
async def sqlite_app(sqlite_url: str, fresh_clock: FixedClock) -> AsyncIterator[App]:
    app = await create_server(make_settings(sqlite_url, shutdown_drain_seconds=0),
                              clock=fresh_clock, keyring=Keyring.parse(TEST_KEYRING))
    yield app
    await app.stop(0)


def test_the_clean_environment_holds_the_client_and_nothing_of_the_server(
        client_python: Path) -> None:
    listing = subprocess.run(
        [str(client_python), "-I", "-c", "import importlib.metadata as m, json; "
         "print(json.dumps(sorted(d.metadata['Name'].lower() for d in m.distributions())))"],
        capture_output=True, text=True, timeout=60, check=True)
    installed = set(json.loads(listing.stdout))
    assert "mfa-service-client" in installed and installed >= CLIENT_DEPENDENCIES
    assert not installed & {"mfa-service", "sqlalchemy", "pyotp", "pydantic", "alembic"}


async def test_the_portal_calls_the_service_through_the_wheel_alone(
        client_python: Path, sqlite_app: App, fresh_clock: FixedClock, user_id: str,
        tmp_path: Path) -> None:
    target = f"127.0.0.1:{sqlite_app.port}"
    async with aio.insecure_channel(target) as channel:  # a login, done by this suite
        stub: Stub = pb_grpc.TwoFactorServiceStub(channel)
        session = await login(stub, await enroll_app(stub, user_id, fresh_clock), fresh_clock)
    script = tmp_path / "portal.py"
    script.write_text(PORTAL)
    # -I: isolated, so neither this checkout nor PYTHONPATH can leak into the environment.
    proc = await asyncio.create_subprocess_exec(
        str(client_python), "-I", str(script), target, session.session_token,
        f"{user_id}-new", cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    out = json.loads(stdout)
    assert out["enrolled"] == ["FACTOR_STATUS_PENDING", True]
    assert out["check"] == [True, user_id, "APPLICATION_PORTAL"]
    assert out["error"] == ["INVALID_ARGUMENT", "ERROR_REASON_INVALID_REQUEST",
                            {"user_id": "is required"}, None]
    assert out["server_importable"] is False
