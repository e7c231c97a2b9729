"""One of several in-process servers on one PostgreSQL database, as a replica behind a load
balancer would be: its server, its client, and whether its CheckSession cache is on."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from mfa.v1 import two_factor_service_pb2 as pb

from mfa_service.app import App

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub


class Replica:
    def __init__(self, app: App, stub: Stub) -> None:
        self.app = app
        self.stub = stub

    async def valid(self, token: str) -> bool:
        answer = await self.stub.CheckSession(pb.CheckSessionRequest(
            session_token=token, application=pb.APPLICATION_PORTAL))
        return answer.valid

    async def cache_on(self) -> None:
        cache = self.app.revocations._cache if self.app.revocations else None
        assert cache is not None
        for _ in range(100):
            if cache.enabled:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the revocation listener never connected")
