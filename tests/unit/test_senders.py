"""The senders' checks that need no server: configuration, the channels each accepts, the
URLs they need, the console sender's log record, and a message's repr hiding its text.
(Against real SMTP and HTTP servers on loopback: tests/api/test_senders.py.)"""

from __future__ import annotations

import logging

import httpx
import pytest

from mfa_service.delivery.messages import OutgoingMessage
from mfa_service.delivery.senders import (
    ConsoleSender,
    Sender,
    SmtpSender,
    TwilioSender,
    WebhookSender,
)
from mfa_service.domain import Channel
from tests.support.messages import CODE, SENDER, email_message, phone_message


async def test_smtp_sender_accepts_email_only() -> None:
    with pytest.raises(ValueError, match="email only"):
        await SmtpSender("127.0.0.1", 25, "none", None, None, SENDER).send(phone_message())


def test_smtp_sender_configuration_is_checked() -> None:
    with pytest.raises(ValueError, match="together"):
        SmtpSender("h", 25, "none", "user", None, SENDER)
    with pytest.raises(ValueError, match="tls"):
        SmtpSender("h", 25, "ssl", None, None, SENDER)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sender"):
        SmtpSender("h", 25, "none", None, None, "not an address")


async def test_http_senders_accept_phone_channels_only() -> None:
    async with httpx.AsyncClient() as client:
        senders: list[Sender] = [
            WebhookSender("http://127.0.0.1:9/send", client=client),
            TwilioSender("http://127.0.0.1:9", "AC123", "token", "+4570000000", client=client),
        ]
        for sender in senders:
            with pytest.raises(ValueError, match="sms and voice only"):
                await sender.send(email_message())


def test_http_senders_require_an_http_url() -> None:
    with pytest.raises(ValueError, match="http"):
        WebhookSender("ftp://gateway.test/send")
    with pytest.raises(ValueError, match="http"):
        TwilioSender("file:///etc", "AC123", "token", "+4570000000")


async def test_console_sender_logs_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    sender = ConsoleSender()
    with caplog.at_level(logging.WARNING, logger="mfa_service.delivery.console"):
        await sender.send(email_message(subject="Your code"))
    await sender.aclose()

    (record,) = [r for r in caplog.records if r.name == "mfa_service.delivery.console"]
    assert record.levelno == logging.WARNING
    assert getattr(record, "channel") == "email"  # noqa: B009 - extra= fields
    assert getattr(record, "to") == "alice@example.test"  # noqa: B009
    assert getattr(record, "subject") == "Your code"  # noqa: B009
    assert CODE in getattr(record, "text")  # noqa: B009
    assert CODE in record.getMessage()  # visible with a plain-text formatter too


def test_outgoing_message_repr_hides_the_text() -> None:
    assert CODE not in repr(email_message())
    with pytest.raises(ValueError, match="channel"):
        OutgoingMessage(message_id="m", channel=Channel.NONE, to="x", subject="", text="t")
