"""Stopping an in-process server: the outbox dispatcher finishes the message it is sending.
(SIGTERM to a real `mfa-service serve` under load is in tests/system/test_shutdown.py.)"""

from __future__ import annotations

import asyncio
import uuid

from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy import select

from mfa_service.app import create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.store.models import outbox
from tests.support.config import TEST_KEYRING, make_settings
from tests.support.rig import unique_phone


async def test_stop_lets_the_dispatcher_finish_the_message_it_is_sending(
        database_url: str, fresh_clock: FixedClock) -> None:
    """The provider is mid-request when the server stops: the message is still settled
    as sent (not left claimed until its lease runs out, and not sent twice)."""
    received, answer = asyncio.Event(), asyncio.Event()

    async def slow_provider(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        received.set()
        await answer.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()

    provider = await asyncio.start_server(slow_provider, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{provider.sockets[0].getsockname()[1]}/send"
    app = await create_server(
        make_settings(database_url, outbox_dispatcher=True, outbox_poll_seconds=0.05,
                      phone_provider="webhook", phone_webhook_url=url),
        clock=fresh_clock, keyring=Keyring.parse(TEST_KEYRING))
    try:
        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            enrolled = await pb_grpc.TwoFactorServiceStub(channel).Enroll(pb.EnrollRequest(
                user_id=f"user-{uuid.uuid4().hex[:10]}", method=pb.METHOD_PHONE,
                phone_number=unique_phone(), channel=pb.CHANNEL_SMS,
                application=pb.APPLICATION_PORTAL), timeout=10)
        await asyncio.wait_for(received.wait(), timeout=5)
        stopping = asyncio.create_task(app.stop(2))
        await asyncio.sleep(0.3)
        assert not stopping.done()  # waiting for the message being sent
        answer.set()
        await asyncio.wait_for(stopping, timeout=10)
    finally:
        answer.set()
        provider.close()
        if not app._stopping.is_set():
            await app.stop(0)
    engine_app = await create_server(make_settings(database_url), clock=fresh_clock,
                                     keyring=Keyring.parse(TEST_KEYRING))
    try:
        async with engine_app.database.transaction(readonly=True) as tx:
            states = (await tx.execute(select(outbox.c.state).where(
                outbox.c.challenge_id == enrolled.challenge_id))).scalars().all()
    finally:
        await engine_app.stop(0)
    assert states == ["sent"]
