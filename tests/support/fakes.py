"""Real servers at the edge of the world, on loopback and port 0: an SMTP server
(aiosmtpd) and a minimal HTTP/1.1 server standing in for SMS/voice providers.

They record what they receive and can be told to fail, so tests see exactly what a
provider would see.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


# -- SMTP server -----------------------------------------------------------------------------
class RecordingHandler:
    """aiosmtpd handler: records accepted messages; can refuse recipients or data."""

    def __init__(self) -> None:
        self.received: list[Envelope] = []
        self.rcpt_reply: str | None = None
        self.data_reply = "250 Message accepted for delivery"
        self._parsed: dict[Envelope, EmailMessage] = {}  # each message parsed once

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if self.rcpt_reply is not None:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply.startswith("250"):
            self.received.append(envelope)
        return self.data_reply

    def only_message(self) -> EmailMessage:
        assert len(self.received) == 1
        return self._parse(self.received[0])

    def messages(self) -> list[EmailMessage]:
        """Every accepted message, parsed (each once: tests poll this while waiting for a
        delivery, and a module's server keeps what every test of it received)."""
        return [self._parse(envelope) for envelope in list(self.received)]

    def _parse(self, envelope: Envelope) -> EmailMessage:
        parsed = self._parsed.get(envelope)
        if parsed is None:
            content = envelope.content
            assert isinstance(content, bytes)
            message = email.message_from_bytes(content, policy=email.policy.default)
            assert isinstance(message, EmailMessage)
            parsed = self._parsed[envelope] = message
        return parsed


class PortZeroController(Controller):
    """aiosmtpd's threaded Controller on an OS-chosen port.

    Controller.start() pokes the server at ``self.port`` to make it initialise; with
    port 0 that would connect nowhere, so read the real port first.
    """

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.Server)
        self.port = int(self.server.sockets[0].getsockname()[1])
        super()._trigger_server()  # type: ignore[no-untyped-call]  # unannotated upstream


@contextmanager
def smtp_server(handler: RecordingHandler, **kwargs: Any) -> Iterator[int]:
    controller = PortZeroController(handler, hostname="127.0.0.1", port=0,
                                    server_hostname="mail.test", **kwargs)
    controller.start()
    try:
        yield controller.port
    finally:
        controller.stop()


# -- HTTP server -----------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode(), strict_parsing=True).items()}


@dataclass
class HttpServer:
    """A minimal HTTP/1.1 server: one request per connection, a configurable answer."""

    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    port: int = 0

    def url(self, path: str = "/send") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await reader.readline()
            if not request_line:
                return
            method, path, _ = request_line.decode("latin-1").split(" ", 2)
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
            self.requests.append(RecordedRequest(method, path, headers, body))
            head = [f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}",
                    "Content-Type: application/json", f"Content-Length: {len(self.body)}",
                    "Connection: close", *(f"{k}: {v}" for k, v in self.headers.items())]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + self.body)
            await writer.drain()
        finally:
            writer.close()


@asynccontextmanager
async def http_server_running() -> AsyncIterator[HttpServer]:
    state = HttpServer()
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    async with server:
        yield state
