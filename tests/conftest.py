"""Shared fixtures: real databases (SQLite file and PostgreSQL), an in-process server on
port 0 with a fixed clock, the generated async client, and the delivery rig (a server whose
outbox reaches real SMTP/HTTP receivers on loopback). The helpers these fixtures and the
tests use live in tests/support/.

The tiers (docs/TESTING.md): a test's tier is the directory it lives in, tests/unit,
tests/api or tests/system, and ``pytest_collection_modifyitems`` below marks it so
(``-m unit``, ``-m "unit or api"``). The fixtures here serve every tier, and a test module
placed directly in tests/ too (it gets no tier marker until it moves into one).

PostgreSQL: ``MFA_TEST_POSTGRES_URL`` (default postgres@127.0.0.1:5432, trust auth). Each
test session creates its own database and drops it at the end. Without PostgreSQL the
PostgreSQL half of the suite is skipped locally, and fails under ``CI=true``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy.engine import make_url

from mfa_service.app import App, create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring

# The helpers that lived here, importable from here as before (new code imports them from
# tests.support.config and tests.support.client).
from tests.support import examples
from tests.support.client import AppFactor as AppFactor
from tests.support.client import RichError as RichError
from tests.support.client import challenge as challenge
from tests.support.client import enroll_app as enroll_app
from tests.support.client import login as login
from tests.support.client import regenerate as regenerate
from tests.support.client import regenerate_proof as regenerate_proof
from tests.support.client import rich_error as rich_error
from tests.support.client import totp_at as totp_at
from tests.support.config import IN_CI as IN_CI
from tests.support.config import PG_ADMIN_URL as PG_ADMIN_URL
from tests.support.config import REPO as REPO
from tests.support.config import T0 as T0
from tests.support.config import TEST_KEYRING as TEST_KEYRING
from tests.support.config import asyncpg_dsn, migrate_to_head
from tests.support.config import make_settings as make_settings
from tests.support.fakes import HttpServer, RecordingHandler, http_server_running, smtp_server
from tests.support.rig import Rig, running_rig

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

_asyncpg_dsn, _migrate = asyncpg_dsn, migrate_to_head  # their names when they lived here

# -- tiers -------------------------------------------------------------------------------------
TIERS = ("unit", "api", "system")  # also the order they run in: the cheapest first
TESTS = Path(__file__).resolve().parent


def tier_of(path: Path) -> str | None:
    """``unit``, ``api`` or ``system`` for a file under that directory of tests/, else None."""
    try:
        first = path.resolve().relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return None
    return first if first in TIERS else None


def selects_no_system_test(config: pytest.Config) -> bool:
    """Whether this run leaves the system tier out: every path it was given is under
    tests/unit or tests/api, or its ``-m`` expression is false for a system test."""
    expression = config.getoption("markexpr", "")
    if expression:
        from _pytest.mark.expression import Expression

        def matcher(name: str, /, **kwargs: str | int | bool | None) -> bool:
            return name == "system"

        if not Expression.compile(expression).evaluate(matcher):
            return True
    paths = [Path(str(arg).split("::")[0]) for arg in config.args]
    return bool(paths) and all(tier_of(p) in ("unit", "api") for p in paths)


def pytest_configure(config: pytest.Config) -> None:
    # Before any test module is imported: Hypothesis fixes its settings at decoration.
    examples.choose(fast=selects_no_system_test(config))


def pytest_report_header(config: pytest.Config) -> str:
    share = "a third of the full" if examples.is_fast() else "full"
    return f"property-based tests: {share} example counts (tests/support/examples.py)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with the tier it lives in, and run unit, then api, then system (each
    tier keeps its own order; a test outside the tiers runs with api)."""
    rank: dict[pytest.Item, int] = {}
    for item in items:
        tier = tier_of(item.path)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))
        rank[item] = TIERS.index(tier or "api")
    items.sort(key=rank.__getitem__)


# -- databases ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
async def postgres_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    admin = make_url(PG_ADMIN_URL)
    name = f"mfa_test_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(asyncpg_dsn(PG_ADMIN_URL), timeout=5)
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
    await migrate_to_head(url)  # the production path: `mfa-service migrate` before `serve`
    yield url
    conn = await asyncpg.connect(asyncpg_dsn(PG_ADMIN_URL), timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def empty_postgres(postgres_url: str) -> AsyncIterator[str]:
    """A PostgreSQL database of its own with no schema at all, dropped afterwards."""
    name = f"mfa_empty_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(asyncpg_dsn(PG_ADMIN_URL), timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    conn = await asyncpg.connect(asyncpg_dsn(PG_ADMIN_URL), timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite file for this test session."""
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('sqlite') / 'mfa.db'}"
    await migrate_to_head(url)
    return url


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Every test that uses the store runs on both backends."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


# -- the shared server -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def clock() -> FixedClock:
    return FixedClock(T0)


@pytest.fixture
def fresh_clock(clock: FixedClock) -> FixedClock:
    """The shared clock, moved on to a fresh mid-step moment for this test."""
    clock.advance(3600)
    clock.set(clock.now().replace(second=15, microsecond=0))
    return clock


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


# -- the delivery rig (tests/support/rig.py) ---------------------------------------------------
@pytest.fixture(scope="module")
def smtp() -> Iterator[tuple[RecordingHandler, int]]:
    """A real SMTP server (aiosmtpd) on loopback that records what it accepts."""
    handler = RecordingHandler()
    with smtp_server(handler) as port:
        yield handler, port


@pytest.fixture
async def provider() -> AsyncIterator[HttpServer]:
    """A real HTTP server on loopback (webhook and Twilio shapes) that records requests."""
    async with http_server_running() as server:
        yield server


@pytest.fixture(params=["webhook", "twilio"])
async def rig(request: pytest.FixtureRequest, database_url: str,
              smtp: tuple[RecordingHandler, int], provider: HttpServer,
              fresh_clock: FixedClock) -> AsyncIterator[Rig]:
    """A server delivering through its outbox to ``smtp`` and ``provider``, on each
    database and with each phone provider shape."""
    async with running_rig(database_url, smtp, provider, fresh_clock, request.param) as r:
        yield r
