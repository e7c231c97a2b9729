"""Sender adapters: hand an ``OutgoingMessage`` to an email, SMS or voice provider.

Every failure becomes a ``DeliveryError`` whose ``retryable`` flag the caller acts on:

* **Retryable**: the network, the provider or our configuration failed, not the message.
  The same message can succeed later, so it must not be dropped. That includes
  authentication failures: the operator fixes the credentials, the queue drains.
* **Not retryable**: the provider refused this message for good (an unknown recipient,
  a malformed number). Sending it again cannot help.

Providers get ``message_id`` as an idempotency key, so a retry after an ambiguous failure
(a timeout after the provider accepted the request) does not text the user twice.

No sender except ``ConsoleSender`` logs or raises with the message text: it may contain
a one-time code. Error messages carry the provider's status instead.
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import logging
import re
import ssl
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Literal, Protocol
from urllib.parse import quote
from xml.sax.saxutils import escape

import aiosmtplib
import httpx

from mfa_service.delivery.messages import DeliveryError, OutgoingMessage
from mfa_service.domain import Channel

log = logging.getLogger("mfa_service.delivery")

TlsMode = Literal["none", "starttls", "tls"]


class Sender(Protocol):
    """Delivers messages on some channels; one instance is shared by all requests."""

    async def send(self, message: OutgoingMessage) -> None:
        """Hand ``message`` to the provider.

        Raises:
            DeliveryError: the provider did not accept the message.
            ValueError: the sender does not handle ``message.channel``.
        """
        ...

    async def aclose(self) -> None:
        """Release connections this sender owns."""
        ...


# -- console ---------------------------------------------------------------------------------
class ConsoleSender:
    """Logs each message, code included, at WARNING instead of sending it.

    Development only: it writes one-time codes into the log, which is why it logs at
    WARNING (it should be noticed) and why the app refuses it in production.
    """

    def __init__(self, logger_name: str = "mfa_service.delivery.console") -> None:
        self._log = logging.getLogger(logger_name)

    async def send(self, message: OutgoingMessage) -> None:
        self._log.warning(
            "console delivery (not sent) %s to %s: %s%s", message.channel.value, message.to,
            f"[{message.subject}] " if message.subject else "", message.text,
            extra={"message_id": message.message_id, "channel": message.channel.value,
                   "to": message.to, "subject": message.subject, "text": message.text})

    async def aclose(self) -> None:
        return None


# -- SMTP ------------------------------------------------------------------------------------
# One bare addr-spec: a To header with a comma or a display name would let a crafted
# address add recipients, and every recipient would get the code.
_BARE_ADDRESS = re.compile(r"[^\s@,;:<>()\[\]\\\"]+@[^\s@,;:<>()\[\]\\\"]+")
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_ENHANCED_STATUS = re.compile(r"\s*([245]\.\d{1,3}\.\d{1,3})\b")


def _smtp_reply(code: int, text: str) -> str:
    """The reply code and the RFC 3463 enhanced status, if any: ``reply 550 (5.1.1)``.

    The server's free text is left out; the codes say what an operator needs.
    """
    enhanced = _ENHANCED_STATUS.match(text or "")
    return f"reply {code}" + (f" ({enhanced.group(1)})" if enhanced else "")


def _is_transient(code: int) -> bool:
    """RFC 5321 section 4.2.1: 4yz is a transient failure, 5yz a permanent one."""
    return 400 <= code < 500


class SmtpSender:
    """Sends EMAIL messages through an SMTP submission server with aiosmtplib.

    One connection per message: codes are rare and latency-tolerant, and a fresh
    connection cannot be a dead pooled one.

    Args:
        host: The SMTP server.
        port: Usually 587 (``starttls``) or 465 (``tls``).
        tls: ``"tls"`` is implicit TLS from the first byte (RFC 8314); ``"starttls"``
            upgrades a plain connection and fails if the server does not offer STARTTLS
            (RFC 3207); ``"none"`` is for a relay on loopback or a test server only.
        username: AUTH user, or None for no authentication (then password is None too).
        password: AUTH password.
        sender: The From address, optionally with a display name ("Acme <no-reply@...>").
        timeout: Seconds allowed for each network operation.
        tls_context: Trust settings for the server certificate (default: system CAs).
    """

    def __init__(self, host: str, port: int, tls: TlsMode, username: str | None,
                 password: str | None, sender: str, timeout: float = 10.0,
                 tls_context: ssl.SSLContext | None = None) -> None:
        if tls not in ("none", "starttls", "tls"):
            raise ValueError(f"tls must be 'none', 'starttls' or 'tls', not {tls!r}")
        if (username is None) != (password is None):
            raise ValueError("username and password must be given together")
        _, address = email.utils.parseaddr(sender)
        if not _BARE_ADDRESS.fullmatch(address):
            raise ValueError("sender must contain one email address")
        self._host = host
        self._port = port
        self._tls = tls
        self._username = username
        self._password = password
        self._sender = sender
        self._envelope_sender = address
        self._domain = address.rpartition("@")[2]
        self._timeout = timeout
        self._tls_context = tls_context

    def _build(self, message: OutgoingMessage) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self._sender
        msg["To"] = message.to
        msg["Subject"] = message.subject
        msg["Date"] = email.utils.format_datetime(datetime.now(UTC))
        # The same id on every retry lets receivers and mail clients spot a duplicate.
        local = (message.message_id if _SAFE_ID.fullmatch(message.message_id)
                 else hashlib.sha256(message.message_id.encode()).hexdigest()[:32])
        msg["Message-ID"] = f"<{local}@{self._domain}>"
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies
        # Quoted-printable keeps the body 7-bit clean for servers without 8BITMIME.
        msg.set_content(message.text, charset="utf-8", cte="quoted-printable")
        return msg

    def _where(self) -> str:
        return f"SMTP {self._host}:{self._port}"

    async def send(self, message: OutgoingMessage) -> None:
        """Submit one email.

        Raises:
            ValueError: ``message`` is not an EMAIL message.
            DeliveryError: see the module docstring; SMTP replies follow RFC 5321 reply
                classes (4yz transient, 5yz permanent) for the recipient and the message
                data. A 5yz at any other step (greeting, EHLO, AUTH, MAIL FROM) is about
                our server or configuration, not this message, so it stays retryable.
        """
        if message.channel is not Channel.EMAIL:
            raise ValueError(f"SmtpSender sends email only, not {message.channel.value}")
        if not _BARE_ADDRESS.fullmatch(message.to):
            raise DeliveryError("email: the recipient is not a single plain email address",
                                retryable=False)
        try:
            msg = self._build(message)
        except ValueError:  # e.g. a line break in the subject: header injection
            raise DeliveryError("email: the message headers are invalid",
                                retryable=False) from None
        try:
            await aiosmtplib.send(
                msg, sender=self._envelope_sender, recipients=[message.to],
                hostname=self._host, port=self._port,
                username=self._username, password=self._password,
                use_tls=self._tls == "tls", start_tls=self._tls == "starttls",
                tls_context=self._tls_context, timeout=self._timeout)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0]
            raise DeliveryError(
                f"{self._where()} refused the recipient: {_smtp_reply(first.code, first.message)}",
                retryable=_is_transient(first.code)) from exc
        except (aiosmtplib.SMTPRecipientRefused, aiosmtplib.SMTPDataError) as exc:
            what = ("the recipient" if isinstance(exc, aiosmtplib.SMTPRecipientRefused)
                    else "the message")
            raise DeliveryError(
                f"{self._where()} refused {what}: {_smtp_reply(exc.code, exc.message)}",
                retryable=_is_transient(exc.code)) from exc
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(
                f"{self._where()} authentication failed: {_smtp_reply(exc.code, exc.message)}",
                retryable=True) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise DeliveryError(
                f"{self._where()} failed: {_smtp_reply(exc.code, exc.message)}",
                retryable=True) from exc
        except aiosmtplib.SMTPNotSupported as exc:
            # A non-ASCII address and a server without SMTPUTF8 (RFC 6531): this server
            # will never carry this address.
            raise DeliveryError(f"{self._where()} cannot carry this address (no SMTPUTF8)",
                                retryable=False) from exc
        except (aiosmtplib.SMTPTimeoutError, TimeoutError) as exc:
            raise DeliveryError(f"{self._where()} timed out", retryable=True) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            # Refused or lost connections, a TLS handshake or certificate failure, no
            # STARTTLS on offer, no usable AUTH mechanism: the network, the server or our
            # configuration, never this message. These texts come from aiosmtplib or
            # OpenSSL, not from the message.
            raise DeliveryError(f"{self._where()} failed: {type(exc).__name__}: {exc}"[:300],
                                retryable=True) from exc
        except ValueError as exc:  # aiosmtplib refuses an address it cannot put on a line
            raise DeliveryError(f"{self._where()}: the address cannot be sent",
                                retryable=False) from exc
        log.debug("email accepted", extra={"message_id": message.message_id})

    async def aclose(self) -> None:
        return None  # no connection outlives a send


# -- HTTP ------------------------------------------------------------------------------------
# RFC 9110: 408 Request Timeout, 429 Too Many Requests; RFC 8470: 425 Too Early. Every 5xx
# is the server's fault. Any other 4xx says the request itself is wrong.
_RETRYABLE_STATUSES = frozenset({408, 425, 429})


def _retry_after(response: httpx.Response) -> float | None:
    """The delta-seconds form of Retry-After (RFC 9110 section 10.2.3); dates are ignored."""
    value = response.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


def _http_failure(provider: str, response: httpx.Response, detail: str = "") -> DeliveryError:
    status = response.status_code
    retryable = status in _RETRYABLE_STATUSES or status >= 500
    return DeliveryError(f"{provider} answered HTTP {status}{detail}", retryable=retryable,
                         retry_after_seconds=_retry_after(response))


def _transport_failure(provider: str, exc: httpx.TransportError) -> DeliveryError:
    # The exception's text is not used: keep messages to what we chose to say.
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "was unreachable"
    return DeliveryError(f"{provider} {kind} ({type(exc).__name__})", retryable=True)


def _check_http_url(url: str) -> None:
    if httpx.URL(url).scheme not in ("http", "https"):
        raise ValueError("the provider URL must be http or https")


@functools.cache
def _provider_tls() -> ssl.SSLContext:
    """The TLS context every provider client of this process verifies with: httpx's own
    default (certifi's CA bundle, or SSL_CERT_FILE / SSL_CERT_DIR), built once. Loading
    the bundle takes some 40 ms, which each new client would otherwise spend again."""
    return httpx.create_ssl_context()


class _HttpSender:
    """An httpx client that is closed on ``aclose`` only if this sender created it."""

    def __init__(self, timeout: float, client: httpx.AsyncClient | None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._timeout = timeout
        self._owns_client = client is None
        # ``transport``: e.g. OpenTelemetry's, a client span per provider request.
        self._client = client if client is not None else httpx.AsyncClient(
            timeout=timeout, transport=transport, verify=_provider_tls())

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def _check_phone_channel(sender: str, message: OutgoingMessage) -> None:
    if message.channel not in (Channel.SMS, Channel.VOICE):
        raise ValueError(f"{sender} sends sms and voice only, not {message.channel.value}")


class WebhookSender(_HttpSender):
    """POSTs SMS and VOICE messages as JSON to an in-house gateway.

    Body: ``{"to", "channel": "sms"|"voice", "text", "message_id"}``, with the
    ``Idempotency-Key`` header set to the message id. Any 2xx is success.

    Args:
        url: The gateway endpoint (http or https).
        timeout: Seconds allowed for each network operation.
        headers: Extra headers for every request, e.g. ``Authorization``.
        client: A shared client; this sender then leaves closing it to the caller.
    """

    def __init__(self, url: str, *, timeout: float = 10.0,
                 headers: dict[str, str] | None = None,
                 client: httpx.AsyncClient | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        _check_http_url(url)
        super().__init__(timeout, client, transport)
        self._url = url
        # The host names the gateway in errors; the path or query may hold a secret.
        self._label = f"webhook {httpx.URL(url).host}"
        self._headers = dict(headers or {})

    async def send(self, message: OutgoingMessage) -> None:
        """Deliver one SMS or voice message.

        Raises:
            ValueError: ``message`` is an EMAIL message.
            DeliveryError: a transport failure, 408/425/429 or 5xx (retryable); any other
                non-2xx status (not retryable).
        """
        _check_phone_channel("WebhookSender", message)
        body = {"to": message.to, "channel": message.channel.value, "text": message.text,
                "message_id": message.message_id}
        headers = {**self._headers, "Idempotency-Key": message.message_id}
        try:
            response = await self._client.post(self._url, json=body, headers=headers,
                                               timeout=self._timeout)
        except httpx.TransportError as exc:
            raise _transport_failure(self._label, exc) from exc
        if not response.is_success:
            raise _http_failure(self._label, response)
        log.debug("webhook accepted", extra={"message_id": message.message_id,
                                             "http_status": response.status_code})


class TwilioSender(_HttpSender):
    """Sends SMS and places voice calls through the Twilio REST API (2010-04-01).

    SMS: ``POST .../Accounts/{sid}/Messages.json`` with ``To``, ``From``, ``Body``.
    VOICE: ``POST .../Accounts/{sid}/Calls.json`` with ``To``, ``From`` and inline
    ``Twiml`` that says the text. HTTP Basic auth with the account SID and auth token;
    ``I-Twilio-Idempotency-Token`` carries the message id.

    Args:
        base_url: ``https://api.twilio.com`` in production; a local server in tests.
        account_sid: The account SID (also the Basic auth user).
        auth_token: The auth token (Basic auth password).
        from_number: The E.164 number messages and calls come from.
        timeout: Seconds allowed for each network operation.
        client: A shared client; this sender then leaves closing it to the caller.
    """

    def __init__(self, base_url: str, account_sid: str, auth_token: str, from_number: str,
                 *, timeout: float = 10.0, client: httpx.AsyncClient | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        _check_http_url(base_url)
        if not account_sid or not auth_token:
            raise ValueError("account_sid and auth_token are required")
        super().__init__(timeout, client, transport)
        account = f"{base_url.rstrip('/')}/2010-04-01/Accounts/{quote(account_sid, safe='')}"
        self._messages_url = f"{account}/Messages.json"
        self._calls_url = f"{account}/Calls.json"
        self._auth = httpx.BasicAuth(account_sid, auth_token)
        self._from = from_number

    @staticmethod
    def twiml(text: str) -> str:
        """TwiML that speaks ``text``; escaped, so "<" or "&" in it cannot change the XML."""
        return f"<Response><Say>{escape(text)}</Say></Response>"

    async def send(self, message: OutgoingMessage) -> None:
        """Send one SMS or place one call.

        Raises:
            ValueError: ``message`` is an EMAIL message.
            DeliveryError: classified as for ``WebhookSender``; Twilio's numeric error
                code, when the body has one, is added to the message.
        """
        _check_phone_channel("TwilioSender", message)
        form = {"To": message.to, "From": self._from}
        if message.channel is Channel.SMS:
            url, form["Body"] = self._messages_url, message.text
        else:
            url, form["Twiml"] = self._calls_url, self.twiml(message.text)
        try:
            response = await self._client.post(
                url, data=form, auth=self._auth, timeout=self._timeout,
                headers={"I-Twilio-Idempotency-Token": message.message_id})
        except httpx.TransportError as exc:
            raise _transport_failure("Twilio", exc) from exc
        if not response.is_success:
            raise _http_failure("Twilio", response, self._error_code(response))
        sid = self._json(response).get("sid")
        log.debug("twilio accepted", extra={"message_id": message.message_id,
                                            "http_status": response.status_code,
                                            "twilio_sid": sid if isinstance(sid, str) else None})

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, object]:
        try:
            body = response.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    @classmethod
    def _error_code(cls, response: httpx.Response) -> str:
        # Only the number: Twilio's free-text "message" can echo the recipient.
        code = cls._json(response).get("code")
        return f" (Twilio error {code})" if isinstance(code, int) else ""
