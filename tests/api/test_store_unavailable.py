"""PostgreSQL going away: calls answer UNAVAILABLE, health goes NOT_SERVING, both recover.

The fault is real and at the network edge: the server talks to PostgreSQL through a small
TCP proxy, which the test stops (listener closed, every proxied connection aborted) and
starts again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy.engine import make_url

from mfa_service.app import App, create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from tests.support.client import AppFactor, enroll_app, login, rich_error, totp_at
from tests.support.config import T0, TEST_KEYRING, make_settings

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

pytestmark = pytest.mark.postgres

SERVICE = "mfa.v1.TwoFactorService"
WAIT_SECONDS = 5.0  # the probe runs every 0.2 s (make_settings)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``stop`` is a hard network failure.

    With ``drop_on`` set, the proxy fails by itself the moment the client sends bytes
    containing it (that data is never forwarded): a connection lost mid-transaction.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self._tripping: asyncio.Task[None] | None = None
        self.port = 0
        self.drop_on: bytes | None = None
        self.tripped = asyncio.Event()

    async def start(self) -> int:
        """Listen on the previous port (or a free one the first time)."""
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Close the listener and abort every proxied connection, both sides."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for transport in list(self._transports):
            transport.abort()
        if server is not None:
            await server.wait_closed()
        others = self._tasks - {asyncio.current_task()}
        if others:  # aborted transports end the pipes; this only waits for the clean-up
            _, late = await asyncio.wait(others, timeout=5)
            assert not late, "proxy connections did not close"

    async def _accept(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._transports.add(client_w.transport)
        try:
            try:
                server_r, server_w = await asyncio.open_connection(*self._target)
            except OSError:
                return
            self._transports.add(server_w.transport)
            try:
                pipes = [asyncio.create_task(self._pipe(client_r, server_w, upstream=True)),
                         asyncio.create_task(self._pipe(server_r, client_w, upstream=False))]
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
                server_w.transport.abort()
                client_w.transport.abort()
                await asyncio.gather(*pipes)
            finally:
                server_w.transport.abort()
                self._transports.discard(server_w.transport)
        finally:
            client_w.transport.abort()
            self._transports.discard(client_w.transport)
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if upstream and self.drop_on is not None and self.drop_on in data:
                    self.drop_on = None
                    self._tripping = asyncio.create_task(self._trip())
                    return
                writer.write(data)
                await writer.drain()

    async def _trip(self) -> None:
        await self.stop()
        self.tripped.set()


@dataclass
class Outage:
    proxy: TcpProxy
    app: App
    stub: Stub
    health: health_pb2_grpc.HealthStub
    clock: FixedClock


@pytest.fixture
async def outage(postgres_url: str) -> AsyncIterator[Outage]:
    """A server whose only way to PostgreSQL is through a proxy the test controls."""
    url = make_url(postgres_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    clock = FixedClock(T0)
    app = None
    try:
        app = await create_server(
            make_settings(url.set(host="127.0.0.1", port=port).render_as_string(
                hide_password=False)),
            clock=clock, keyring=Keyring.parse(TEST_KEYRING))
        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield Outage(proxy, app, pb_grpc.TwoFactorServiceStub(channel),
                         health_pb2_grpc.HealthStub(channel), clock)
    finally:
        if app is not None:
            await app.stop(0)
        await proxy.stop()


async def health_of(o: Outage, service: str) -> int:
    resp = await o.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    status: int = resp.status
    return status


async def wait_for_health(o: Outage, wanted: int) -> None:
    """Poll both health entries until they say ``wanted`` (bounded, short polls)."""
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while True:
        seen = [await health_of(o, s) for s in ("", SERVICE)]
        if seen == [wanted, wanted]:
            return
        if asyncio.get_running_loop().time() > deadline:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name
            pytest.fail(f"health still {[name(s) for s in seen]} after {WAIT_SECONDS} s, "
                        f"wanted {name(wanted)}")
        await asyncio.sleep(0.05)


def every_rpc(factor: AppFactor, session_token: str,
              challenge_id: str) -> list[tuple[str, object]]:
    """One well-formed request per RPC; each needs the database to answer."""
    return [
        ("Enroll", pb.EnrollRequest(user_id=f"{factor.user_id}-new",
                                    method=pb.METHOD_AUTHENTICATOR_APP,
                                    application=pb.APPLICATION_PORTAL)),
        ("Challenge", pb.ChallengeRequest(user_id=factor.user_id, factor_id=factor.factor_id,
                                          purpose=pb.PURPOSE_LOGIN,
                                          application=pb.APPLICATION_PORTAL)),
        ("Verify", pb.VerifyRequest(challenge_id=challenge_id, code="123456")),
        ("Disable", pb.DisableRequest(user_id=factor.user_id, factor_id=factor.factor_id,
                                      challenge_id=challenge_id, code="123456")),
        ("CheckSession", pb.CheckSessionRequest(session_token=session_token,
                                                application=pb.APPLICATION_PORTAL)),
        ("ListFactors", pb.ListFactorsRequest(user_id=factor.user_id)),
        ("RevokeSession", pb.RevokeSessionRequest(user_id=f"{factor.user_id}-nobody")),
    ]


async def test_calls_answer_unavailable_while_the_database_is_gone_then_recover(
        outage: Outage) -> None:
    o, user = outage, f"user-{uuid.uuid4().hex[:10]}"
    factor = await enroll_app(o.stub, user, o.clock)
    session = await login(o.stub, factor, o.clock)
    opened = await o.stub.Challenge(pb.ChallengeRequest(
        user_id=user, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))

    await o.proxy.stop()
    seen = {}
    for rpc, request in every_rpc(factor, session.session_token, opened.challenge_id):
        with pytest.raises(aio.AioRpcError) as err:
            await getattr(o.stub, rpc)(request, timeout=10)
        e = rich_error(err.value)
        seen[rpc] = (e.code, e.reason, e.domain, e.error_infos)
    assert seen == {rpc: (grpc.StatusCode.UNAVAILABLE, "ERROR_REASON_STORE_UNAVAILABLE",
                          "mfa.v1", 1) for rpc, _ in every_rpc(factor, "", "")}

    await o.proxy.start()
    check = await o.stub.CheckSession(pb.CheckSessionRequest(
        session_token=session.session_token, application=pb.APPLICATION_BACKOFFICE))
    assert check.valid and check.user_id == user
    listed = await o.stub.ListFactors(pb.ListFactorsRequest(user_id=user))
    assert [f.status for f in listed.factors] == [pb.FACTOR_STATUS_ACTIVE] * 2  # + recovery
    # Nothing half-done during the outage: the open challenge still takes the right code.
    done = await o.stub.Verify(pb.VerifyRequest(
        challenge_id=opened.challenge_id, code=totp_at(factor.secret, o.clock)))
    assert done.result == pb.VERIFY_RESULT_APPROVED and done.session.user_id == user


async def test_health_follows_the_database(outage: Outage) -> None:
    o = outage
    assert [await health_of(o, s) for s in ("", SERVICE)] == [
        health_pb2.HealthCheckResponse.SERVING] * 2

    await o.proxy.stop()
    await wait_for_health(o, health_pb2.HealthCheckResponse.NOT_SERVING)

    await o.proxy.start()
    await wait_for_health(o, health_pb2.HealthCheckResponse.SERVING)
    listed = await o.stub.ListFactors(pb.ListFactorsRequest(user_id="anyone"))
    assert list(listed.factors) == []


async def test_connection_lost_mid_transaction_is_unavailable_and_rolled_back(
        outage: Outage) -> None:
    """The link dies as Enroll sends its first INSERT: UNAVAILABLE, and no factor appears."""
    o, user = outage, f"user-{uuid.uuid4().hex[:10]}"
    request = pb.EnrollRequest(user_id=user, method=pb.METHOD_AUTHENTICATOR_APP,
                               application=pb.APPLICATION_PORTAL)
    o.proxy.drop_on = b"INSERT INTO"
    with pytest.raises(aio.AioRpcError) as err:
        await o.stub.Enroll(request, timeout=10)
    assert o.proxy.tripped.is_set(), "the Enroll never sent an INSERT through the proxy"
    e = rich_error(err.value)
    assert (e.code, e.reason, e.domain, e.error_infos) == (
        grpc.StatusCode.UNAVAILABLE, "ERROR_REASON_STORE_UNAVAILABLE", "mfa.v1", 1)

    await o.proxy.start()
    listed = await o.stub.ListFactors(pb.ListFactorsRequest(user_id=user))
    assert list(listed.factors) == []
    retried = await o.stub.Enroll(request, timeout=10)
    listed = await o.stub.ListFactors(pb.ListFactorsRequest(user_id=user))
    assert [f.factor_id for f in listed.factors] == [retried.factor.factor_id]
