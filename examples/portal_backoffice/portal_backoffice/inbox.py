"""The demo inbox: where mfa-service's messages land when the demo runs.

Two sinks stand in for real providers, and the service is configured to use them exactly
as it would use real ones (nothing here is special to the demo on the service's side):

- an SMTP server (aiosmtpd) for ``MFA_EMAIL_PROVIDER=smtp``;
- an HTTP endpoint for ``MFA_PHONE_PROVIDER=webhook``: ``POST /send`` with
  ``{"to", "channel": "sms"|"voice", "text", "message_id"}``.

Messages are kept in memory (the newest 200) and shown on the portal's Inbox page, so a
newcomer sees the codes; ``GET /messages.json`` serves them to scripts and tests. Never
run this beside real users: it is a mailbox anybody on the machine can read.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

KEEP = 200


@dataclass(frozen=True)
class Message:
    id: int
    received_at: str  # ISO 8601, UTC
    channel: str  # "email", "sms" or "voice"
    to: str
    subject: str
    text: str


class Inbox:
    """Received messages, newest last; safe to add to from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: deque[Message] = deque(maxlen=KEEP)
        self._seen_ids: deque[str] = deque(maxlen=KEEP)
        self._next = 1

    def add(self, channel: str, to: str, text: str, subject: str = "",
            message_id: str = "") -> None:
        with self._lock:
            # Providers get the outbox message id as an idempotency key: a retried send
            # (crash between send and commit) is the same message.
            if message_id and message_id in self._seen_ids:
                return
            if message_id:
                self._seen_ids.append(message_id)
            self._messages.append(Message(
                id=self._next, received_at=datetime.now(UTC).isoformat(timespec="seconds"),
                channel=channel, to=to, subject=subject, text=text))
            self._next += 1

    def messages(self) -> list[Message]:
        with self._lock:
            return list(self._messages)


class SmtpSink:
    """aiosmtpd handler: every accepted mail goes to the inbox."""

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode()
        mail = message_from_bytes(raw, policy=default_policy)
        text = ""
        if isinstance(mail, EmailMessage):
            body = mail.get_body(preferencelist=("plain", "html"))
            text = body.get_content() if body is not None else ""
        for rcpt in envelope.rcpt_tos:
            self._inbox.add("email", rcpt, text.strip(), subject=str(mail["Subject"] or ""),
                            message_id=str(mail["Message-ID"] or ""))
        return "250 Message accepted for delivery"


async def start_smtp(inbox: Inbox, sock: socket.socket) -> asyncio.Server:
    """Serve SMTP on an already bound socket (port 0 allowed) in the running loop."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: SMTP(SmtpSink(inbox), hostname="localhost"),
                                    sock=sock)


def webhook_app(inbox: Inbox) -> Starlette:
    """The HTTP side: the phone provider's webhook, and the messages for scripts/tests."""

    async def send(request: Request) -> Response:
        try:
            data: Any = json.loads(await request.body())
            to, channel, text = str(data["to"]), str(data["channel"]), str(data["text"])
        except (ValueError, KeyError, TypeError):
            return PlainTextResponse("bad request", status_code=400)
        if channel not in ("sms", "voice"):
            return PlainTextResponse("bad channel", status_code=400)
        message_id = request.headers.get("idempotency-key") or str(data.get("message_id", ""))
        inbox.add(channel, to, text, message_id=message_id)
        return JSONResponse({"status": "accepted"})

    async def messages(request: Request) -> Response:
        return JSONResponse([asdict(m) for m in inbox.messages()])

    return Starlette(routes=[Route("/send", send, methods=["POST"]),
                             Route("/messages.json", messages)])
