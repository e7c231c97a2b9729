"""Shared fixtures: real databases (SQLite file and PostgreSQL), an in-process server on
port 0 with a fixed clock, and the generated async client.

PostgreSQL: ``MFA_TEST_POSTGRES_URL`` (default postgres@127.0.0.1:5432, trust auth). Each
test session creates its own database and drops it at the end. Without PostgreSQL the
PostgreSQL half of the suite is skipped locally, and fails under ``CI=true``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pyotp
import pytest
from google.rpc import error_details_pb2
from grpc import aio
from grpc_status import rpc_status
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy.engine import make_url

from mfa_service.app import App, create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.settings import Settings

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

PG_ADMIN_URL = os.environ.get("MFA_TEST_POSTGRES_URL",
                              "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Mid-step start (RFC 6238 steps are 30 s): 2026-03-02T10:00:15Z.
T0 = datetime(2026, 3, 2, 10, 0, 15, tzinfo=UTC)
TEST_KEYRING = "test-1:" + "A" * 43


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
async def postgres_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    admin = make_url(PG_ADMIN_URL)
    name = f"mfa_test_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(_asyncpg_dsn(PG_ADMIN_URL), timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        message = f"PostgreSQL is not reachable at {admin.render_as_string()}: {exc}"
        if IN_CI:
            pytest.fail(message + " (CI=true: a missing PostgreSQL is a failure)")
        pytest.skip(message)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = admin.set(database=name).render_as_string(hide_password=False)
    await _migrate(url)  # the production path: `mfa-service migrate` before `serve`
    yield url
    conn = await asyncpg.connect(_asyncpg_dsn(PG_ADMIN_URL), timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def empty_postgres(postgres_url: str) -> AsyncIterator[str]:
    """A PostgreSQL database of its own with no schema at all, dropped afterwards."""
    name = f"mfa_empty_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(_asyncpg_dsn(PG_ADMIN_URL), timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    conn = await asyncpg.connect(_asyncpg_dsn(PG_ADMIN_URL), timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite file for this test session."""
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('sqlite') / 'mfa.db'}"
    await _migrate(url)
    return url


async def _migrate(url: str) -> None:
    from mfa_service.store import migrate
    from mfa_service.store.engine import create_engine

    engine = create_engine(make_url(url))
    try:
        await migrate.upgrade(engine)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Every test that uses the store runs on both backends."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture(scope="session")
def clock() -> FixedClock:
    return FixedClock(T0)


@pytest.fixture
def fresh_clock(clock: FixedClock) -> FixedClock:
    """The shared clock, moved on to a fresh mid-step moment for this test."""
    clock.advance(3600)
    clock.set(clock.now().replace(second=15, microsecond=0))
    return clock


def make_settings(database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url, "listen_addr": "127.0.0.1:0", "keyring": TEST_KEYRING,
        "health_probe_seconds": 0.2, "shutdown_grace_seconds": 0.5, "log_format": "text",
        "shutdown_drain_seconds": 0,
        # The shared server only queues messages; delivery tests run their own dispatchers
        # against real SMTP/HTTP servers.
        "outbox_dispatcher": False,
    }
    values.update(overrides)
    return Settings.model_validate(values)


@pytest.fixture(scope="session")
async def app(database_url: str, clock: FixedClock) -> AsyncIterator[App]:
    server = await create_server(make_settings(database_url), clock=clock,
                                 keyring=Keyring.parse(TEST_KEYRING))
    yield server
    await server.stop(0)


@pytest.fixture(scope="session")
async def channel(app: App) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: aio.Channel) -> Stub:
    return pb_grpc.TwoFactorServiceStub(channel)


@pytest.fixture
def user_id() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


# -- helpers used by many tests -------------------------------------------------------------
def totp_at(secret: str, clock: FixedClock, steps: int = 0) -> str:
    return pyotp.TOTP(secret).at(clock.now(), counter_offset=steps)


@dataclass
class AppFactor:
    factor_id: str
    secret: str
    user_id: str


async def enroll_app(stub: Stub, user_id: str,
                     clock: FixedClock) -> AppFactor:
    """Enrol and confirm an authenticator app; leaves the clock on the next step."""
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP,
        application=pb.APPLICATION_PORTAL, account_name=f"{user_id}@example.com"))
    result = await stub.Verify(pb.VerifyRequest(
        challenge_id=resp.challenge_id, code=totp_at(resp.totp_secret, clock)))
    assert result.result == pb.VERIFY_RESULT_APPROVED
    clock.advance(30)  # the next code is a new step, not a replay
    return AppFactor(resp.factor.factor_id, resp.totp_secret, user_id)


async def challenge(stub: Stub, factor: AppFactor,
                    purpose: pb.Purpose.ValueType = pb.PURPOSE_LOGIN,
                    application: pb.Application.ValueType = pb.APPLICATION_PORTAL,
                    ) -> pb.ChallengeResponse:
    """Open a challenge on an enrolled app factor."""
    return await stub.Challenge(pb.ChallengeRequest(
        user_id=factor.user_id, factor_id=factor.factor_id, purpose=purpose,
        application=application))


async def login(stub: Stub, factor: AppFactor, clock: FixedClock,
                application: pb.Application.ValueType = pb.APPLICATION_PORTAL) -> pb.Session:
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=factor.user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=application))
    result = await stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, code=totp_at(factor.secret, clock)))
    assert result.result == pb.VERIFY_RESULT_APPROVED, result
    clock.advance(30)
    return result.session


async def regenerate_proof(stub: Stub, factor: AppFactor, clock: FixedClock) -> str:
    """An approved PURPOSE_REGENERATE_RECOVERY_CODES challenge on an app factor (its id)."""
    ch = await challenge(stub, factor, pb.PURPOSE_REGENERATE_RECOVERY_CODES)
    result = await stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, code=totp_at(factor.secret, clock)))
    assert result.result == pb.VERIFY_RESULT_APPROVED, result
    clock.advance(30)
    return ch.challenge_id


async def regenerate(stub: Stub, factor: AppFactor, clock: FixedClock,
                     **extra: object) -> list[str]:
    """New recovery codes, proven with ``factor`` (which must be established)."""
    proof = await regenerate_proof(stub, factor, clock)
    resp = await stub.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(
        user_id=factor.user_id, proof_challenge_id=proof,
        application=pb.APPLICATION_PORTAL, **extra))  # type: ignore[arg-type]
    return list(resp.recovery_codes)


@dataclass
class RichError:
    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    field_violations: dict[str, str]
    retry_seconds: int | None
    error_infos: int


def rich_error(err: aio.AioRpcError) -> RichError:
    """Decode an AIP-193 error: google.rpc.Status with its details."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no google.rpc.Status in {err.code()}: {err.details()}"
    infos, violations, retry = [], {}, None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = {v.field: v.description for v in bad.field_violations}
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_r = error_details_pb2.RetryInfo()
            detail.Unpack(info_r)
            retry = info_r.retry_delay.seconds
    assert infos, "no ErrorInfo detail"
    return RichError(err.code(), status.message, infos[0].reason, infos[0].domain, violations,
                     retry, len(infos))


REPO = Path(__file__).resolve().parent.parent


# The delivery rig's fixtures (real SMTP and HTTP receivers), for every module that needs them.
from tests.rig import provider, rig, smtp  # noqa: E402, F401
