"""The revocation listener's heartbeat (PostgreSQL): a listening connection that goes
half-open (no FIN, no RST: it simply stops delivering) is noticed within 2 s, the cache
turns itself off so every CheckSession reads the database, and it comes back, empty, once
the listener hears its heartbeat again. Revocations cross servers within a second (across
real processes: tests/system/test_revocation_listener.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy.engine import make_url

import mfa_service.app
from mfa_service.app import App, create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.service.session_cache import (
    KEEPALIVE_IDLE,
    RevocationListener,
    SessionCache,
)
from tests.support.client import enroll_app, login
from tests.support.config import TEST_KEYRING, make_settings
from tests.support.replica import Replica
from tests.support.statements import counting


class StallingProxy:
    """A loopback TCP proxy that can stop forwarding without closing anything: what a
    half-open connection looks like to both ends (bytes sent, nothing comes back)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._forwarding = asyncio.Event()
        self._forwarding.set()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def __aenter__(self) -> StallingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._forwarding.set()
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()

    def stall(self) -> None:
        self._forwarding.clear()

    def resume(self) -> None:
        self._forwarding.set()

    async def _accept(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self._target)
        self._writers += [client_w, server_w]
        await asyncio.gather(self._pump(client_r, server_w), self._pump(server_r, client_w),
                             return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._forwarding.wait()  # stalled: held here, the socket stays open
                writer.write(data)
                await writer.drain()
        finally:
            await self._forwarding.wait()
            writer.close()


def _dsn(url: str, port: int | None = None) -> str:
    u = make_url(url).set(drivername="postgresql")
    if port is not None:
        u = u.set(host="127.0.0.1", port=port)
    return u.render_as_string(hide_password=False)


def _cache(replica: Replica) -> SessionCache:
    assert replica.app.revocations is not None
    return replica.app.revocations._cache


async def _until(check: Callable[[], bool], seconds: float) -> float | None:
    """Seconds until ``check()`` holds, polled every 5 ms; None if not within ``seconds``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > seconds:
            return None
        await asyncio.sleep(0.005)
    return time.monotonic() - started


@pytest.fixture
async def proxied_pair(postgres_url: str, fresh_clock: FixedClock,
                       monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
                           tuple[Replica, Replica, StallingProxy]]:
    """Two servers on one database; the first one's *listening* connection goes through a
    StallingProxy (its heartbeats are sent directly, as they would be on a network where
    only the listening connection went half-open)."""
    url = make_url(postgres_url)
    apps: list[App] = []
    channels: list[aio.Channel] = []
    async with StallingProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        def through_proxy(cache: SessionCache, dsn: str, **kw: Any) -> RevocationListener:
            return RevocationListener(cache, _dsn(postgres_url, proxy.port),
                                      heartbeat_dsn=dsn, **kw)

        try:
            for patched in (True, False):
                with monkeypatch.context() as m:
                    if patched:
                        m.setattr(mfa_service.app, "RevocationListener", through_proxy)
                    apps.append(await create_server(
                        make_settings(postgres_url), clock=fresh_clock,
                        keyring=Keyring.parse(TEST_KEYRING)))
            replicas = []
            for app in apps:
                channels.append(aio.insecure_channel(f"127.0.0.1:{app.port}"))
                replicas.append(Replica(app, pb_grpc.TwoFactorServiceStub(channels[-1])))
            for r in replicas:
                await r.cache_on()
            yield replicas[0], replicas[1], proxy
        finally:
            for channel in channels:
                await channel.close()
            for app in apps:
                await app.stop(0)


async def test_a_half_open_listener_turns_the_cache_off_within_2_s_and_back_on(
        proxied_pair: tuple[Replica, Replica, StallingProxy], user_id: str,
        fresh_clock: FixedClock) -> None:
    a, b, proxy = proxied_pair
    factor = await enroll_app(b.stub, user_id, fresh_clock)
    revoked = (await login(b.stub, factor, fresh_clock)).session_token
    kept = (await login(b.stub, factor, fresh_clock)).session_token
    for token in (revoked, kept):
        assert await a.valid(token)  # cached on A
    cache = _cache(a)
    with counting(a.app) as statements:
        assert await a.valid(revoked) and await a.valid(kept)
        assert statements.sql == []  # both answered from A's cache

    proxy.stall()  # A's listening connection goes half-open: no error, just silence
    # Logged out through B meanwhile: its NOTIFY never reaches A.
    await b.stub.RevokeSession(pb.RevokeSessionRequest(session_token=revoked))
    detected = await _until(lambda: not cache.enabled, 5.0)
    assert detected is not None and detected < 2.0, (
        f"half-open listener noticed after {detected} s (want < 2 s)")
    print(f"half-open listener detected in {detected:.3f} s")
    assert len(cache) == 0

    with counting(a.app) as statements:
        assert not await a.valid(revoked)  # the revocation A never heard of
        assert await a.valid(kept)
        assert await a.valid(kept)
        assert len(statements.sql) == 3  # every check read the database: the cache is off

    proxy.resume()  # the network is back; the listener reconnects and hears its heartbeat
    back = await _until(lambda: cache.enabled, 15.0)
    assert back is not None, "the cache never came back after the network did"
    print(f"cache back {back:.3f} s after the proxy forwarded again")
    assert not await a.valid(revoked)
    with counting(a.app) as statements:
        assert await a.valid(kept)  # first read after the outage: the database
        assert await a.valid(kept)  # then the cache again
        assert len(statements.sql) == 1


async def test_a_revocation_through_one_process_is_seen_by_the_other_within_1_s(
        proxied_pair: tuple[Replica, Replica, StallingProxy], user_id: str,
        fresh_clock: FixedClock) -> None:
    a, b, _ = proxied_pair
    for revoker, checker in ((b, a), (a, b)):
        factor = await enroll_app(revoker.stub, f"{user_id}-{revoker.app.port}", fresh_clock)
        token = (await login(revoker.stub, factor, fresh_clock)).session_token
        for _ in range(3):
            assert await checker.valid(token)  # cached by the other process
        started = time.monotonic()
        await revoker.stub.RevokeSession(pb.RevokeSessionRequest(session_token=token))
        while await checker.valid(token):
            assert time.monotonic() - started < 1.0, "revocation not seen within 1 s"
            await asyncio.sleep(0.005)
        latency = time.monotonic() - started
        assert latency < 1.0, f"revocation seen after {latency:.3f} s (want < 1 s)"
        print(f"cross-process revocation seen in {latency * 1000:.1f} ms")


async def test_the_listening_connection_has_tcp_keepalives(
        proxied_pair: tuple[Replica, Replica, StallingProxy]) -> None:
    for replica in proxied_pair[:2]:
        assert isinstance(replica, Replica) and replica.app.revocations is not None
        conn = replica.app.revocations._listening
        assert conn is not None
        sock = conn._transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        with contextlib.suppress(AttributeError):  # Linux
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
