"""What a sender is asked to deliver, and how it reports that it could not.

The text of a message may contain a one-time code, so it never appears in an error
message, a log line or a ``repr``: operators get the channel, the provider's status and
whether a retry can help, which is all they need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mfa_service.domain import Channel

DELIVERABLE_CHANNELS = frozenset({Channel.EMAIL, Channel.SMS, Channel.VOICE})


@dataclass(frozen=True)
class OutgoingMessage:
    """One message for one recipient.

    Attributes:
        message_id: Unique per logical message; senders pass it to the provider as the
            idempotency key, so a retry after an ambiguous failure is not sent twice.
        channel: EMAIL, SMS or VOICE.
        to: An email address (EMAIL) or an E.164 number (SMS, VOICE).
        subject: The email subject; "" for SMS and VOICE.
        text: The plain-text body; for VOICE, the words to speak.
    """

    message_id: str
    channel: Channel
    to: str
    subject: str
    # repr=False: a dataclass repr lands in tracebacks and debug logs; the text may hold
    # a one-time code.
    text: str = field(repr=False)

    def __post_init__(self) -> None:
        if self.channel not in DELIVERABLE_CHANNELS:
            raise ValueError(f"cannot deliver on channel {self.channel!r}")
        if not self.message_id:
            raise ValueError("message_id is required (it is the idempotency key)")
        if not self.to:
            raise ValueError("to is required")


class DeliveryError(Exception):
    """A sender could not hand the message to its provider.

    The message names the provider's HTTP status or SMTP reply code where there is one,
    and never the message text.

    Attributes:
        retryable: True when the same message may succeed later (the provider or network
            was unavailable, or the operator must fix configuration); False when the
            provider refused this message for good (e.g. the recipient does not exist).
        retry_after_seconds: The provider's ``Retry-After`` hint, if it sent one.
    """

    def __init__(self, message: str, *, retryable: bool,
                 retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.retry_after_seconds = retry_after_seconds

    def __repr__(self) -> str:
        return f"DeliveryError({self.message!r}, retryable={self.retryable})"
