"""Outgoing messages for the sender tests: an email and a phone message carrying a known
code, so a test can say where the code must (not) appear."""

from __future__ import annotations

from mfa_service.delivery.messages import OutgoingMessage
from mfa_service.domain import Channel

CODE = "493817"
SENDER = "Cloud Platform <no-reply@example.test>"


def email_message(to: str = "alice@example.test", *, subject: str = "Your code",
                  message_id: str = "msg-0001") -> OutgoingMessage:
    return OutgoingMessage(message_id=message_id, channel=Channel.EMAIL, to=to,
                           subject=subject, text=f"Your code is {CODE}. Ærlig talt.")


def phone_message(channel: Channel = Channel.SMS, *, text: str = f"Code: {CODE}",
                  message_id: str = "msg-0002") -> OutgoingMessage:
    return OutgoingMessage(message_id=message_id, channel=channel, to="+4520123456",
                           subject="", text=text)
