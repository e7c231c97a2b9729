"""A real PostgreSQL going down and coming back (a throwaway cluster, stopped like a crash).

Health turns NOT_SERVING as soon as a call finds the database gone (not at the next probe:
the probe interval here is a minute), SERVING again soon after the database returns, and
nothing committed before the outage is lost: factors, sessions, queued outbox messages.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy import func, select

from mfa_service.app import create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.store.models import outbox
from tests.support.client import enroll_app, login
from tests.support.config import T0, TEST_KEYRING, make_settings, migrate_to_head
from tests.support.pgcluster import Cluster

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

pytestmark = pytest.mark.postgres

SERVICE = "mfa.v1.TwoFactorService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        c.init()
        c.start()
        yield c
    finally:
        c.destroy()


@pytest.fixture
async def migrated(cluster: Cluster) -> str:
    await migrate_to_head(cluster.url)
    return cluster.url


async def _health(stub: health_pb2_grpc.HealthStub) -> list[int]:
    return [(await stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=2)).status
            for s in ("", SERVICE)]


async def _seconds_until(stub: health_pb2_grpc.HealthStub, wanted: int,
                         limit: float) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while (seen := await _health(stub)) != [wanted, wanted]:
        assert loop.time() - start < limit, f"health still {seen} after {limit} s"
        await asyncio.sleep(0.02)
    return loop.time() - start


async def test_health_follows_a_database_restart_and_nothing_committed_is_lost(
        cluster: Cluster, migrated: str) -> None:
    clock = FixedClock(T0)
    # The periodic probe is far away: only the failed call can flip health this fast.
    app = await create_server(make_settings(migrated, health_probe_seconds=60),
                              clock=clock, keyring=Keyring.parse(TEST_KEYRING))
    try:
        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub: Stub = pb_grpc.TwoFactorServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            user = f"user-{uuid.uuid4().hex[:10]}"
            factor = await enroll_app(stub, user, clock)
            session = await login(stub, factor, clock)
            mailer = f"user-{uuid.uuid4().hex[:10]}"
            queued = await stub.Enroll(pb.EnrollRequest(  # a code mail waits in the outbox
                user_id=mailer, method=pb.METHOD_EMAIL, email=f"{mailer}@example.com",
                application=pb.APPLICATION_PORTAL))

            async def pending_mail() -> int:
                async with app.database.transaction(readonly=True) as tx:
                    count = (await tx.execute(select(func.count()).where(
                        outbox.c.challenge_id == queued.challenge_id,
                        outbox.c.state == "pending"))).scalar()
                return count or 0

            assert await pending_mail() == 1
            assert await _health(health) == [SERVING, SERVING]

            await asyncio.to_thread(cluster.stop)
            with pytest.raises(aio.AioRpcError) as err:
                await stub.ListFactors(pb.ListFactorsRequest(user_id=user), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            to_not_serving = await _seconds_until(health, NOT_SERVING, 1.0)

            await asyncio.to_thread(cluster.start)
            to_serving = await _seconds_until(health, SERVING, 5.0)
            print(f"NOT_SERVING {to_not_serving:.3f} s after the first failed call; "
                  f"SERVING {to_serving:.3f} s after the database answered again")

            listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user), timeout=5)
            assert {(f.factor_id, f.status) for f in listed.factors
                    if f.method == pb.METHOD_AUTHENTICATOR_APP} == {
                (factor.factor_id, pb.FACTOR_STATUS_ACTIVE)}
            check = await stub.CheckSession(pb.CheckSessionRequest(
                session_token=session.session_token, application=pb.APPLICATION_BACKOFFICE),
                timeout=5)
            assert check.valid and check.user_id == user
            assert await pending_mail() == 1
            pending = await stub.ListFactors(pb.ListFactorsRequest(user_id=mailer), timeout=5)
            assert [f.status for f in pending.factors] == [pb.FACTOR_STATUS_PENDING]
    finally:
        await app.stop(0)
